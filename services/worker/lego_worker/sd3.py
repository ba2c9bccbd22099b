"""Stable Diffusion 3's operators, called as diffusers' StableDiffusion3Pipeline calls them: the
CLIP-L + CLIP-G + T5 stack (one call: joint sequence and pooled embedding) and the transformer;
and as StableDiffusion3ControlNetPipeline calls them: the control image encoded with one copy per
CFG branch in one call, its latents sampled, the SD3ControlNetModel and the transformer with its block
samples."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lego_worker.backend import Item, Outputs, PartSink
from lego_worker.batch_io import concat, split, to_tensor, uniform
from lego_worker.block_parts import BatchedParts, for_item, streaming_blocks
from lego_worker.images import vae_encode


class SD3TextEncoders(torch.nn.Module):
    def __init__(
        self, clip_tokenizers: list[Any], clips: list[Any], t5_tokenizer: Any, t5: Any, max_length: int
    ):
        super().__init__()
        self.clip_tokenizers, self.t5_tokenizer, self.max_length = clip_tokenizers, t5_tokenizer, max_length
        self.clips = torch.nn.ModuleList(clips)
        self.t5 = t5


def _encode_one(model: SD3TextEncoders, text: str, device: torch.device) -> Outputs:
    hidden, pooled = [], []
    with torch.no_grad():
        for tokenizer, clip in zip(model.clip_tokenizers, model.clips, strict=True):
            ids = tokenizer(
                [text],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            output = clip(ids, output_hidden_states=True)
            pooled.append(output[0])
            hidden.append(output.hidden_states[-2])
        t5_ids = model.t5_tokenizer(
            [text],
            padding="max_length",
            max_length=model.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids.to(device)
        t5_embeds = model.t5(t5_ids)[0]
    clip_embeds = torch.cat(hidden, dim=-1)
    clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
    embeddings = torch.cat([clip_embeds, t5_embeds], dim=-2)
    return {"embeddings": embeddings.cpu().numpy(), "pooled": torch.cat(pooled, dim=-1).cpu().numpy()}


def text_encode_sd3(model: SD3TextEncoders, items: list[Item], device: torch.device) -> list[Outputs]:
    """One text at a time, as the pipeline encodes the prompt and the negative prompt."""
    return [_encode_one(model, item["text"], device) for item in items]


def _timestep(items: list[Item], sizes: list[int], device: torch.device) -> torch.Tensor:
    return torch.cat(
        [
            to_tensor(item["timestep"], device).reshape(1).expand(n)
            for item, n in zip(items, sizes, strict=True)
        ]
    )


def transformer_denoise_sd3(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    """`denoise_sd3`, and `denoise_sd3_controlled` with a ControlNet's block samples (which may
    still be arriving: each transformer block waits for the one it adds)."""
    if not uniform(items, "sample"):
        return [transformer_denoise_sd3(model, [item], device)[0] for item in items]
    latents = concat(items, "sample", device)
    sizes = [int(np.shape(item["sample"])[0]) for item in items]
    blocks = BatchedParts(items, "block_samples", device) if "block_samples" in items[0] else None
    with torch.no_grad():
        noise = model(
            hidden_states=latents,
            timestep=_timestep(items, sizes, device),
            encoder_hidden_states=concat(items, "encoder_hidden_states", device),
            pooled_projections=concat(items, "pooled_embeds", device),
            block_controlnet_hidden_states=blocks,
            joint_attention_kwargs=None,
            return_dict=False,
        )[0]
    return [{"noise_pred": n} for n in split(noise, sizes)]


def vae_encode_copies(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    """Each item's image repeated `copies` times in the batch (contiguous, as the pipeline's
    `prepare_image` leaves it): the latent distribution of every copy."""
    if any(int(item["copies"]) not in (1, 2) for item in items):
        raise ValueError("encode_copies: copies must be 1 or 2 (one per CFG branch)")
    repeated = [
        {"pixels": np.concatenate([np.asarray(item["pixels"])] * int(item["copies"]))} for item in items
    ]
    return vae_encode(model, repeated, device, channels_last=False)


def control_samples(item: Item, generator: torch.Generator) -> torch.Tensor:
    """The control image's latents, one row per encoded copy, drawn in one call (`latent_dist.sample()`)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(torch.from_numpy(np.array(item["control_dist"]))).sample(generator)


def _control_latents(config: Any, item: Item, device: torch.device) -> torch.Tensor:
    """The item's row of the sampled control latents, shifted and scaled as the pipeline does for
    this ControlNet: InstantX's (zero pooled projections) take no VAE shift."""
    row = int(item["control_row"])
    sample = to_tensor(item["control_samples"], device)[row : row + 1]
    scaling, shift, _ = (float(v) for v in np.asarray(item["control_scaling"]).reshape(-1))
    return (sample - (0.0 if config.force_zeros_for_pooled_projection else shift)) * scaling


def controlnet_residuals_sd3(
    model: Any, items: list[Item], device: torch.device, parts: PartSink | None = None
) -> list[Outputs]:
    """The block samples; with `parts`, each block's also handed over as soon as it is computed."""
    scales = {float(item["conditioning_scale"]) for item in items}
    if len(scales) > 1 or not uniform(items, "sample"):
        return [
            controlnet_residuals_sd3(model, [item], device, for_item(parts, index))[0]
            for index, item in enumerate(items)
        ]
    if model.pos_embed is None:
        raise ValueError(
            "this SD3 ControlNet has no position embedding of its own (SD3.5 Large's use the "
            "transformer's): loading it apart from its transformer is not supported"
        )
    config = model.config
    sizes = [int(np.shape(item["sample"])[0]) for item in items]
    pooled = concat(items, "pooled_embeds", device)
    if config.force_zeros_for_pooled_projection:  # InstantX's ControlNets
        pooled = torch.zeros_like(pooled)
    hidden = None  # SD3.5's ControlNets without a context embedder take no text
    if config.joint_attention_dim is not None:
        hidden = concat(items, "encoder_hidden_states", device)
    scale = scales.pop()
    streams = [("block_samples", model.transformer_blocks, model.controlnet_blocks)]
    with torch.no_grad(), streaming_blocks(streams, scale, sizes, parts):
        blocks = model(
            hidden_states=concat(items, "sample", device),
            timestep=_timestep(items, sizes, device),
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            joint_attention_kwargs=None,
            controlnet_cond=torch.cat([_control_latents(config, item, device) for item in items]),
            conditioning_scale=scale,
            return_dict=False,
        )[0]
    stacked = torch.stack(list(blocks), dim=1)
    return [{"block_samples": b} for b in split(stacked, sizes)]
