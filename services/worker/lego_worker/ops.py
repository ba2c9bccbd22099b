"""Operator implementations: one function per (op, mode), each running a whole batch.

Inputs arrive as numpy arrays and scalars; outputs leave as numpy arrays. A batch concatenates its
items on the batch dimension, runs one forward pass, and splits the result back per item, so a
batch of the two CFG branches is exactly the call diffusers' pipeline makes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor

from lego_worker.backend import Item, Outputs
from lego_worker.sources import TextEncoderBundle


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True)).to(device)


def _split(batched: torch.Tensor, sizes: list[int]) -> list[np.ndarray]:
    return [part.detach().cpu().numpy() for part in torch.split(batched, sizes)]


def text_encode(model: TextEncoderBundle, items: list[Item], device: torch.device) -> list[Outputs]:
    tokenizer = model.tokenizer
    ids = tokenizer(
        [item["text"] for item in items],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    with torch.no_grad():
        embeddings = model.encoder(ids, attention_mask=None)[0]
    return [{"embeddings": e} for e in _split(embeddings, [1] * len(items))]


def unet_denoise(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    samples = [_tensor(item["sample"], device) for item in items]
    sizes = [s.shape[0] for s in samples]
    timesteps = [_tensor(item["timestep"], device) for item in items]
    if all(torch.equal(t, timesteps[0]) for t in timesteps):
        timestep = timesteps[0]  # one scalar timestep, as the pipeline passes it
    else:
        timestep = torch.cat([t.reshape(1).expand(n) for t, n in zip(timesteps, sizes, strict=True)])
    hidden = torch.cat([_tensor(item["encoder_hidden_states"], device) for item in items])
    with torch.no_grad():
        noise = model(torch.cat(samples), timestep, encoder_hidden_states=hidden, return_dict=False)[0]
    return [{"noise_pred": n} for n in _split(noise, sizes)]


def vae_decode(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    latents = [_tensor(item["latents"], device) for item in items]
    sizes = [latent.shape[0] for latent in latents]
    scale_factor = 2 ** (len(model.config.block_out_channels) - 1)
    with torch.no_grad():
        image = model.decode(torch.cat(latents) / model.config.scaling_factor, return_dict=False)[0]
    pixels = VaeImageProcessor(vae_scale_factor=scale_factor).postprocess(image, output_type="np")
    as_uint8 = (pixels * 255).round().astype("uint8")
    return [{"image": part} for part in np.split(as_uint8, np.cumsum(sizes)[:-1])]


class SchedulerStates:
    """Per-request noise-scheduler state, kept on the worker that initialised it."""

    def __init__(self) -> None:
        self._states: dict[str, Any] = {}

    def create(self, key: str, template: Any) -> Any:
        self._states[key] = copy.deepcopy(template)
        return self._states[key]

    def get(self, key: str) -> Any:
        if key not in self._states:
            raise LookupError(f"no noise-scheduler state {key!r} on this worker")
        return self._states[key]

    def release(self, request_id: str) -> None:
        for key in [k for k in self._states if k.startswith(request_id + "/")]:
            del self._states[key]

    def __len__(self) -> int:
        return len(self._states)


def _next_inputs(scheduler: Any, latents: torch.Tensor, step_index: int) -> Outputs:
    timesteps = scheduler.timesteps
    t = timesteps[min(step_index, len(timesteps) - 1)]
    model_input = scheduler.scale_model_input(latents, t)
    return {
        "latents": latents.numpy(),
        "model_input": model_input.numpy(),
        "timestep": t.numpy(),
    }


def scheduler_init(template: Any, item: Item, states: SchedulerStates) -> Outputs:
    scheduler = states.create(item["state_key"], template)
    scheduler.set_timesteps(item["steps"])
    if len(scheduler.timesteps) != item["iterations"]:
        name, count = type(scheduler).__name__, len(scheduler.timesteps)
        raise ValueError(
            f"{name} makes {count} timesteps for {item['steps']} steps, "
            f"but the workflow's denoise loop has {item['iterations']} iterations (set extra_iterations)"
        )
    factor = item["vae_scale_factor"]
    shape = (1, item["latent_channels"], item["height"] // factor, item["width"] // factor)
    generator = torch.Generator("cpu").manual_seed(item["seed"])
    latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    return _next_inputs(scheduler, latents, 0)


def scheduler_step(template: Any, item: Item, states: SchedulerStates) -> Outputs:
    scheduler = states.get(item["state_key"])
    step_index = item["step_index"]
    if "noise_pred" in item:
        noise = torch.from_numpy(np.array(item["noise_pred"]))
    else:
        uncond = torch.from_numpy(np.array(item["noise_pred_uncond"]))
        cond = torch.from_numpy(np.array(item["noise_pred_cond"]))
        noise = uncond + item["guidance_scale"] * (cond - uncond)
    t = scheduler.timesteps[step_index]
    latents = scheduler.step(noise, t, torch.from_numpy(np.array(item["latents"])), return_dict=False)[0]
    return _next_inputs(scheduler, latents, step_index + 1)


BatchedOp = Callable[[Any, list[Item], torch.device], list[Outputs]]
BATCHED_OPS: dict[tuple[str, str], BatchedOp] = {
    ("text_encoder", "encode"): text_encode,
    ("unet", "denoise"): unet_denoise,
    ("vae", "decode"): vae_decode,
}
StatefulOp = Callable[[Any, Item, SchedulerStates], Outputs]
STATEFUL_OPS: dict[tuple[str, str], StatefulOp] = {
    ("noise_scheduler", "init"): scheduler_init,
    ("noise_scheduler", "step"): scheduler_step,
    ("noise_scheduler", "cfg_step"): scheduler_step,
}
