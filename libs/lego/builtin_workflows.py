"""Ready-made workflows registered by `lego up` and `lego demo`."""

from __future__ import annotations

from collections.abc import Sequence

from lego.v1 import compiler_pb2
from lego.workflow import VAE, LoRA, NoiseScheduler, TextEncoder, UNet, Workflow, denoise_loop

TINY_SD15_TXT2IMG = "tiny-sd15-txt2img"
MAX_PROMPT_CHARS = 2000
MAX_SIDE = 2048
MAX_STEPS = 200


def sd15_txt2img(
    name: str, source: str, *, default_size: int = 512, loras: Sequence[LoRA] = ()
) -> compiler_pb2.WorkflowSpec:
    """SD 1.5 text-to-image with classifier-free guidance (on when guidance_scale > 1)."""
    with Workflow(name, description=f"SD 1.5 text-to-image with CFG ({source})") as wf:
        prompt = wf.input("prompt", str, min_length=1, max_length=MAX_PROMPT_CHARS)
        negative = wf.input("negative_prompt", str, default="", max_length=MAX_PROMPT_CHARS)
        steps = wf.input("steps", int, default=20, minimum=1, maximum=MAX_STEPS)
        guidance = wf.input("guidance_scale", float, default=7.5, minimum=0, maximum=100)
        seed = wf.input("seed", int, default=0, minimum=0, maximum=2**63 - 1)
        height = wf.input("height", int, default=default_size, minimum=8, maximum=MAX_SIDE, multiple_of=8)
        width = wf.input("width", int, default=default_size, minimum=8, maximum=MAX_SIDE, multiple_of=8)
        encoder = TextEncoder(f"{source}:text_encoder")
        latents = denoise_loop(
            UNet(f"{source}:unet"),
            NoiseScheduler(f"{source}:scheduler"),
            prompt_embeds=encoder(prompt),
            negative_prompt_embeds=encoder(negative),
            steps=steps,
            guidance_scale=guidance,
            seed=seed,
            height=height,
            width=width,
            extra_iterations=1,  # SD 1.5's PNDM scheduler (PLMS) repeats one timestep
            loras=loras,
        )
        wf.output("image", VAE(f"{source}:vae").decode(latents))
    return wf.to_spec()


def builtin_workflows() -> list[compiler_pb2.WorkflowSpec]:
    return [sd15_txt2img(TINY_SD15_TXT2IMG, "tiny-sd15", default_size=128)]
