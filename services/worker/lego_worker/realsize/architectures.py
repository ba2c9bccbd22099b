"""Real-size diffusers/transformers architectures from the bundled public configs (configs/*.json),
with random weights: no download. `device="meta"` builds them without allocating their weights
(parameter counts and byte sizes only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

CONFIGS = Path(__file__).resolve().parent / "configs"

# architecture → (config file, class): the class of a transformers config is named here because the
# same CLIP-L config is a plain text model in SD 1.5 / SDXL and a projecting one in SD3 / FLUX.1
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "sd15_unet": ("sd15_unet", "UNet2DConditionModel"),
    "sd15_vae": ("sd15_vae", "AutoencoderKL"),
    "sdxl_unet": ("sdxl_unet", "UNet2DConditionModel"),
    "sdxl_vae": ("sdxl_vae", "AutoencoderKL"),
    "sd3_medium_transformer": ("sd3_medium_transformer", "SD3Transformer2DModel"),
    "sd3_vae": ("sd3_vae", "AutoencoderKL"),
    "flux1_dev_transformer": ("flux1_dev_transformer", "FluxTransformer2DModel"),
    "flux1_vae": ("flux1_vae", "AutoencoderKL"),
    "clip_l": ("clip_l", "CLIPTextModel"),
    "clip_l_projection": ("clip_l", "CLIPTextModelWithProjection"),
    "clip_g": ("clip_g", "CLIPTextModelWithProjection"),
    "t5_xxl_encoder": ("t5_xxl_encoder", "T5EncoderModel"),
}
_TRANSFORMERS_CONFIGS = {"clip_text_model": transformers.CLIPTextConfig, "t5": transformers.T5Config}


def config_of(architecture: str) -> dict[str, Any]:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown real-size architecture {architecture!r} (known: {sorted(ARCHITECTURES)})")
    config: dict[str, Any] = json.loads((CONFIGS / f"{ARCHITECTURES[architecture][0]}.json").read_text())
    return config


def build(architecture: str, device: str = "cpu", **overrides: Any) -> torch.nn.Module:
    """The architecture with random weights, in eval mode, its parameters created on `device`."""
    config = {**config_of(architecture), **overrides}
    class_name = ARCHITECTURES[architecture][1]
    with torch.device(device):
        if "model_type" in config:  # a transformers config
            model_config = _TRANSFORMERS_CONFIGS[config["model_type"]](**config)
            model: torch.nn.Module = getattr(transformers, class_name)(model_config)
        else:
            model = getattr(diffusers, class_name).from_config(config)
    return model.eval()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
