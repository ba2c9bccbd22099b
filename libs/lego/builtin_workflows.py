"""Ready-made workflows: `builtin_workflows()` is registered by `lego up` and `lego demo`; the
builders make the same shapes for any source of the family (a `tiny-*` preset or a diffusers
directory / hub id)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lego.v1 import compiler_pb2
from lego.workflow import (
    VAE,
    AdapterUse,
    ControlNet,
    Handle,
    LoRA,
    NoiseScheduler,
    TextEncoder,
    Transformer,
    UNet,
    Workflow,
    denoise_loop,
    load_control_image,
    load_image,
    load_resized_image,
)

TINY_SD15_TXT2IMG = "tiny-sd15-txt2img"
LEGO_SHAPES_TXT2IMG = "lego-shapes-txt2img"  # the trained shapes demo model (`lego-shapes` preset)
LEGO_SHAPES_GUIDANCE = 2.0  # its best: above 3 its colours fall apart (see its MODEL_CARD.md)
MAX_PROMPT_CHARS = 2000
MAX_SIDE = 2048
MAX_STEPS = 200


@dataclass(frozen=True)
class _CommonInputs:
    prompt: Handle
    negative: Handle
    steps: Handle
    guidance: Handle
    seed: Handle
    height: Handle
    width: Handle


def _common_inputs(wf: Workflow, default_size: int, guidance: float = 7.5) -> _CommonInputs:
    return _CommonInputs(
        prompt=wf.input("prompt", str, min_length=1, max_length=MAX_PROMPT_CHARS),
        negative=wf.input("negative_prompt", str, default="", max_length=MAX_PROMPT_CHARS),
        steps=wf.input("steps", int, default=20, minimum=1, maximum=MAX_STEPS),
        guidance=wf.input("guidance_scale", float, default=guidance, minimum=0, maximum=100),
        seed=wf.input("seed", int, default=0, minimum=0, maximum=2**63 - 1),
        height=wf.input("height", int, default=default_size, minimum=8, maximum=MAX_SIDE, multiple_of=8),
        width=wf.input("width", int, default=default_size, minimum=8, maximum=MAX_SIDE, multiple_of=8),
    )


def _sd15(
    name: str,
    source: str,
    description: str,
    *,
    default_size: int,
    loras: Sequence[LoRA] = (),
    lora_async_steps: int = 0,
    approx_cache: bool = False,
    controlnet: str = "",  # a ControlNet model id
    img2img: bool = False,
    default_guidance: float = 7.5,
) -> compiler_pb2.WorkflowSpec:
    with Workflow(name, description=description) as wf:
        given = _common_inputs(wf, default_size, guidance=default_guidance)
        encoder = TextEncoder(f"{source}:text_encoder")
        adapters = []
        if controlnet:
            image = wf.input("control_image", str, min_length=1)
            scale = wf.input("controlnet_scale", float, default=1.0, minimum=0, maximum=10)
            control = load_control_image(image, given.height, given.width)
            adapters.append(ControlNet(controlnet).apply(control, scale))
        init_latents = strength = None
        vae = VAE(f"{source}:vae")
        if img2img:
            image = wf.input("image", str, min_length=1)
            strength = wf.input("strength", float, default=0.8, minimum=0, maximum=1, exclusive_minimum=True)
            init_latents = vae.encode(load_image(image))
        latents = denoise_loop(
            UNet(f"{source}:unet"),
            NoiseScheduler(f"{source}:scheduler"),
            prompt_embeds=encoder(given.prompt),
            negative_prompt_embeds=encoder(given.negative),
            steps=given.steps,
            guidance_scale=given.guidance,
            seed=given.seed,
            height=given.height,
            width=given.width,
            extra_iterations=1,  # SD 1.5's PNDM scheduler (PLMS) repeats one timestep
            loras=loras,
            lora_async_steps=lora_async_steps,
            approx_cache=approx_cache,
            adapters=adapters,
            init_latents=init_latents,
            strength=strength,
        )
        wf.output("image", vae.decode(latents))
    return wf.to_spec()


def sd15_txt2img(
    name: str,
    source: str,
    *,
    default_size: int = 512,
    loras: Sequence[LoRA] = (),
    lora_async_steps: int = 0,
    approx_cache: bool = False,
    default_guidance: float = 7.5,
) -> compiler_pb2.WorkflowSpec:
    """SD 1.5 text-to-image with classifier-free guidance (on when guidance_scale > 1); with
    `lora_async_steps` K its first K steps may run before its LoRAs have loaded; with
    `approx_cache` a request may start from a similar earlier request's latent."""
    what = "with LoRA " if loras else ""
    return _sd15(
        name,
        source,
        f"SD 1.5 text-to-image {what}with CFG ({source})",
        default_size=default_size,
        loras=loras,
        lora_async_steps=lora_async_steps,
        approx_cache=approx_cache,
        default_guidance=default_guidance,
    )


def sd15_controlnet(
    name: str, source: str, *, controlnet: str = "controlnet_canny", default_size: int = 512
) -> compiler_pb2.WorkflowSpec:
    """SD 1.5 with a ControlNet (input `control_image`: a data: URI or a path; `controlnet_scale`).

    `controlnet` is the component of `source` (`controlnet_canny`, `controlnet_depth`), or a whole
    model id (`lllyasviel/sd-controlnet-canny:controlnet`) when it contains a colon."""
    model = controlnet if ":" in controlnet else f"{source}:{controlnet}"
    description = f"SD 1.5 with ControlNet {model} ({source})"
    return _sd15(name, source, description, default_size=default_size, controlnet=model)


def sd15_img2img(name: str, source: str, *, default_size: int = 512) -> compiler_pb2.WorkflowSpec:
    """SD 1.5 image-to-image (input `image`: a data: URI or a path; `strength` in (0, 1])."""
    return _sd15(name, source, f"SD 1.5 image-to-image ({source})", default_size=default_size, img2img=True)


def _pooled_family(
    name: str,
    source: str,
    family: str,
    *,
    default_size: int,
    loras: Sequence[LoRA] = (),
    controlnet: str = "",
    img2img: bool = False,
) -> compiler_pb2.WorkflowSpec:
    """SDXL (a UNet) or SD3 (a transformer): a text-encoder stack with pooled embeddings, CFG,
    one iteration per step; optionally a ControlNet or img2img."""
    sd3 = family == "sd3"
    what = "image-to-image" if img2img else "text-to-image"
    with Workflow(name, description=f"{family.upper()} {what} with CFG ({source})") as wf:
        given = _common_inputs(wf, default_size, guidance=7.0 if sd3 else 5.0)
        adapters = _controlnet_inputs(wf, given, source, controlnet, sd3) if controlnet else []
        encoders = TextEncoder(f"{source}:text_encoders")
        embeds, pooled = encoders.encode_pooled(given.prompt)
        negative_embeds, negative_pooled = encoders.encode_pooled(given.negative)
        vae = VAE(f"{source}:vae")
        init_latents = strength = None
        if img2img:
            image = wf.input("image", str, min_length=1)
            strength = wf.input("strength", float, default=0.6, minimum=0, maximum=1, exclusive_minimum=True)
            # SD3 resizes the image to the request's size; SDXL keeps its own
            pixels = load_resized_image(image, given.height, given.width) if sd3 else load_image(image)
            init_latents = vae.encode(pixels)
        latents = denoise_loop(
            Transformer(f"{source}:transformer") if sd3 else UNet(f"{source}:unet"),
            NoiseScheduler(f"{source}:scheduler"),
            prompt_embeds=embeds,
            negative_prompt_embeds=negative_embeds,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled,
            steps=given.steps,
            guidance_scale=given.guidance,
            seed=given.seed,
            height=given.height,
            width=given.width,
            loras=loras,
            adapters=adapters,
            init_latents=init_latents,
            strength=strength,
        )
        wf.output("image", vae.decode(latents))
    return wf.to_spec()


def sdxl_txt2img(
    name: str, source: str, *, default_size: int = 1024, loras: Sequence[LoRA] = (), controlnet: str = ""
) -> compiler_pb2.WorkflowSpec:
    """SDXL text-to-image with CFG: CLIP-L + CLIP-G (`<source>:text_encoders`), pooled embeddings
    and size conditioning, Euler (as many iterations as steps). With `controlnet` (a component of
    `source` such as `controlnet_canny`, or a whole model id): inputs `control_image`, `controlnet_scale`."""
    return _pooled_family(name, source, "sdxl", default_size=default_size, loras=loras, controlnet=controlnet)


def sdxl_img2img(name: str, source: str, *, default_size: int = 1024) -> compiler_pb2.WorkflowSpec:
    """SDXL image-to-image (inputs `image`: a data: URI or a path; `strength` in (0, 1])."""
    return _pooled_family(name, source, "sdxl", default_size=default_size, img2img=True)


def _controlnet_inputs(
    wf: Workflow, given: _CommonInputs, source: str, controlnet: str, sd3: bool = False
) -> list[AdapterUse]:
    model = controlnet if ":" in controlnet else f"{source}:{controlnet}"
    image = wf.input("control_image", str, min_length=1)
    scale = wf.input("controlnet_scale", float, default=1.0, minimum=0, maximum=10)
    if sd3:  # conditioned on the control image's VAE latents, the image resized as the pipeline does
        pixels = load_resized_image(image, given.height, given.width)
        return [ControlNet(model).apply_sd3(VAE(f"{source}:vae").encode_control(pixels), scale)]
    return [ControlNet(model).apply(load_control_image(image, given.height, given.width), scale)]


def sd3_txt2img(
    name: str, source: str, *, default_size: int = 1024, loras: Sequence[LoRA] = (), controlnet: str = ""
) -> compiler_pb2.WorkflowSpec:
    """SD3 / SD3.5 text-to-image with CFG: CLIP-L + CLIP-G + T5 (`<source>:text_encoders`), the
    MMDiT transformer, flow-matching Euler (one iteration per step), a shifted VAE. With
    `controlnet` (a component of `source` such as `controlnet_canny`, or a whole model id): inputs
    `control_image`, `controlnet_scale`."""
    return _pooled_family(name, source, "sd3", default_size=default_size, loras=loras, controlnet=controlnet)


def sd3_img2img(name: str, source: str, *, default_size: int = 1024) -> compiler_pb2.WorkflowSpec:
    """SD3 / SD3.5 image-to-image (the image is resized to height x width; `strength` in (0, 1])."""
    return _pooled_family(name, source, "sd3", default_size=default_size, img2img=True)


def flux_txt2img(
    name: str,
    source: str,
    *,
    default_size: int = 1024,
    default_steps: int = 28,
    default_guidance: float = 3.5,
    loras: Sequence[LoRA] = (),
    controlnet: str = "",
    img2img: bool = False,
) -> compiler_pb2.WorkflowSpec:
    """FLUX.1 text-to-image (dev: guidance embedded in the transformer; schnell: 4 steps, ignored):
    CLIP + T5 (`<source>:text_encoders`), one branch per step, flow-matching Euler, packed latents."""
    with Workflow(name, description=f"FLUX.1 text-to-image ({source})") as wf:
        prompt = wf.input("prompt", str, min_length=1, max_length=MAX_PROMPT_CHARS)
        steps = wf.input("steps", int, default=default_steps, minimum=1, maximum=MAX_STEPS)
        guidance = wf.input("guidance_scale", float, default=default_guidance, minimum=0, maximum=100)
        seed = wf.input("seed", int, default=0, minimum=0, maximum=2**63 - 1)
        height = wf.input("height", int, default=default_size, minimum=16, maximum=MAX_SIDE, multiple_of=16)
        width = wf.input("width", int, default=default_size, minimum=16, maximum=MAX_SIDE, multiple_of=16)
        embeds, pooled = TextEncoder(f"{source}:text_encoders").encode_pooled(prompt)
        vae = VAE(f"{source}:vae")
        adapters = []
        if controlnet:  # conditioned on the control image's VAE latents (InstantX layout)
            image = wf.input("control_image", str, min_length=1)
            scale = wf.input("controlnet_scale", float, default=1.0, minimum=0, maximum=10)
            model = controlnet if ":" in controlnet else f"{source}:{controlnet}"
            latents_of_image = vae.encode_control(load_resized_image(image, height, width))
            adapters.append(ControlNet(model).apply_latents(latents_of_image, scale))
        init_latents = strength = None
        if img2img:  # the image resized to height x width, as FluxImg2ImgPipeline does
            image = wf.input("image", str, min_length=1)
            strength = wf.input("strength", float, default=0.6, minimum=0, maximum=1, exclusive_minimum=True)
            init_latents = vae.encode(load_resized_image(image, height, width))
        latents = denoise_loop(
            Transformer(f"{source}:transformer"),
            NoiseScheduler(f"{source}:scheduler"),
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            steps=steps,
            guidance_scale=guidance,
            seed=seed,
            height=height,
            width=width,
            guidance="embedded",
            loras=loras,
            adapters=adapters,
            init_latents=init_latents,
            strength=strength,
        )
        wf.output("image", vae.decode_packed(latents, height, width))
    return wf.to_spec()


def flux_img2img(name: str, source: str, *, default_size: int = 1024) -> compiler_pb2.WorkflowSpec:
    """FLUX.1 image-to-image (inputs `image`, resized to height x width; `strength` in (0, 1])."""
    return flux_txt2img(name, source, default_size=default_size, img2img=True)


def builtin_workflows() -> list[compiler_pb2.WorkflowSpec]:
    """The tiny preset of each family, so a fresh cluster serves every family at once."""
    return [
        sd15_txt2img(TINY_SD15_TXT2IMG, "tiny-sd15", default_size=128),
        sdxl_txt2img("tiny-sdxl-txt2img", "tiny-sdxl", default_size=64),
        sd3_txt2img("tiny-sd3-txt2img", "tiny-sd3", default_size=64),
        flux_txt2img("tiny-flux-dev-txt2img", "tiny-flux-dev", default_size=64),
        flux_txt2img(
            "tiny-flux-schnell-txt2img",
            "tiny-flux-schnell",
            default_size=64,
            default_steps=4,
            default_guidance=0.0,
        ),
        sd15_txt2img(
            LEGO_SHAPES_TXT2IMG, "lego-shapes", default_size=64, default_guidance=LEGO_SHAPES_GUIDANCE
        ),
    ]
