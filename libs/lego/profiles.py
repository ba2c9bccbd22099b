"""Per-model GPU profiles (the format of profiles/h800/*.json) and which profile a model id uses.

They drive the emulated backend's timing and memory and the scheduler's cost estimates. Pure data:
no torch, no I/O beyond reading the JSON files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

# Batch sizes read off a profile (model_batch.json's `latency_mode` / `throughput_mode`):
LATENCY_SLOWDOWN = 1.3  # latency mode: the largest batch whose call takes at most this x batch 1's
THROUGHPUT_TOLERANCE = 0.1  # throughput mode: the smallest batch this close to the best items/s

# Our (op, mode) → the profile's execution mode name.
PROFILE_MODES = {
    ("text_encoder", "encode"): "default",
    ("unet", "denoise"): "default",
    ("unet", "denoise_controlled"): "default",
    ("unet", "denoise_pooled"): "default",
    ("transformer", "denoise_flux"): "default",
    ("transformer", "denoise_sd3"): "default",
    ("transformer", "denoise_sd3_controlled"): "default",
    ("controlnet", "residuals_sd3"): "default",
    ("noise_scheduler", "init_control"): "init",
    ("vae", "encode_copies"): "prepare_image",
    ("vae", "decode_packed"): "decode_latents",
    ("noise_scheduler", "init_flow"): "init",
    ("text_encoder", "encode_pooled"): "default",
    ("controlnet", "residuals"): "default",
    ("controlnet", "residuals_pooled"): "default",
    ("controlnet", "residuals_flux"): "default",
    ("transformer", "denoise_flux_controlled"): "default",
    ("noise_scheduler", "init_flow_control"): "init",
    ("noise_scheduler", "init_flow_from_image"): "init",
    ("vae", "encode_control"): "prepare_image",
    ("unet", "denoise_pooled_controlled"): "default",
    ("vae", "decode"): "decode_latents",
    ("vae", "encode"): "prepare_image",
    ("noise_scheduler", "init"): "init",
    ("noise_scheduler", "init_from_image"): "init",
    ("noise_scheduler", "init_from_latents"): "init",
    ("noise_scheduler", "init_flow_from_latents"): "init",
    ("noise_scheduler", "step"): "step",
    ("noise_scheduler", "cfg_step"): "step_classifier_free_guidance",
}

# A model id's source → its family's profile names per component. `profile:<Name>` names one directly.
# A stack of text encoders that runs as one node of ours is the sum of its members' profiles
# (`A+B`): the profiles' own *TextEncoder entries time only the paper's combining step (≈ 0 s, 0 B).
FAMILY_PROFILES = {
    "sd15": {
        "text_encoder": "CLIP_SD15",
        "unet": "StableDiffusion15",
        "vae": "StableDiffusion15VAE",
        "scheduler": "PNDMScheduler",
        "controlnet_canny": "StableDiffusion15ControlNetCanny",
        "controlnet_depth": "StableDiffusion15ControlNetDepth",
    },
    "sdxl": {
        "text_encoders": "CLIP_SDXL_1+CLIP_SDXL_2",
        "unet": "StableDiffusionXL",
        "vae": "StableDiffusionXLVAE",
        "scheduler": "EulerDiscreteScheduler",
        "controlnet_canny": "StableDiffusionXLControlNetCanny",
        "controlnet_depth": "StableDiffusionXLControlNetDepth",
    },
    "sd3-medium": {
        "text_encoders": "CLIP_L+CLIP_G+T5",
        "transformer": "StableDiffusion3",
        "vae": "StableDiffusion3VAE",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "controlnet_canny": "StableDiffusion3ControlNetCanny",
        "controlnet_pose": "StableDiffusion3ControlNetPose",
    },
    "sd35-large": {
        "text_encoders": "CLIP_L+CLIP_G+T5",
        "transformer": "StableDiffusion35Large",
        "vae": "StableDiffusion35LargeVAE",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "controlnet_canny": "StableDiffusion35LargeControlNetCanny",
        "controlnet_depth": "StableDiffusion35LargeControlNetDepth",
    },
    "flux-dev": {
        "text_encoders": "CLIP_Flux+T5_Flux",
        "transformer": "Flux1Dev",
        "vae": "Flux1VAE",
        "scheduler": "FluxFlowMatchEulerDiscreteScheduler",
        "controlnet_canny": "Flux1DevControlNetCanny",
        "controlnet_depth": "Flux1DevControlNetDepth",
    },
    "flux-schnell": {
        "text_encoders": "CLIP_Flux+T5_Flux",
        "transformer": "Flux1Schnell",
        "vae": "Flux1VAE",
        "scheduler": "FluxFlowMatchEulerDiscreteScheduler",
    },
}
SOURCE_FAMILIES = {
    "tiny-sd15": "sd15",
    "sd15": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "tiny-sdxl": "sdxl",
    "sdxl": "sdxl",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3-medium",
    "stabilityai/stable-diffusion-3.5-large": "sd35-large",
    "black-forest-labs/FLUX.1-dev": "flux-dev",
    "black-forest-labs/FLUX.1-schnell": "flux-schnell",
    "tiny-flux-dev": "flux-dev",
    "tiny-sd3": "sd3-medium",
    "tiny-flux-schnell": "flux-schnell",
    "realsize-sd15": "sd15",
    "realsize-sdxl": "sdxl",
    "realsize-sd3": "sd3-medium",
    "realsize-flux-dev": "flux-dev",
    "realsize-flux-schnell": "flux-schnell",
}


@dataclass(frozen=True)
class ExecutionPoint:
    batch_size: int
    pixels: int  # height x width, 0 where the profile has no resolution
    seconds: float
    peak_bytes: int


@dataclass(frozen=True)
class ModelProfile:
    name: str
    disk_to_host_s: float
    host_to_device_s: float
    memory_bytes: int
    modes: dict[str, list[ExecutionPoint]]

    def peak_bytes(self) -> int:
        peaks = [p.peak_bytes for points in self.modes.values() for p in points]
        return max([self.memory_bytes, *peaks])

    def workspace_bytes(self) -> int:
        """What a call needs beyond the resident weights (its peak activations)."""
        return self.peak_bytes() - self.memory_bytes

    def _curve(self, mode: str, pixels: int) -> list[ExecutionPoint]:
        """The mode's measurements at the profiled resolution closest to `pixels`, by batch size."""
        points = self.modes.get(mode)
        if not points:
            raise KeyError(f"profile {self.name} has no mode {mode!r} (modes: {sorted(self.modes)})")
        resolution = min({p.pixels for p in points}, key=lambda px: abs(px - pixels))
        return sorted((p for p in points if p.pixels == resolution), key=lambda p: p.batch_size)

    def execution_s(self, mode: str, batch_size: int, pixels: int = 0) -> float:
        """Seconds for one call: the profiled resolution closest to `pixels`, the batch size rounded
        up to the next profiled one (beyond the largest: whole multiples of it)."""
        by_batch = self._curve(mode, pixels)
        for point in by_batch:
            if point.batch_size >= batch_size:
                return point.seconds
        largest = by_batch[-1]
        return largest.seconds * math.ceil(batch_size / largest.batch_size)

    def batch_limits(self, mode: str, pixels: int = 0) -> tuple[int, int]:
        """(latency-mode, throughput-mode) batch sizes read off the measured curve (what `lego
        profile` writes to model_batch.json, and what the scheduler uses for a model that table
        does not list). A model that gains little from batching gets (1, 1): a FLUX.1 transformer
        takes 0.224 s alone and 0.210 s per item in eights, and batching it multiplied the latency
        of every request in the batch for 6 % more throughput."""
        by_batch = self._curve(mode, pixels)
        best = min(p.seconds / p.batch_size for p in by_batch)
        throughput = next(
            p.batch_size for p in by_batch if p.seconds / p.batch_size <= (1 + THROUGHPUT_TOLERANCE) * best
        )
        single = by_batch[0].seconds
        latency = max(
            p.batch_size
            for p in by_batch
            if p.batch_size <= throughput and p.seconds <= LATENCY_SLOWDOWN * single
        )
        return latency, throughput


def parse_profile(data: dict[str, object]) -> ModelProfile:
    loading = data["loading"]
    assert isinstance(loading, dict)
    modes: dict[str, list[ExecutionPoint]] = {}
    executions = data.get("execution", [])
    assert isinstance(executions, list)
    for execution in executions:
        modes[execution["mode"]] = [
            ExecutionPoint(
                batch_size=int(r["batch_size"]),
                pixels=int(r.get("height") or 0) * int(r.get("width") or 0),
                seconds=float(r["execution_time"]),
                peak_bytes=int(r.get("gpu_memory_used") or 0),
            )
            for r in execution["results"]
        ]
    return ModelProfile(
        name=str(data["model_name"]),
        disk_to_host_s=float(loading["disk_to_host_mem_time"]),
        host_to_device_s=float(loading["host_mem_to_gpu_time"]),
        memory_bytes=int(loading["gpu_memory_required"]),
        modes=modes,
    )


def stacked(name: str, parts: list[ModelProfile]) -> ModelProfile:
    """Models that load together and run one after another in one call (a stack of text encoders):
    load times, memory and per-batch execution times add up, for the modes they all have."""
    modes: dict[str, list[ExecutionPoint]] = {}
    for mode in set.intersection(*(set(part.modes) for part in parts)):
        sizes = sorted({p.batch_size for part in parts for p in part.modes[mode]})
        modes[mode] = [
            ExecutionPoint(
                batch_size=size,
                pixels=0,
                seconds=sum(part.execution_s(mode, size) for part in parts),
                peak_bytes=sum(part.peak_bytes() for part in parts),
            )
            for size in sizes
        ]
    return ModelProfile(
        name=name,
        disk_to_host_s=sum(part.disk_to_host_s for part in parts),
        host_to_device_s=sum(part.host_to_device_s for part in parts),
        memory_bytes=sum(part.memory_bytes for part in parts),
        modes=modes,
    )


class ProfileSet:
    """Every `<Model>.json` of a profile directory, loaded on demand."""

    def __init__(self, directory: Path) -> None:
        if not directory.is_dir():
            raise FileNotFoundError(f"profile directory {directory} does not exist")
        self.directory = directory
        self._cache: dict[str, ModelProfile] = {}

    def get(self, name: str) -> ModelProfile:
        if name not in self._cache:
            if "+" in name:
                self._cache[name] = stacked(name, [self.get(part) for part in name.split("+")])
            else:
                path = self.directory / f"{name}.json"
                if not path.exists():
                    raise KeyError(f"no profile {name!r} in {self.directory}")
                self._cache[name] = parse_profile(json.loads(path.read_text()))
        return self._cache[name]

    def for_model(self, model_id: str) -> ModelProfile:
        return self.get(profile_name(model_id))


def profile_name(model_id: str) -> str:
    source, _, component = model_id.rpartition(":")
    source = source.partition("#")[0]  # a private copy has its original's profile
    if source == "profile":
        return component
    family = SOURCE_FAMILIES.get(source)
    if family is None or component not in FAMILY_PROFILES[family]:
        raise KeyError(
            f"no profile known for model {model_id!r}: use 'profile:<Name>' or one of "
            f"{sorted(SOURCE_FAMILIES)} with components {sorted(FAMILY_PROFILES['sd15'])}"
        )
    return FAMILY_PROFILES[family][component]


def default_profile_dir() -> Path:
    """The H800 measurements committed under profiles/h800 at the root of the checkout."""
    return Path(__file__).resolve().parents[2] / "profiles" / "h800"


def load_batch_sizes(directory: Path) -> dict[str, tuple[int, int]]:
    """model_batch.json: profile name → (latency-mode, throughput-mode) batch size."""
    path = directory / "model_batch.json"
    if not path.exists():
        return {}
    table = json.loads(path.read_text())
    return {name: (int(v["latency_mode"]), int(v["throughput_mode"])) for name, v in table.items()}
