"""The operators that turn a request's images (lego.data_uri decodes them) into tensors: `image.load`
(VAE-encoder input in [-1, 1], as diffusers' img2img pipelines preprocess it) and
`image.load_control` (a ControlNet's conditioning image in [0, 1], resized to the request's size,
as diffusers' ControlNet pipelines preprocess it); `vae.encode`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from lego.data_uri import decode_image

from lego_worker.backend import Item, Outputs
from lego_worker.batch_io import concat, split, uniform

VAE_SCALE_FACTOR = 8  # every supported family's VAE


def image_load(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE_FACTOR)
    return [
        {"pixels": processor.preprocess(decode_image(item["image"])).numpy().astype(np.float32)}
        for item in items
    ]


def image_load_resized(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE_FACTOR)
    outputs = []
    for item in items:
        pixels = processor.preprocess(
            decode_image(item["image"]), height=int(item["height"]), width=int(item["width"])
        )
        outputs.append({"pixels": pixels.numpy().astype(np.float32)})
    return outputs


def image_load_control(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE_FACTOR, do_convert_rgb=True, do_normalize=False)
    outputs = []
    for item in items:
        image = decode_image(item["image"])
        pixels = processor.preprocess(image, height=int(item["height"]), width=int(item["width"]))
        outputs.append({"control_image": pixels.to(dtype=torch.float32).numpy()})
    return outputs


def vae_encode_control(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    """As `vae_encode`, on contiguous pixels (FluxControlNetPipeline's control image)."""
    return vae_encode(model, items, device, channels_last=False)


def vae_encode(
    model: Any, items: list[Item], device: torch.device, channels_last: bool = True
) -> list[Outputs]:
    """The latent distribution's parameters; the noise scheduler samples it with the request's seed."""
    if not uniform(items, "pixels"):
        return [vae_encode(model, [item], device, channels_last)[0] for item in items]
    # channels-last, as diffusers' VaeImageProcessor.preprocess lays images out (a transposed view):
    # the encoder's convolutions take another path, and round differently, on contiguous input
    pixels = concat(items, "pixels", device)
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        parameters = model.encode(pixels).latent_dist.parameters
    sizes = [int(np.shape(item["pixels"])[0]) for item in items]
    shift = getattr(model.config, "shift_factor", None)
    scaling = np.array(
        [[model.config.scaling_factor, shift or 0.0, float(shift is not None)]], dtype=np.float64
    )
    return [{"latent_dist": p, "latent_scaling": scaling} for p in split(parameters, sizes)]
