"""FLUX.1's operators, called as diffusers' FluxPipeline calls them: the CLIP + T5 text encoders
(one call: T5's sequence and CLIP's pooled embedding), flow-matching initialisation over packed 2x2
latent patches, the transformer with embedded guidance, and decoding packed latents."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor

from lego_worker.backend import Item, Outputs, PartSink
from lego_worker.batch_io import concat, split, to_tensor, uniform
from lego_worker.block_parts import BatchedParts, for_item, streaming_blocks


class FluxTextEncoders(torch.nn.Module):
    def __init__(self, clip_tokenizer: Any, clip: Any, t5_tokenizer: Any, t5: Any, max_length: int) -> None:
        super().__init__()
        self.clip_tokenizer, self.t5_tokenizer, self.max_length = clip_tokenizer, t5_tokenizer, max_length
        self.clip, self.t5 = clip, t5


def text_encode_flux(model: FluxTextEncoders, items: list[Item], device: torch.device) -> list[Outputs]:
    """One text at a time, as the pipeline encodes its prompt."""
    outputs = []
    for item in items:
        clip_ids = model.clip_tokenizer(
            [item["text"]],
            padding="max_length",
            max_length=model.clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        t5_ids = model.t5_tokenizer(
            [item["text"]],
            padding="max_length",
            max_length=model.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        with torch.no_grad():
            pooled = model.clip(clip_ids, output_hidden_states=False).pooler_output
            embeddings = model.t5(t5_ids, output_hidden_states=False)[0]
        outputs.append({"embeddings": embeddings.cpu().numpy(), "pooled": pooled.cpu().numpy()})
    return outputs


def packed_size(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """The latent grid (divisible by 2 for the 2x2 patches) of a height x width image."""
    return 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))


def pack(latents: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    batch, _, channels = latents.shape
    patches = latents.view(batch, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels // 4, height, width)


def image_ids(height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Positions of the (height/2) x (width/2) patches, for the transformer's rotary embedding."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(dtype=dtype)


def calculate_shift(sequence: int, config: Any) -> float:
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return float(sequence * slope + base_shift - slope * base_len)


def init_flow(scheduler: Any, item: Item, generator: torch.Generator) -> torch.Tensor:
    """Set the request's timesteps and draw its packed starting noise."""
    steps = int(item["steps"])
    height, width = packed_size(int(item["height"]), int(item["width"]), int(item["vae_scale_factor"]))
    latents = pack(torch.randn((1, int(item["latent_channels"]), height, width), generator=generator))
    sigmas = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=calculate_shift(latents.shape[1], scheduler.config))
    scheduler.set_begin_index(0)
    return latents


def _flux_inputs(model: Any, items: list[Item], device: torch.device) -> dict[str, Any]:
    """The keyword arguments FluxPipeline passes its transformer (and its ControlNet) for a batch."""
    latents = concat(items, "sample", device)
    sizes = [int(np.shape(item["sample"])[0]) for item in items]
    timestep = torch.cat(
        [
            to_tensor(item["timestep"], device).reshape(1).expand(n)
            for item, n in zip(items, sizes, strict=True)
        ]
    ).to(latents.dtype)
    guidance = None
    if model.config.guidance_embeds:
        guidance = torch.cat(
            [
                torch.full([n], float(item["guidance_scale"]), dtype=torch.float32)
                for item, n in zip(items, sizes, strict=True)
            ]
        ).to(device)
    embeddings = concat(items, "encoder_hidden_states", device)
    height, width = packed_size(int(items[0]["height"]), int(items[0]["width"]), 8)
    return {
        "hidden_states": latents,
        "timestep": timestep / 1000,
        "guidance": guidance,
        "pooled_projections": concat(items, "pooled_embeds", device),
        "encoder_hidden_states": embeddings,
        "txt_ids": torch.zeros(embeddings.shape[1], 3).to(device=device, dtype=embeddings.dtype),
        "img_ids": image_ids(height, width, latents.dtype).to(device),
        "joint_attention_kwargs": {},
        "return_dict": False,
    }


def _uniform(items: list[Item]) -> bool:
    return uniform(items, "sample") and len({(i["height"], i["width"]) for i in items}) == 1


def transformer_denoise_flux(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    if not _uniform(items):
        return [transformer_denoise_flux(model, [item], device)[0] for item in items]
    sizes = [int(np.shape(item["sample"])[0]) for item in items]
    extra: dict[str, Any] = {}
    if "block_samples" in items[0]:  # a ControlNet's block samples (stacked on dim 1), maybe arriving
        singles = BatchedParts(items, "single_block_samples", device)
        extra = {
            "controlnet_block_samples": BatchedParts(items, "block_samples", device),
            "controlnet_single_block_samples": singles if len(singles) else None,
            "controlnet_blocks_repeat": False,
        }
    with torch.no_grad():
        noise = model(**_flux_inputs(model, items, device), **extra)[0]
    return [{"noise_pred": n} for n in split(noise, sizes)]


def controlnet_residuals_flux(
    model: Any, items: list[Item], device: torch.device, parts: PartSink | None = None
) -> list[Outputs]:
    """The double and single block samples; with `parts`, each block's also handed over as soon
    as it is computed."""
    scales = {float(item["conditioning_scale"]) for item in items}
    if not _uniform(items) or len(scales) > 1:
        return [
            controlnet_residuals_flux(model, [item], device, for_item(parts, index))[0]
            for index, item in enumerate(items)
        ]
    sizes = [int(np.shape(item["sample"])[0]) for item in items]
    kwargs = _flux_inputs(model, items, device)
    scale = scales.pop()
    streams = [
        ("block_samples", model.transformer_blocks, model.controlnet_blocks),
        ("single_block_samples", model.single_transformer_blocks, model.controlnet_single_blocks),
    ]
    with torch.no_grad(), streaming_blocks(streams, scale, sizes, parts):
        blocks, singles = model(
            controlnet_cond=concat(items, "control_latents", device),
            controlnet_mode=None,
            conditioning_scale=scale,
            **kwargs,
        )
    latents = kwargs["hidden_states"]
    stacked = torch.stack(list(blocks), dim=1)
    empty = latents.new_zeros((latents.shape[0], 0, *stacked.shape[2:]))
    single = torch.stack(list(singles), dim=1) if singles else empty
    return [
        {"block_samples": b, "single_block_samples": s}
        for b, s in zip(split(stacked, sizes), split(single, sizes), strict=True)
    ]


def init_flow_from_image(scheduler: Any, item: Item, offset: int) -> torch.Tensor:
    """FLUX.1 img2img as FluxImg2ImgPipeline starts it: timesteps for the image size, the image's
    latents sampled and shifted, noise scaled in at the first timestep kept, then packed."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    steps = int(item["steps"])
    height, width = packed_size(int(item["height"]), int(item["width"]), int(item["vae_scale_factor"]))
    sigmas = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=calculate_shift((height // 2) * (width // 2), scheduler.config))
    scheduler.set_begin_index(offset)
    generator = torch.Generator("cpu").manual_seed(item["seed"])
    distribution = DiagonalGaussianDistribution(torch.from_numpy(np.array(item["init_latents"])))
    scaling, shift, _ = (float(v) for v in np.asarray(item["init_scaling"]).reshape(-1))
    image_latents = (distribution.sample(generator) - shift) * scaling
    noise = torch.randn(image_latents.shape, generator=generator, dtype=image_latents.dtype)
    latents = scheduler.scale_noise(image_latents, scheduler.timesteps[offset : offset + 1], noise)
    return pack(latents)


def resume_flow(scheduler: Any, item: Item, offset: int) -> torch.Tensor:
    """Approximate caching: `init_flow`'s timesteps begun at `offset`, for a cached packed latent
    (already at that timestep's noise level)."""
    steps = int(item["steps"])
    latents = torch.from_numpy(np.array(item["cached_latents"]))
    sigmas = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=calculate_shift(latents.shape[1], scheduler.config))
    scheduler.set_begin_index(offset)
    return latents


def control_latents(item: Item, generator: torch.Generator) -> torch.Tensor:
    """The control image's latents as FluxControlNetPipeline makes them: sampled, shifted, packed."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    distribution = DiagonalGaussianDistribution(torch.from_numpy(np.array(item["control_dist"])))
    scaling, shift, _ = (float(v) for v in np.asarray(item["control_scaling"]).reshape(-1))
    return pack((distribution.sample(generator) - shift) * scaling)


def vae_decode_packed(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    outputs = []
    for item in items:  # one image size per call
        height, width = packed_size(int(item["height"]), int(item["width"]), factor)
        latents = unpack(to_tensor(item["latents"], device), height, width)
        latents = (latents / model.config.scaling_factor) + model.config.shift_factor
        with torch.no_grad():
            image = model.decode(latents, return_dict=False)[0]
        pixels = VaeImageProcessor(vae_scale_factor=factor).postprocess(image, output_type="np")
        outputs.append({"image": (pixels * 255).round().astype("uint8")})
    return outputs
