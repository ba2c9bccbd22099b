"""Operator signatures: names, execution modes, typed inputs and outputs. No torch here.

Implementations live in the worker (lego_worker.ops); the compiler and coordinator only need these.
Every port (input or output) has a type; an edge is valid only between ports of the same type
(an int may feed a float). Scalar types are those of workflow inputs: string, int, float, bool.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Port types. Scalars travel inline; the others are tensors moved by the data engine.
STRING, INT, FLOAT, BOOL = "string", "int", "float", "bool"
EMBEDDINGS = "embeddings"  # text-encoder hidden states
LATENTS = "latents"  # a latent image (B, C, h, w)
LATENT_DIST = "latent_dist"  # a VAE encoder's Gaussian parameters (B, 2C, h, w): sampled per request
TIMESTEP = "timestep"
NOISE = "noise"  # a denoiser's prediction
IMAGE = "image"  # decoded uint8 RGB pixels (B, H, W, 3): a workflow output
PIXELS = "pixels"  # a preprocessed image for the VAE encoder, float in [-1, 1], (B, 3, H, W)
CONTROL_IMAGE = "control_image"  # a preprocessed ControlNet conditioning image, float in [0, 1]
RESIDUALS = "residuals"  # ControlNet residuals of the denoiser's down blocks, packed (B, N)
MID_RESIDUAL = "mid_residual"  # ControlNet residual of the denoiser's mid block
LATENT_SCALING = "latent_scaling"  # a VAE's [scaling factor, shift factor, has shift]
POOLED = "pooled_embeddings"  # a text encoder's pooled (projected) embedding (SDXL, SD3, FLUX)


def compatible(source: str, target: str) -> bool:
    """Whether a value of type `source` may feed a port of type `target`."""
    return source == target or (source == INT and target == FLOAT)


@dataclass(frozen=True)
class ModeSignature:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    stateful: bool = False  # keeps per-request state on the worker that ran the first call
    types: Mapping[str, str] = field(default_factory=dict)  # port name → type (inputs and outputs)
    deferred: tuple[str, ...] = ()  # inputs a call may start without (lazy: awaited inside the call)
    # outputs stacked on dim 1 whose parts are published one by one while the call runs (a
    # ControlNet's block samples), and deferred inputs a call consumes part by part as they arrive
    streamed: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()


_SCHEDULER_OUT = ("latents", "model_input", "timestep")
_COMMON_TYPES = {
    "text": STRING,
    "embeddings": EMBEDDINGS,
    "sample": LATENTS,
    "model_input": LATENTS,
    "latents": LATENTS,
    "timestep": TIMESTEP,
    "encoder_hidden_states": EMBEDDINGS,
    "noise_pred": NOISE,
    "noise_pred_uncond": NOISE,
    "noise_pred_cond": NOISE,
    "step_index": INT,
    "guidance_scale": FLOAT,
    "seed": INT,
    "height": INT,
    "width": INT,
    "steps": INT,
    "iterations": INT,
    "latent_channels": INT,
    "vae_scale_factor": INT,
    "image": IMAGE,
    "pixels": PIXELS,
    "latent_dist": LATENT_DIST,
    "control_image": CONTROL_IMAGE,
    "conditioning_scale": FLOAT,
    "down_residuals": RESIDUALS,
    "mid_residual": MID_RESIDUAL,
    "strength": FLOAT,
    "latent_scaling": LATENT_SCALING,
    "init_scaling": LATENT_SCALING,
    "init_latents": LATENT_DIST,
    "first_index": INT,
    "cached_latents": LATENTS,
    "control_dist": LATENT_DIST,
    "control_scaling": LATENT_SCALING,
    "control_latents": LATENTS,
    "control_samples": LATENTS,
    "control_row": INT,
    "copies": INT,
    "block_samples": RESIDUALS,
    "single_block_samples": RESIDUALS,
    "pooled": POOLED,
    "pooled_embeds": POOLED,
}


def _mode(
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    *,
    stateful: bool = False,
    overrides: Mapping[str, str] | None = None,
    deferred: tuple[str, ...] = (),
    streamed: tuple[str, ...] = (),
    parts: tuple[str, ...] = (),
) -> ModeSignature:
    types = {name: _COMMON_TYPES[name] for name in (*inputs, *outputs) if name in _COMMON_TYPES}
    types.update(overrides or {})
    return ModeSignature(inputs, outputs, stateful, types, deferred, streamed, parts)


_DENOISE_IN = ("sample", "timestep", "encoder_hidden_states")
_INIT_IN = ("seed", "height", "width", "steps", "iterations", "latent_channels", "vae_scale_factor")

SIGNATURES: dict[str, dict[str, ModeSignature]] = {
    "text_encoder": {
        "encode": _mode(("text",), ("embeddings",)),
        # a family's text-encoder stack (SDXL: CLIP-L + CLIP-G): one call, hidden states + pooled
        "encode_pooled": _mode(("text",), ("embeddings", "pooled")),
    },
    "unet": {
        "denoise": _mode(_DENOISE_IN, ("noise_pred",)),
        # with a ControlNet's residuals; they may arrive after the call was placed (deferred)
        "denoise_controlled": _mode(
            (*_DENOISE_IN, "down_residuals", "mid_residual"),
            ("noise_pred",),
            deferred=("down_residuals", "mid_residual"),
        ),
        # SDXL: pooled text embeddings and size conditioning (time ids from the sample's size)
        "denoise_pooled": _mode((*_DENOISE_IN, "pooled_embeds"), ("noise_pred",)),
        "denoise_pooled_controlled": _mode(
            (*_DENOISE_IN, "pooled_embeds", "down_residuals", "mid_residual"),
            ("noise_pred",),
            deferred=("down_residuals", "mid_residual"),
        ),
    },
    # FLUX.1: a transformer over packed 2x2 latent patches; guidance is embedded (dev) or ignored
    # (schnell), never CFG; height and width give the patches' positions
    "transformer": {
        # SD3 / 3.5: CFG branches like the UNets, pooled embeddings as pooled projections
        "denoise_sd3": _mode((*_DENOISE_IN, "pooled_embeds"), ("noise_pred",)),
        "denoise_sd3_controlled": _mode(
            (*_DENOISE_IN, "pooled_embeds", "block_samples"),
            ("noise_pred",),
            deferred=("block_samples",),
            parts=("block_samples",),
        ),
        "denoise_flux": _mode(
            (*_DENOISE_IN, "pooled_embeds", "guidance_scale", "height", "width"), ("noise_pred",)
        ),
        "denoise_flux_controlled": _mode(
            (
                *_DENOISE_IN,
                "pooled_embeds",
                "guidance_scale",
                "height",
                "width",
                "block_samples",
                "single_block_samples",
            ),
            ("noise_pred",),
            deferred=("block_samples", "single_block_samples"),
            parts=("block_samples", "single_block_samples"),
        ),
    },
    "controlnet": {
        "residuals": _mode(
            (*_DENOISE_IN, "control_image", "conditioning_scale"), ("down_residuals", "mid_residual")
        ),
        # FLUX.1: block samples for the transformer's double and single blocks (stacked on dim 1)
        "residuals_flux": _mode(
            (
                *_DENOISE_IN,
                "pooled_embeds",
                "guidance_scale",
                "height",
                "width",
                "control_latents",
                "conditioning_scale",
            ),
            ("block_samples", "single_block_samples"),
            streamed=("block_samples", "single_block_samples"),
        ),
        "residuals_pooled": _mode(  # SDXL
            (*_DENOISE_IN, "pooled_embeds", "control_image", "conditioning_scale"),
            ("down_residuals", "mid_residual"),
        ),
        # SD3 / 3.5: block samples for the transformer's blocks (stacked on dim 1), conditioned on
        # row `control_row` of the control image's sampled latents (the ControlNet shifts and scales
        # it as its configuration says)
        "residuals_sd3": _mode(
            (
                *_DENOISE_IN,
                "pooled_embeds",
                "control_samples",
                "control_row",
                "control_scaling",
                "conditioning_scale",
            ),
            ("block_samples",),
            streamed=("block_samples",),
        ),
    },
    "noise_scheduler": {
        "init": _mode(_INIT_IN, _SCHEDULER_OUT, stateful=True),
        # img2img: noise added to the encoded image at the timestep where `strength` starts
        "init_from_image": _mode(
            (*_INIT_IN, "init_latents", "init_scaling", "first_index"), _SCHEDULER_OUT, stateful=True
        ),
        # flow matching over packed latents (FLUX.1): sigmas 1 → 1/steps, shifted by the image size
        "init_flow": _mode(_INIT_IN, _SCHEDULER_OUT, stateful=True),
        # FLUX.1 ControlNet: sample the control image's latents first (the request's generator),
        # then the noise, as FluxControlNetPipeline does
        "init_flow_from_image": _mode(  # FLUX.1 img2img
            (*_INIT_IN, "init_latents", "init_scaling", "first_index"), _SCHEDULER_OUT, stateful=True
        ),
        # approximate caching: resume at timestep index `first_index` from the latent a similar
        # request had there (no noise added: it is already at that timestep's noise level)
        "init_from_latents": _mode(
            (*_INIT_IN, "cached_latents", "first_index"), _SCHEDULER_OUT, stateful=True
        ),
        "init_flow_from_latents": _mode(
            (*_INIT_IN, "cached_latents", "first_index"), _SCHEDULER_OUT, stateful=True
        ),
        "init_flow_control": _mode(
            (*_INIT_IN, "control_dist", "control_scaling"),
            (*_SCHEDULER_OUT, "control_latents"),
            stateful=True,
        ),
        # SD3 ControlNet: sample the control image's latents (one row per CFG branch) first, then
        # the noise, with the request's generator, as StableDiffusion3ControlNetPipeline does when
        # its generator is torch's global one
        "init_control": _mode(
            (*_INIT_IN, "control_dist"), (*_SCHEDULER_OUT, "control_samples"), stateful=True
        ),
        "step": _mode(("noise_pred", "latents", "step_index"), _SCHEDULER_OUT, stateful=True),
        "cfg_step": _mode(
            ("noise_pred_uncond", "noise_pred_cond", "latents", "step_index", "guidance_scale"),
            _SCHEDULER_OUT,
            stateful=True,
        ),
    },
    "vae": {
        "decode": _mode(("latents",), ("image",)),
        "encode": _mode(("pixels",), ("latent_dist", "latent_scaling")),
        # as FluxControlNetPipeline encodes its control image (contiguous, where img2img pipelines
        # pass the image processor's channels-last view: the convolutions round differently)
        "encode_control": _mode(("pixels",), ("latent_dist", "latent_scaling")),
        "decode_packed": _mode(("latents", "height", "width"), ("image",)),  # FLUX.1
        # `copies` copies of the image in one call, as StableDiffusion3ControlNetPipeline encodes its
        # control image (one per CFG branch: a batch of 2 rounds differently from a batch of 1)
        "encode_copies": _mode(("pixels", "copies"), ("latent_dist", "latent_scaling")),
    },
    # Image preprocessing (no model weights): a string is a data: URI (base64 PNG/JPEG) or a path.
    "image": {
        "load": _mode(("image",), ("pixels",), overrides={"image": STRING}),
        "load_resized": _mode(("image", "height", "width"), ("pixels",), overrides={"image": STRING}),
        "load_control": _mode(("image", "height", "width"), ("control_image",), overrides={"image": STRING}),
    },
}
IMAGE_MODEL = "builtin:image"  # the model id of the image operator (nothing to load)

# First-class constructs that exist only in templates; instantiation unrolls them into model calls.
DENOISE_LOOP = "denoise_loop"
DENOISE_LOOP_INPUTS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "steps",
    "guidance_scale",
    "seed",
    "height",
    "width",
)
# Optional groups of loop inputs, each all or nothing: img2img; pooled embeddings (SDXL).
DENOISE_LOOP_OPTIONAL_GROUPS = (
    ("init_latents", "init_scaling", "strength"),
    ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
)
DENOISE_LOOP_OPTIONAL = tuple(name for group in DENOISE_LOOP_OPTIONAL_GROUPS for name in group)
DENOISE_LOOP_TYPES = {
    "prompt_embeds": EMBEDDINGS,
    "negative_prompt_embeds": EMBEDDINGS,
    "steps": INT,
    "guidance_scale": FLOAT,
    "seed": INT,
    "height": INT,
    "width": INT,
    "init_latents": LATENT_DIST,
    "init_scaling": LATENT_SCALING,
    "strength": FLOAT,
    "pooled_prompt_embeds": POOLED,
    "negative_pooled_prompt_embeds": POOLED,
    "latents": LATENTS,
}
DENOISE_LOOP_ATTRIBUTES = ("scheduler", "latent_channels", "vae_scale_factor")
# attribute "guidance": "cfg" (default: two branches when guidance_scale > 1) or "embedded" (FLUX.1:
# one branch, guidance_scale goes to the denoiser; no negative prompt)
EMBEDDED_GUIDANCE_INPUTS = (
    "prompt_embeds",
    "pooled_prompt_embeds",
    "steps",
    "guidance_scale",
    "seed",
    "height",
    "width",
)
# Adapters of a denoise loop: kind → its inputs and their types (called once per step and branch).
ADAPTERS = {
    "controlnet": {"control_image": CONTROL_IMAGE, "conditioning_scale": FLOAT},
    # FLUX.1: the control image's VAE latents, sampled per request by the scheduler init
    "flux_controlnet": {
        "control_dist": LATENT_DIST,
        "control_scaling": LATENT_SCALING,
        "conditioning_scale": FLOAT,
    },
    # SD3 / 3.5: the same inputs, from a `VAE.encode_control` node, which the loop runs again per
    # request with one copy of the image per CFG branch
    "sd3_controlnet": {
        "control_dist": LATENT_DIST,
        "control_scaling": LATENT_SCALING,
        "conditioning_scale": FLOAT,
    },
}


def signature(op: str, mode: str) -> ModeSignature:
    modes = SIGNATURES.get(op)
    if modes is None:
        raise KeyError(f"unknown operator {op!r} (known: {sorted([*SIGNATURES, DENOISE_LOOP])})")
    if mode not in modes:
        raise KeyError(f"operator {op!r} has no mode {mode!r} (modes: {sorted(modes)})")
    return modes[mode]
