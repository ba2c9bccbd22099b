"""Where ComfyUI's file names (checkpoints, LoRAs, ControlNets) come from: a model map.

The default map knows the `tiny-*` presets and the well-known public file names of each family, so
compiling a ComfyUI workflow needs no weights. A JSON file of the same shape extends or overrides it:

    {"checkpoints": {"my-model.safetensors": {"source": "/models/my-sd15", "family": "sd15"}},
     "controlnets": {"my-canny.pth": "/models/my-canny:controlnet"},
     "loras": {"style.safetensors": "/models/loras/style.safetensors"},
     "lora_dir": "/models/loras"}

A checkpoint's `source` is a model-id source (`tiny-sd15`, a diffusers directory or a hub id); a
ControlNet maps to a whole model id; a LoRA to a file (or, failing an entry, `lora_dir`/name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES = ("sd15", "sdxl", "sd3", "flux")


@dataclass(frozen=True)
class Checkpoint:
    source: str
    family: str


DEFAULT_CHECKPOINTS = {
    # tiny presets (built from seeds)
    "tiny-sd15": Checkpoint("tiny-sd15", "sd15"),
    "tiny-sd15.safetensors": Checkpoint("tiny-sd15", "sd15"),
    # SD 1.5
    "v1-5-pruned-emaonly.safetensors": Checkpoint("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15"),
    "v1-5-pruned-emaonly.ckpt": Checkpoint("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15"),
    "v1-5-pruned.safetensors": Checkpoint("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15"),
    "v1-5-pruned.ckpt": Checkpoint("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15"),
    # SDXL
    "sd_xl_base_1.0.safetensors": Checkpoint("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
    "tiny-sdxl": Checkpoint("tiny-sdxl", "sdxl"),
    "tiny-sdxl.safetensors": Checkpoint("tiny-sdxl", "sdxl"),
    # SD3 / 3.5
    "sd3_medium.safetensors": Checkpoint("stabilityai/stable-diffusion-3-medium-diffusers", "sd3"),
    "sd3_medium_incl_clips.safetensors": Checkpoint("stabilityai/stable-diffusion-3-medium-diffusers", "sd3"),
    "sd3.5_large.safetensors": Checkpoint("stabilityai/stable-diffusion-3.5-large", "sd3"),
    "sd3.5_medium.safetensors": Checkpoint("stabilityai/stable-diffusion-3.5-medium", "sd3"),
    "tiny-sd3": Checkpoint("tiny-sd3", "sd3"),
    "tiny-sd3.safetensors": Checkpoint("tiny-sd3", "sd3"),
    # FLUX.1
    "flux1-dev.safetensors": Checkpoint("black-forest-labs/FLUX.1-dev", "flux"),
    "flux1-schnell.safetensors": Checkpoint("black-forest-labs/FLUX.1-schnell", "flux"),
    "flux1-dev-fp8.safetensors": Checkpoint("black-forest-labs/FLUX.1-dev", "flux"),
    "flux1-schnell-fp8.safetensors": Checkpoint("black-forest-labs/FLUX.1-schnell", "flux"),
    "tiny-flux-dev": Checkpoint("tiny-flux-dev", "flux"),
    "tiny-flux-dev.safetensors": Checkpoint("tiny-flux-dev", "flux"),
    "tiny-flux-schnell": Checkpoint("tiny-flux-schnell", "flux"),
    "tiny-flux-schnell.safetensors": Checkpoint("tiny-flux-schnell", "flux"),
}
DEFAULT_CONTROLNETS = {
    "tiny-sd15-controlnet-canny": "tiny-sd15:controlnet_canny",
    "tiny-sd15-controlnet-canny.safetensors": "tiny-sd15:controlnet_canny",
    "tiny-sd15-controlnet-depth.safetensors": "tiny-sd15:controlnet_depth",
    "tiny-sdxl-controlnet-canny.safetensors": "tiny-sdxl:controlnet_canny",
    "tiny-sdxl-controlnet-depth.safetensors": "tiny-sdxl:controlnet_depth",
    "diffusers_xl_canny_full.safetensors": "diffusers/controlnet-canny-sdxl-1.0:controlnet",
    "diffusers_xl_depth_full.safetensors": "diffusers/controlnet-depth-sdxl-1.0:controlnet",
    "tiny-flux-controlnet-canny.safetensors": "tiny-flux-dev:controlnet_canny",
    "tiny-flux-controlnet-depth.safetensors": "tiny-flux-dev:controlnet_depth",
    "flux-dev-controlnet-canny.safetensors": "InstantX/FLUX.1-dev-Controlnet-Canny:controlnet",
    "control_v11p_sd15_canny.pth": "lllyasviel/control_v11p_sd15_canny:controlnet",
    "control_v11p_sd15_canny.safetensors": "lllyasviel/control_v11p_sd15_canny:controlnet",
    "control_v11f1p_sd15_depth.pth": "lllyasviel/control_v11f1p_sd15_depth:controlnet",
    "control_v11f1p_sd15_depth.safetensors": "lllyasviel/control_v11f1p_sd15_depth:controlnet",
    "control_sd15_canny.pth": "lllyasviel/sd-controlnet-canny:controlnet",
    "control_sd15_depth.pth": "lllyasviel/sd-controlnet-depth:controlnet",
}


class ModelMapError(ValueError):
    pass


@dataclass
class ModelMap:
    checkpoints: dict[str, Checkpoint] = field(default_factory=lambda: dict(DEFAULT_CHECKPOINTS))
    controlnets: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_CONTROLNETS))
    loras: dict[str, str] = field(default_factory=dict)
    lora_dir: str = ""

    def checkpoint(self, name: str) -> Checkpoint:
        if name not in self.checkpoints:
            raise ModelMapError(
                f"checkpoint {name!r} is not in the model map (known: {sorted(self.checkpoints)})"
            )
        return self.checkpoints[name]

    def controlnet(self, name: str) -> str:
        if name not in self.controlnets:
            raise ModelMapError(
                f"ControlNet {name!r} is not in the model map (known: {sorted(self.controlnets)})"
            )
        return self.controlnets[name]

    def lora(self, name: str) -> str:
        if name in self.loras:
            return self.loras[name]
        if self.lora_dir:
            return str(Path(self.lora_dir) / name)
        raise ModelMapError(f"LoRA {name!r} is not in the model map and no lora_dir is set")

    def extended(self, data: dict[str, Any]) -> ModelMap:
        """This map with a config's entries added (they win)."""
        unknown = sorted(set(data) - {"checkpoints", "controlnets", "loras", "lora_dir"})
        if unknown:
            raise ModelMapError(f"model map: unknown keys {unknown}")
        checkpoints = dict(self.checkpoints)
        for name, entry in data.get("checkpoints", {}).items():
            if not isinstance(entry, dict) or entry.get("family") not in FAMILIES or not entry.get("source"):
                raise ModelMapError(
                    f"model map: checkpoint {name!r} needs a source and a family (one of {list(FAMILIES)})"
                )
            checkpoints[name] = Checkpoint(str(entry["source"]), str(entry["family"]))
        return ModelMap(
            checkpoints,
            {**self.controlnets, **{k: str(v) for k, v in data.get("controlnets", {}).items()}},
            {**self.loras, **{k: str(v) for k, v in data.get("loras", {}).items()}},
            str(data.get("lora_dir", self.lora_dir)),
        )


def load_model_map(path: Path | None) -> ModelMap:
    if path is None:
        return ModelMap()
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelMapError(f"model map {path}: {error}") from None
    if not isinstance(data, dict):
        raise ModelMapError(f"model map {path}: expected a JSON object")
    return ModelMap().extended(data)
