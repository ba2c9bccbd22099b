"""The emulated backend: takes the time a real GPU would (from measured profiles), accounts its
memory, and returns correctly shaped placeholder tensors. It sleeps instead of computing, so dozens
of emulated GPUs run on two cores; `time_scale` K makes everything Kx faster than real time."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from statistics import NormalDist
from typing import Any

import numpy as np
from lego.profiles import PROFILE_MODES, ProfileSet

from lego_worker.backend import Item, Outputs, PartSink, PatchSet
from lego_worker.prompt_signatures import word_signature

VAE_SCALE_FACTOR = 8  # every profiled family's VAE
TEXT_TOKENS, TEXT_HIDDEN = 77, 768
BUILTIN = "builtin:"  # models without weights or a profile (the image preprocessor)
# LoRA fetch times: log-normal around the median of a production trace (Katz, ATC'25: 4.4 s)
LORA_FETCH_MEDIAN_S = 4.4
LORA_FETCH_SIGMA = 0.5


def lora_fetch_s(
    source: str, median_s: float = LORA_FETCH_MEDIAN_S, sigma: float = LORA_FETCH_SIGMA
) -> float:
    """The emulated fetch time of a LoRA, at real time: drawn from the log-normal by the source's
    hash, so a LoRA takes as long on every worker and in every run."""
    digest = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big")
    quantile = (digest + 0.5) / 2**64
    return median_s * math.exp(sigma * NormalDist().inv_cdf(quantile))


def pixels_of(item: Item) -> int:
    """The image resolution a call works at, from its inputs (0 when it has none)."""
    if "height" in item and "width" in item:
        return int(item["height"]) * int(item["width"])
    for name in ("sample", "latents"):
        if name in item:
            shape = np.shape(item[name])
            return int(shape[-2] * VAE_SCALE_FACTOR * shape[-1] * VAE_SCALE_FACTOR)
    return 0


def placeholder_outputs(op: str, mode: str, item: Item) -> Outputs:
    if op == "text_encoder" and mode == "encode_pooled":
        return {
            "embeddings": np.zeros((1, TEXT_TOKENS, 2048), dtype=np.float16),
            "pooled": np.zeros((1, 1280), dtype=np.float16),
        }
    if op == "text_encoder":
        return {"embeddings": np.zeros((1, TEXT_TOKENS, TEXT_HIDDEN), dtype=np.float16)}
    if op in ("unet", "transformer"):
        return {"noise_pred": np.zeros_like(item["sample"])}
    if op == "controlnet" and mode == "residuals_sd3":
        return {"block_samples": np.zeros((1, 1, 1, 1), dtype=np.float16)}
    if op == "controlnet" and mode == "residuals_flux":
        zeros = np.zeros((1, 1, 1, 1), dtype=np.float16)
        return {"block_samples": zeros, "single_block_samples": zeros}
    if op == "controlnet":
        return {
            "down_residuals": np.zeros((1, 1), dtype=np.float16),
            "mid_residual": np.zeros_like(item["sample"]),
        }
    if op == "image":
        size = (int(item.get("height", 512)), int(item.get("width", 512)))
        name = "control_image" if mode == "load_control" else "pixels"
        return {name: np.zeros((1, 3, *size), dtype=np.float16)}
    if op == "vae" and mode in ("encode", "encode_control", "encode_copies"):
        _, _, height, width = np.shape(item["pixels"])
        copies = int(item.get("copies", 1))  # encode_copies: one row per CFG branch
        shape = (copies, 8, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)
        scaling = np.array([[0.18215, 0.0, 0.0]], dtype=np.float64)
        return {"latent_dist": np.zeros(shape, dtype=np.float16), "latent_scaling": scaling}
    if op == "vae" and mode == "decode_packed":
        return {"image": np.zeros((1, int(item["height"]), int(item["width"]), 3), dtype=np.uint8)}
    if op == "vae" and mode == "decode":
        _, _, height, width = np.shape(item["latents"])
        return {
            "image": np.zeros((1, height * VAE_SCALE_FACTOR, width * VAE_SCALE_FACTOR, 3), dtype=np.uint8)
        }
    if op == "noise_scheduler":
        if mode in ("init_flow", "init_flow_control", "init_flow_from_image"):  # packed 2x2 patches
            side = 2 * int(item["vae_scale_factor"])
            patches = (int(item["height"]) // side) * (int(item["width"]) // side)
            latents = np.zeros((1, patches, 4 * int(item["latent_channels"])), dtype=np.float32)
        elif mode in ("init_from_latents", "init_flow_from_latents"):
            latents = np.asarray(item["cached_latents"])
        elif mode == "init_from_image":
            latents = np.zeros_like(np.asarray(item["init_latents"])[:, : int(item["latent_channels"])])
        elif mode in ("init", "init_control"):
            factor = int(item["vae_scale_factor"])
            shape = (
                1,
                int(item["latent_channels"]),
                int(item["height"]) // factor,
                int(item["width"]) // factor,
            )
            latents = np.zeros(shape, dtype=np.float32)
        else:
            latents = np.asarray(item["latents"])
        outputs: Outputs = {
            "latents": latents,
            "model_input": latents,
            "timestep": np.array(0, dtype=np.int64),
        }
        if mode == "init_flow_control":
            outputs["control_latents"] = latents
        if mode == "init_control":  # the control image's latents, sampled: one row per CFG branch
            control = np.asarray(item["control_dist"])
            outputs["control_samples"] = np.zeros_like(control[:, : int(item["latent_channels"])])
        return outputs
    raise ValueError(f"the emulated backend cannot run {op}.{mode}")


class EmulatedBackend:
    name = "emulated"
    streams_parts = False  # placeholders travel whole: the profiles time a call as one unit
    streaming_calls: frozenset[tuple[str, str]] = frozenset()

    def __init__(
        self,
        profiles: ProfileSet,
        time_scale: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        lora_fetch_median_s: float = LORA_FETCH_MEDIAN_S,
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        if lora_fetch_median_s < 0:
            raise ValueError(f"lora_fetch_median_s must be ≥ 0, got {lora_fetch_median_s}")
        self.profiles = profiles
        self.time_scale = time_scale
        self.lora_fetch_median_s = lora_fetch_median_s
        self._sleep = sleep
        self._host: set[str] = set()

    def _wait(self, seconds: float) -> float:
        scaled = seconds / self.time_scale
        if scaled > 0:
            self._sleep(scaled)
        return scaled

    def prefetch(self, model_id: str) -> float:
        if model_id in self._host or model_id.startswith(BUILTIN):
            self._host.add(model_id)
            return 0.0
        spent = self._wait(self.profiles.for_model(model_id).disk_to_host_s)
        self._host.add(model_id)
        return spent

    def footprint(self, model_id: str) -> int:
        if model_id.startswith(BUILTIN):
            return 0
        return self.profiles.for_model(model_id).memory_bytes

    def workspace(self, model_id: str) -> int:
        if model_id.startswith(BUILTIN):
            return 0
        return self.profiles.for_model(model_id).workspace_bytes()

    def load(self, model_id: str) -> float:
        self.prefetch(model_id)
        if model_id.startswith(BUILTIN):
            return 0.0
        return self._wait(self.profiles.for_model(model_id).host_to_device_s)

    def unload(self, model_id: str) -> None:
        return None

    def host_models(self) -> list[str]:
        return sorted(self._host)

    def fetch_lora(self, source: str) -> float:
        return self._wait(lora_fetch_s(source, self.lora_fetch_median_s))

    def drop_lora(self, source: str) -> None:
        return None

    def signature(self, item: Item, output: Any) -> list[float]:
        """Placeholder embeddings mean nothing: the prompt's words stand for them."""
        text = item.get("text")
        return word_signature(text) if isinstance(text, str) else []

    def execution_s(self, op: str, model_id: str, mode: str, items: list[Item]) -> float:
        """Profiled seconds for this batch at real time (before the time scale)."""
        if model_id.startswith(BUILTIN):
            return 0.0  # image preprocessing: host work, no GPU profile
        profile_mode = PROFILE_MODES.get((op, mode))
        if profile_mode is None:
            raise ValueError(f"the emulated backend cannot run {op}.{mode}")
        return self.profiles.for_model(model_id).execution_s(profile_mode, len(items), pixels_of(items[0]))

    def plan(self, op: str, model_id: str, mode: str, items: list[Item]) -> tuple[float, list[Outputs]]:
        """The seconds this batch takes at this time scale, and its outputs, without waiting."""
        seconds = self.execution_s(op, model_id, mode, items) / self.time_scale
        return seconds, [placeholder_outputs(op, mode, item) for item in items]

    def run(
        self,
        op: str,
        model_id: str,
        mode: str,
        items: list[Item],
        patches: PatchSet,
        parts: PartSink | None = None,
    ) -> list[Outputs]:
        seconds, outputs = self.plan(op, model_id, mode, items)
        if seconds > 0:
            self._sleep(seconds)
        return outputs

    def release(self, request_id: str) -> None:
        return None
