"""ControlNet as its own node: `controlnet.residuals` runs the ControlNet for one step (and CFG
branch, or a batch of them) and `unet.denoise_controlled` runs the denoiser with those residuals.

The down-block residuals (one tensor per UNet down-block layer) travel as one tensor per item,
packed as (B, N) rows; the denoiser unpacks them with the shapes its own configuration implies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lego_worker.backend import Item, Outputs
from lego_worker.batch_io import batch_timestep, concat, split, to_tensor, uniform
from lego_worker.sdxl import VAE_SCALE_FACTOR, time_ids


def down_residual_shapes(config: Any, height: int, width: int) -> list[tuple[int, int, int]]:
    """(channels, h, w) of each down-block residual of a UNet2DConditionModel-style denoiser for
    latents of height x width: conv_in, then each down block's layers and its downsampler."""
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    per_block = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    shapes = [(channels[0], height, width)]
    for index, channel in enumerate(channels):
        shapes.extend([(channel, height, width)] * per_block[index])
        if index < len(channels) - 1:
            height, width = math.ceil(height / 2), math.ceil(width / 2)
            shapes.append((channel, height, width))
    return shapes


def pack(residuals: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([r.reshape(r.shape[0], -1) for r in residuals], dim=1)


def unpack(packed: torch.Tensor, shapes: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    sizes = [c * h * w for c, h, w in shapes]
    if sum(sizes) != packed.shape[1]:
        raise ValueError(
            f"ControlNet residuals hold {packed.shape[1]} values per item, but this denoiser's down "
            f"blocks need {sum(sizes)}: the ControlNet does not match the denoiser"
        )
    parts = torch.split(packed, sizes, dim=1)
    return [part.reshape(packed.shape[0], *shape) for part, shape in zip(parts, shapes, strict=True)]


def _added_conditions(items: list[Item], sample: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """SDXL's pooled embeddings and size conditioning, when the items carry them."""
    if "pooled_embeds" not in items[0]:
        return {}
    height, width = sample.shape[-2] * VAE_SCALE_FACTOR, sample.shape[-1] * VAE_SCALE_FACTOR
    pooled = concat(items, "pooled_embeds", device)
    ids = time_ids(height, width, sample.shape[0], pooled.dtype).to(device)
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}


def controlnet_residuals(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    scales = {float(item["conditioning_scale"]) for item in items}
    if len(scales) > 1 or not uniform(items, "sample") or not uniform(items, "control_image"):
        return [controlnet_residuals(model, [item], device)[0] for item in items]
    sizes = [int(np.shape(item["sample"])[0]) for item in items]
    sample = concat(items, "sample", device)
    with torch.no_grad():
        down, mid = model(
            sample,
            batch_timestep(items, sizes, device),
            encoder_hidden_states=concat(items, "encoder_hidden_states", device),
            controlnet_cond=concat(items, "control_image", device),
            conditioning_scale=scales.pop(),
            return_dict=False,
            **_added_conditions(items, sample, device),
        )
    packed = split(pack(down), sizes)
    mids = split(mid, sizes)
    return [{"down_residuals": d, "mid_residual": m} for d, m in zip(packed, mids, strict=True)]


def unet_denoise_controlled(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    if not uniform(items, "sample"):
        return [unet_denoise_controlled(model, [item], device)[0] for item in items]
    sample = concat(items, "sample", device)
    sizes = [int(np.shape(item["sample"])[0]) for item in items]
    shapes = down_residual_shapes(model.config, sample.shape[-2], sample.shape[-1])
    down = unpack(torch.cat([to_tensor(item["down_residuals"], device) for item in items]), shapes)
    with torch.no_grad():
        noise = model(
            sample,
            batch_timestep(items, sizes, device),
            encoder_hidden_states=concat(items, "encoder_hidden_states", device),
            down_block_additional_residuals=tuple(down),
            mid_block_additional_residual=concat(items, "mid_residual", device),
            return_dict=False,
            **_added_conditions(items, sample, device),
        )[0]
    return [{"noise_pred": n} for n in split(noise, sizes)]
