"""The reference: diffusers' own StableDiffusionPipeline over the same tiny-sd15 components."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from lego_worker.presets import build_tiny_sd15
from PIL import Image


def reference_image(
    prompt: str,
    negative_prompt: str,
    seed: int,
    steps: int,
    guidance_scale: float,
    height: int = 128,
    width: int = 128,
    lora_dir: Path | None = None,
) -> np.ndarray:
    parts = build_tiny_sd15(0)
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=parts.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))  # diffusers' own LoRA loading
    images = pipe(
        prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    return (images[0] * 255).round().astype("uint8")


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
