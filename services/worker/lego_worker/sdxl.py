"""SDXL's operators: the text-encoder stack (`text_encoder.encode_pooled`) and the denoiser with
pooled embeddings and size conditioning (`unet.denoise_pooled`), called as diffusers'
StableDiffusionXLPipeline calls them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lego_worker.backend import Item, Outputs
from lego_worker.batch_io import batch_timestep, concat, split, uniform

VAE_SCALE_FACTOR = 8


def text_encode_pooled(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    """One text at a time, as the pipeline encodes the prompt and the negative prompt: the pooled
    projection of a batch of two differs from two single calls in the last bits."""
    return [_encode_one(model, item["text"], device) for item in items]


def _encode_one(model: Any, text: str, device: torch.device) -> Outputs:
    texts = [text]
    hidden_states, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in zip(model.tokenizers, model.encoders, strict=True):
            ids = tokenizer(
                texts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            output = encoder(ids, output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:
                pooled = output[0]
            hidden_states.append(output.hidden_states[-2])
    if pooled is None:
        raise ValueError("the text-encoder stack has no encoder with a pooled (projected) output")
    embeddings = torch.concat(hidden_states, dim=-1)
    return {"embeddings": embeddings.cpu().numpy(), "pooled": pooled.cpu().numpy()}


def time_ids(height: int, width: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's size conditioning: original size, crop top-left (0, 0), target size."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).repeat(rows, 1)


def unet_denoise_pooled(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    if not uniform(items, "sample"):
        return [unet_denoise_pooled(model, [item], device)[0] for item in items]
    sample = concat(items, "sample", device)
    sizes = [int(np.shape(item["sample"])[0]) for item in items]
    hidden = concat(items, "encoder_hidden_states", device)
    height, width = sample.shape[-2] * VAE_SCALE_FACTOR, sample.shape[-1] * VAE_SCALE_FACTOR
    added = {
        "text_embeds": concat(items, "pooled_embeds", device),
        "time_ids": time_ids(height, width, sample.shape[0], hidden.dtype).to(device),
    }
    with torch.no_grad():
        noise = model(
            sample,
            batch_timestep(items, sizes, device),
            encoder_hidden_states=hidden,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
    return [{"noise_pred": n} for n in split(noise, sizes)]
