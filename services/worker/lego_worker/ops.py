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

from lego_worker.backend import Item, Outputs, PartSink
from lego_worker.controlnet import controlnet_residuals, unet_denoise_controlled
from lego_worker.flux import (
    FluxTextEncoders,
    control_latents,
    controlnet_residuals_flux,
    init_flow,
    init_flow_from_image,
    resume_flow,
    text_encode_flux,
    transformer_denoise_flux,
    vae_decode_packed,
)
from lego_worker.images import (
    image_load,
    image_load_control,
    image_load_resized,
    vae_encode,
    vae_encode_control,
)
from lego_worker.sd3 import (
    SD3TextEncoders,
    control_samples,
    controlnet_residuals_sd3,
    text_encode_sd3,
    transformer_denoise_sd3,
    vae_encode_copies,
)
from lego_worker.sdxl import text_encode_pooled, unet_denoise_pooled
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
        scaled = torch.cat(latents) / model.config.scaling_factor
        if getattr(model.config, "shift_factor", None) is not None:  # SD3
            scaled = scaled + model.config.shift_factor
        image = model.decode(scaled, return_dict=False)[0]
    pixels = VaeImageProcessor(vae_scale_factor=scale_factor).postprocess(image, output_type="np")
    as_uint8 = (pixels * 255).round().astype("uint8")
    return [{"image": part} for part in np.split(as_uint8, np.cumsum(sizes)[:-1])]


class SchedulerStates:
    """Per-request noise-scheduler state, kept on the worker that initialised it.

    `offset` is the index of the first timestep the request runs (img2img skips the first ones)."""

    def __init__(self) -> None:
        self._states: dict[str, Any] = {}
        self._offsets: dict[str, int] = {}

    def create(self, key: str, template: Any, offset: int = 0) -> Any:
        self._states[key] = copy.deepcopy(template)
        self._offsets[key] = offset
        return self._states[key]

    def get(self, key: str) -> Any:
        if key not in self._states:
            raise LookupError(f"no noise-scheduler state {key!r} on this worker")
        return self._states[key]

    def offset(self, key: str) -> int:
        return self._offsets.get(key, 0)

    def release(self, request_id: str) -> None:
        for key in [k for k in self._states if k.startswith(request_id + "/")]:
            del self._states[key]
            self._offsets.pop(key, None)

    def __len__(self) -> int:
        return len(self._states)


def _next_inputs(scheduler: Any, latents: torch.Tensor, index: int) -> Outputs:
    """The next call's inputs; `index` counts from the scheduler's first timestep."""
    timesteps = scheduler.timesteps
    t = timesteps[min(index, len(timesteps) - 1)]
    scale = getattr(scheduler, "scale_model_input", None)  # flow matching has none
    model_input = scale(latents, t) if scale is not None else latents
    return {
        "latents": latents.numpy(),
        "model_input": model_input.numpy(),
        "timestep": t.numpy(),
    }


def _set_timesteps(template: Any, item: Item, states: SchedulerStates, offset: int) -> Any:
    scheduler = states.create(item["state_key"], template, offset)
    scheduler.set_timesteps(item["steps"])
    count = len(scheduler.timesteps) - offset
    if count != item["iterations"]:
        name = type(scheduler).__name__
        raise ValueError(
            f"{name} makes {count} timesteps for {item['steps']} steps from index {offset}, "
            f"but the workflow's denoise loop has {item['iterations']} iterations (set extra_iterations)"
        )
    if offset and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(offset)
    return scheduler


def _latent_shape(item: Item) -> tuple[int, int, int, int]:
    factor = item["vae_scale_factor"]
    return (1, item["latent_channels"], item["height"] // factor, item["width"] // factor)


def scheduler_init(template: Any, item: Item, states: SchedulerStates) -> Outputs:
    scheduler = _set_timesteps(template, item, states, 0)
    generator = torch.Generator("cpu").manual_seed(item["seed"])
    control = control_samples(item, generator) if "control_dist" in item else None  # SD3 ControlNet
    latents = torch.randn(_latent_shape(item), generator=generator)
    sigma = getattr(scheduler, "init_noise_sigma", None)  # flow matching (SD3) starts from plain noise
    if sigma is not None:
        latents = latents * sigma
    outputs = _next_inputs(scheduler, latents, 0)
    if control is not None:
        outputs["control_samples"] = control.numpy()
    return outputs


def scheduler_init_flow(template: Any, item: Item, states: SchedulerStates) -> Outputs:
    scheduler = states.create(item["state_key"], template)
    generator = torch.Generator("cpu").manual_seed(item["seed"])
    control = control_latents(item, generator) if "control_dist" in item else None
    latents = init_flow(scheduler, item, generator)
    if len(scheduler.timesteps) != item["iterations"]:
        raise ValueError(
            f"{type(scheduler).__name__} makes {len(scheduler.timesteps)} timesteps for "
            f"{item['steps']} steps, but the workflow's denoise loop has {item['iterations']} iterations"
        )
    outputs = _next_inputs(scheduler, latents, 0)
    if control is not None:
        outputs["control_latents"] = control.numpy()
    return outputs


def _resumed_flow(template: Any, item: Item, states: SchedulerStates, start: Callable[..., Any]) -> Outputs:
    """A flow-matching loop begun at timestep index `first_index` from the latents `start` makes."""
    offset = int(item["first_index"])
    scheduler = states.create(item["state_key"], template, offset)
    latents = start(scheduler, item, offset)
    if len(scheduler.timesteps) - offset != item["iterations"]:
        raise ValueError(
            f"{type(scheduler).__name__} makes {len(scheduler.timesteps) - offset} timesteps from index "
            f"{offset}, but the workflow's denoise loop has {item['iterations']} iterations"
        )
    return _next_inputs(scheduler, latents, offset)


def scheduler_init_flow_from_image(template: Any, item: Item, states: SchedulerStates) -> Outputs:
    return _resumed_flow(template, item, states, init_flow_from_image)


def scheduler_init_flow_from_latents(template: Any, item: Item, states: SchedulerStates) -> Outputs:
    """Approximate caching (FLUX.1): resume from a similar request's latent at `first_index`."""
    return _resumed_flow(template, item, states, resume_flow)


def scheduler_init_from_latents(template: Any, item: Item, states: SchedulerStates) -> Outputs:
    """Approximate caching: resume at timestep index `first_index` from a similar request's latent
    there, with a fresh scheduler. One that spends its first timestep twice (PNDM's warm-up:
    [t0, t1, t1, t2, ...]) does so again from there: the timestep after the resumed one is
    repeated, so the loop runs one iteration more than the rest of the exact schedule."""
    offset = int(item["first_index"])
    scheduler = states.create(item["state_key"], template, offset)
    scheduler.set_timesteps(item["steps"])
    timesteps = scheduler.timesteps
    if len(torch.unique(timesteps)) < len(timesteps):
        scheduler.timesteps = torch.cat([timesteps[: offset + 2], timesteps[offset + 1 :]])
    if len(scheduler.timesteps) - offset != item["iterations"]:
        raise ValueError(
            f"{type(scheduler).__name__} resumed at index {offset} makes {len(scheduler.timesteps) - offset} "
            f"timesteps, but the resumed loop has {item['iterations']} iterations"
        )
    return _next_inputs(scheduler, torch.from_numpy(np.array(item["cached_latents"])), offset)


def text_encode_any(model: Any, items: list[Item], device: torch.device) -> list[Outputs]:
    """`encode_pooled` of a family's text-encoder stack: SDXL's CLIP pair or FLUX.1's CLIP + T5."""
    if isinstance(model, FluxTextEncoders):
        return text_encode_flux(model, items, device)
    if isinstance(model, SD3TextEncoders):
        return text_encode_sd3(model, items, device)
    return text_encode_pooled(model, items, device)


def scheduler_init_from_image(template: Any, item: Item, states: SchedulerStates) -> Outputs:
    """img2img: sample the encoded image's latent distribution, then noise it to the first timestep
    (diffusers' img2img `prepare_latents`: one generator, the sample first, then the noise)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    offset = int(item["first_index"])
    scheduler = _set_timesteps(template, item, states, offset)
    generator = torch.Generator("cpu").manual_seed(item["seed"])
    distribution = DiagonalGaussianDistribution(torch.from_numpy(np.array(item["init_latents"])))
    scaling, shift, has_shift = (float(v) for v in np.asarray(item["init_scaling"]).reshape(-1))
    sample = distribution.sample(generator)
    init = (sample - shift) * scaling if has_shift else scaling * sample  # SD3 / SD 1.5, SDXL
    noise = torch.randn(init.shape, generator=generator, dtype=init.dtype)
    timestep = scheduler.timesteps[offset : offset + 1]
    if hasattr(scheduler, "add_noise"):
        latents = scheduler.add_noise(init, noise, timestep)
    else:  # flow matching (SD3)
        latents = scheduler.scale_noise(init, timestep, noise)
    return _next_inputs(scheduler, latents, offset)


def scheduler_step(template: Any, item: Item, states: SchedulerStates) -> Outputs:
    scheduler = states.get(item["state_key"])
    index = states.offset(item["state_key"]) + item["step_index"]
    if "noise_pred" in item:
        noise = torch.from_numpy(np.array(item["noise_pred"]))
    else:
        uncond = torch.from_numpy(np.array(item["noise_pred_uncond"]))
        cond = torch.from_numpy(np.array(item["noise_pred_cond"]))
        noise = uncond + item["guidance_scale"] * (cond - uncond)
    t = scheduler.timesteps[index]
    latents = scheduler.step(noise, t, torch.from_numpy(np.array(item["latents"])), return_dict=False)[0]
    return _next_inputs(scheduler, latents, index + 1)


BatchedOp = Callable[[Any, list[Item], torch.device], list[Outputs]]
BATCHED_OPS: dict[tuple[str, str], BatchedOp] = {
    ("text_encoder", "encode"): text_encode,
    ("unet", "denoise"): unet_denoise,
    ("text_encoder", "encode_pooled"): text_encode_any,
    ("transformer", "denoise_flux"): transformer_denoise_flux,
    ("transformer", "denoise_flux_controlled"): transformer_denoise_flux,
    ("vae", "encode_control"): vae_encode_control,
    ("transformer", "denoise_sd3"): transformer_denoise_sd3,
    ("transformer", "denoise_sd3_controlled"): transformer_denoise_sd3,
    ("vae", "encode_copies"): vae_encode_copies,
    ("vae", "decode_packed"): vae_decode_packed,
    ("unet", "denoise_controlled"): unet_denoise_controlled,
    ("unet", "denoise_pooled"): unet_denoise_pooled,
    ("unet", "denoise_pooled_controlled"): unet_denoise_controlled,
    ("controlnet", "residuals_pooled"): controlnet_residuals,
    ("controlnet", "residuals"): controlnet_residuals,
    ("vae", "decode"): vae_decode,
    ("vae", "encode"): vae_encode,
    ("image", "load"): image_load,
    ("image", "load_control"): image_load_control,
    ("image", "load_resized"): image_load_resized,
}
# ControlNets whose block samples are also handed, block by block, to a part sink while they run
StreamingOp = Callable[[Any, list[Item], torch.device, PartSink | None], list[Outputs]]
STREAMING_OPS: dict[tuple[str, str], StreamingOp] = {
    ("controlnet", "residuals_flux"): controlnet_residuals_flux,
    ("controlnet", "residuals_sd3"): controlnet_residuals_sd3,
}
StatefulOp = Callable[[Any, Item, SchedulerStates], Outputs]
STATEFUL_OPS: dict[tuple[str, str], StatefulOp] = {
    ("noise_scheduler", "init"): scheduler_init,
    ("noise_scheduler", "init_control"): scheduler_init,
    ("noise_scheduler", "init_from_image"): scheduler_init_from_image,
    ("noise_scheduler", "init_flow"): scheduler_init_flow,
    ("noise_scheduler", "init_flow_control"): scheduler_init_flow,
    ("noise_scheduler", "init_flow_from_image"): scheduler_init_flow_from_image,
    ("noise_scheduler", "init_from_latents"): scheduler_init_from_latents,
    ("noise_scheduler", "init_flow_from_latents"): scheduler_init_flow_from_latents,
    ("noise_scheduler", "step"): scheduler_step,
    ("noise_scheduler", "cfg_step"): scheduler_step,
}
