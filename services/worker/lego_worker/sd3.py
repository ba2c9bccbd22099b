"""Stable Diffusion 3's operators, called as diffusers' StableDiffusion3Pipeline calls them: the
CLIP-L + CLIP-G + T5 stack (one call: joint sequence and pooled embedding) and the transformer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lego_worker.backend import Item, Outputs
from lego_worker.batch_io import concat, split, to_tensor, uniform


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


def transformer_denoise_sd3(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    if not uniform(items, "sample"):
        return [transformer_denoise_sd3(model, [item], device)[0] for item in items]
    latents = concat(items, "sample", device)
    sizes = [int(np.shape(item["sample"])[0]) for item in items]
    timestep = torch.cat(
        [
            to_tensor(item["timestep"], device).reshape(1).expand(n)
            for item, n in zip(items, sizes, strict=True)
        ]
    )
    with torch.no_grad():
        noise = model(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=concat(items, "encoder_hidden_states", device),
            pooled_projections=concat(items, "pooled_embeds", device),
            joint_attention_kwargs=None,
            return_dict=False,
        )[0]
    return [{"noise_pred": n} for n in split(noise, sizes)]
