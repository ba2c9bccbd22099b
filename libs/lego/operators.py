"""Operator signatures: names, execution modes, typed inputs and outputs. No torch here.

Implementations live in the worker (lego_worker.ops); the compiler and coordinator only need these.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModeSignature:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    stateful: bool = False  # keeps per-request state on the worker that ran the first call


SIGNATURES: dict[str, dict[str, ModeSignature]] = {
    "text_encoder": {"encode": ModeSignature(("text",), ("embeddings",))},
    "unet": {
        "denoise": ModeSignature(("sample", "timestep", "encoder_hidden_states"), ("noise_pred",)),
    },
    "noise_scheduler": {
        "init": ModeSignature(
            ("seed", "height", "width", "steps", "iterations", "latent_channels", "vae_scale_factor"),
            ("latents", "model_input", "timestep"),
            stateful=True,
        ),
        "step": ModeSignature(
            ("noise_pred", "latents", "step_index"), ("latents", "model_input", "timestep"), stateful=True
        ),
        "cfg_step": ModeSignature(
            ("noise_pred_uncond", "noise_pred_cond", "latents", "step_index", "guidance_scale"),
            ("latents", "model_input", "timestep"),
            stateful=True,
        ),
    },
    "vae": {"decode": ModeSignature(("latents",), ("image",))},
}

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
DENOISE_LOOP_ATTRIBUTES = ("scheduler", "latent_channels", "vae_scale_factor")


def signature(op: str, mode: str) -> ModeSignature:
    modes = SIGNATURES.get(op)
    if modes is None:
        raise KeyError(f"unknown operator {op!r} (known: {sorted([*SIGNATURES, DENOISE_LOOP])})")
    if mode not in modes:
        raise KeyError(f"operator {op!r} has no mode {mode!r} (modes: {sorted(modes)})")
    return modes[mode]
