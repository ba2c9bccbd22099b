"""ComfyUI API-format import (pure): `{"<id>": {"class_type": ..., "inputs": {...}}}` → our IR.

The translation builds the workflow with the Python API, so a ComfyUI workflow and the same workflow
written in Python give the same IR. The main KSampler's settings become request inputs whose
defaults are the values saved in the file: `prompt` and `negative_prompt` (its CLIPTextEncode
texts), `seed`, `steps`, `guidance_scale` (cfg), `height` and `width` (EmptyLatentImage), `strength`
(denoise, img2img only), and one input per LoadImage (`image`, then `image_<id>`).

Semantics kept from diffusers, not ComfyUI: the denoise loop uses the checkpoint family's own
scheduler (PNDM for SD 1.5) whatever `sampler_name`/`scheduler` say; a ControlNet steers both CFG
branches (ControlNetApply on the positive conditioning is read as "this KSampler uses it");
LoraLoader patches the denoiser only (its `strength_clip` is not applied). Families come from the
checkpoint (model map): SD 1.5 and SDXL (ControlNets too), SD3 (CFG on the transformer; a
ControlNet is conditioned on the control image's VAE latents), FLUX.1 (KSampler's cfg must be 1.0;
FluxGuidance's value, default 3.5, becomes `guidance_scale`; the negative conditioning is not
used; a ControlNet is conditioned on the control image's VAE latents); img2img (VAEEncode +
denoise < 1) encodes the image at its own size, for SD 1.5, SDXL and SD3 (not FLUX.1 yet).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from lego.v1 import compiler_pb2
from lego.workflow import (
    VAE,
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

from lego_compiler.model_map import Checkpoint, ModelMap, ModelMapError

SUPPORTED_FAMILIES = {"sd15", "sdxl", "sd3", "flux"}
FLUX_DEFAULT_GUIDANCE = 3.5  # ComfyUI's FluxGuidance default
# The longest chain of links followed from an output: deeper is refused, not a stack overflow.
MAX_LINK_DEPTH = 100
INT64 = (-(2**63), 2**63 - 1)  # an int widget's value becomes a lego.v1.Value


class ComfyUIError(ValueError):
    """A workflow that cannot be imported; `errors` name the node (id and class) and the input."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class _Model:
    checkpoint: Checkpoint
    loras: tuple[LoRA, ...] = ()


@dataclass(frozen=True)
class _Clip:
    checkpoint: Checkpoint


@dataclass(frozen=True)
class _Vae:
    checkpoint: Checkpoint


@dataclass(frozen=True)
class _Control:
    model: str  # a ControlNet model id


@dataclass(frozen=True)
class _Conditioning:
    embeds: Handle
    pooled: Handle | None = None  # SDXL, SD3, FLUX
    control: tuple[str, Handle, float] | None = None  # (model id, image input, strength)
    guidance: float | None = None  # FLUX (FluxGuidance)


@dataclass(frozen=True)
class _Image:
    source: Handle  # a string workflow input (LoadImage) — or decoded pixels
    decoded: bool = False


@dataclass(frozen=True)
class _Latent:
    height: Handle | int
    width: Handle | int
    init: Handle | None = None  # a VAE encoder's latent distribution (img2img)


@dataclass(frozen=True)
class _Sampled:
    latents: Handle
    checkpoint: Checkpoint
    height: Handle | int = 0  # FLUX: the packed latents' image size
    width: Handle | int = 0


@dataclass
class _Roles:
    """Which ComfyUI values become named request inputs (those of the main KSampler)."""

    sampler: str = ""
    texts: dict[str, str] = field(default_factory=dict)  # CLIPTextEncode id → input name
    latent: str = ""  # its EmptyLatentImage id


_KINDS: dict[type, str] = {
    _Model: "MODEL",
    _Clip: "CLIP",
    _Vae: "VAE",
    _Control: "CONTROL_NET",
    _Conditioning: "CONDITIONING",
    _Image: "IMAGE",
    _Latent: "LATENT",
    _Sampled: "a sampled LATENT (chaining samplers is not supported)",
}


def _ref(value: Any) -> tuple[str, int] | None:
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
        return str(value[0]), value[1]
    return None


class _Translator:
    def __init__(self, prompt: dict[str, Any], model_map: ModelMap, workflow: Workflow) -> None:
        self.prompt = prompt
        self.map = model_map
        self.wf = workflow
        self.memo: dict[str, tuple[Any, ...]] = {}
        self.evaluating: list[str] = []  # the nodes being evaluated, outermost first (cycles, depth)
        self.images = 0
        self.roles = _Roles()
        self.handlers: dict[str, Callable[[str, dict[str, Any]], tuple[Any, ...]]] = {
            "CheckpointLoaderSimple": self.checkpoint,
            "CLIPTextEncode": self.text_encode,
            "EmptyLatentImage": self.empty_latent,
            "KSampler": self.ksampler,
            "KSamplerAdvanced": self.ksampler_advanced,
            "VAEDecode": self.vae_decode,
            "VAEEncode": self.vae_encode,
            "LoadImage": self.load_image,
            "LoraLoader": self.lora,
            "LoraLoaderModelOnly": self.lora,
            "ControlNetLoader": self.controlnet_loader,
            "ControlNetApply": self.controlnet_apply,
            "ControlNetApplyAdvanced": self.controlnet_apply_advanced,
            "FluxGuidance": self.flux_guidance,
        }

    # ---- plumbing ----

    def where(self, node_id: str) -> str:
        return f"node {node_id} ({self.prompt[node_id].get('class_type')})"

    def fail(self, node_id: str, message: str) -> ComfyUIError:
        return ComfyUIError([f"{self.where(node_id)}: {message}"])

    def raw(self, node_id: str, inputs: dict[str, Any], name: str) -> Any:
        if name not in inputs:
            raise self.fail(node_id, f"missing input {name!r}")
        return inputs[name]

    def widget(self, node_id: str, inputs: dict[str, Any], name: str, kind: type) -> Any:
        value = self.raw(node_id, inputs, name)
        if _ref(value) is not None:
            raise self.fail(
                node_id, f"input {name!r} must be a value, not a link (links to widgets are not supported)"
            )
        huge = isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]
        if kind is float and isinstance(value, int) and not isinstance(value, bool) and not huge:
            value = float(value)  # float() of a huge int raises
        if huge and kind in (int, float):  # a lego.v1.Value holds 64 bits
            raise self.fail(node_id, f"input {name!r} must be a 64-bit {kind.__name__}, got {_show(value)}")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(node_id, f"input {name!r} must be {kind.__name__}, got {_show(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(node_id, f"input {name!r} must be a finite number, got {value}")
        return value

    def link(self, node_id: str, inputs: dict[str, Any], name: str, expected: type) -> Any:
        value = self.raw(node_id, inputs, name)
        ref = _ref(value)
        if ref is None:
            raise self.fail(
                node_id, f"input {name!r} must be a link [node_id, output_index], got {_show(value)}"
            )
        source, index = ref
        if source not in self.prompt:
            raise self.fail(node_id, f"input {name!r} links to node {source[:80]}, which does not exist")
        if self.prompt[source]["class_type"] not in self.handlers:  # SaveImage, PreviewImage
            raise self.fail(node_id, f"input {name!r} links to {self.where(source)}, which has no outputs")
        if source in self.evaluating:
            raise self.fail(node_id, f"input {name!r} links to {self.where(source)}: the links form a cycle")
        if len(self.evaluating) >= MAX_LINK_DEPTH:
            raise self.fail(node_id, f"links nest deeper than {MAX_LINK_DEPTH} nodes")
        outputs = self.evaluate(source)
        if not 0 <= index < len(outputs):
            raise self.fail(
                node_id,
                f"input {name!r} links to output {index} of {self.where(source)}, which has {len(outputs)}",
            )
        result = outputs[index]
        if not isinstance(result, expected):
            raise self.fail(
                node_id,
                f"input {name!r} expects {_KINDS[expected]}, got {_KINDS.get(type(result), 'nothing')} "
                f"from output {index} of {self.where(source)}",
            )
        return result

    def evaluate(self, node_id: str) -> tuple[Any, ...]:
        if node_id not in self.memo:
            node = self.prompt[node_id]
            self.evaluating.append(node_id)
            try:
                self.memo[node_id] = self.handlers[node["class_type"]](node_id, node.get("inputs", {}))
            finally:
                self.evaluating.pop()
        return self.memo[node_id]

    def request_input(self, name: str, default: Any, kind: type, **limits: Any) -> Handle:
        return self.wf.input(name, kind, default=default, **limits)

    # ---- node classes ----

    def checkpoint(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        name = self.widget(node_id, inputs, "ckpt_name", str)
        try:
            checkpoint = self.map.checkpoint(name)
        except ModelMapError as error:
            raise self.fail(node_id, str(error)) from None
        if checkpoint.family not in SUPPORTED_FAMILIES:
            raise self.fail(
                node_id,
                f"checkpoint {name!r} is {checkpoint.family}; "
                f"the compiler supports {sorted(SUPPORTED_FAMILIES)} today",
            )
        return (_Model(checkpoint), _Clip(checkpoint), _Vae(checkpoint))

    def lora(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        model = self.link(node_id, inputs, "model", _Model)
        name = self.widget(node_id, inputs, "lora_name", str)
        strength = self.widget(node_id, inputs, "strength_model", float)
        try:
            path = self.map.lora(name)
        except ModelMapError as error:
            raise self.fail(node_id, str(error)) from None
        patched = _Model(model.checkpoint, (*model.loras, LoRA(path, strength)))
        if self.prompt[node_id]["class_type"] == "LoraLoaderModelOnly":
            return (patched,)
        return (patched, self.link(node_id, inputs, "clip", _Clip))

    def text_encode(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        clip = self.link(node_id, inputs, "clip", _Clip).checkpoint
        text = self.widget(node_id, inputs, "text", str)
        name = self.roles.texts.get(node_id, "")
        value: Handle | str = self.request_input(name, text, str, max_length=2000) if name else text
        if clip.family == "sd15":
            return (_Conditioning(TextEncoder(f"{clip.source}:text_encoder")(value)),)
        embeds, pooled = TextEncoder(f"{clip.source}:text_encoders").encode_pooled(value)
        return (_Conditioning(embeds, pooled),)

    def flux_guidance(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        conditioning = self.link(node_id, inputs, "conditioning", _Conditioning)
        return (replace(conditioning, guidance=self.widget(node_id, inputs, "guidance", float)),)

    def empty_latent(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        width = self.widget(node_id, inputs, "width", int)
        height = self.widget(node_id, inputs, "height", int)
        if self.widget(node_id, inputs, "batch_size", int) != 1:
            raise self.fail(node_id, "batch_size must be 1 (send one request per image)")
        if node_id == self.roles.latent:
            limits = {"minimum": 8, "maximum": 2048, "multiple_of": 8}
            return (
                _Latent(
                    self.request_input("height", height, int, **limits),
                    self.request_input("width", width, int, **limits),
                ),
            )
        return (_Latent(height, width),)

    def load_image(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        name = self.widget(node_id, inputs, "image", str)
        self.images += 1
        handle = self.request_input(
            "image" if self.images == 1 else f"image_{node_id}", name, str, min_length=1
        )
        return (_Image(handle), None)  # IMAGE, MASK (the mask is not supported)

    def vae_encode(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        image = self.link(node_id, inputs, "pixels", _Image)
        vae = self.link(node_id, inputs, "vae", _Vae).checkpoint
        if image.decoded:
            raise self.fail(node_id, "encoding a decoded image again is not supported (use a LoadImage)")
        pixels = load_image(image.source)
        return (_Latent(0, 0, VAE(f"{vae.source}:vae").encode(pixels)),)

    def vae_decode(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        samples = self.link(node_id, inputs, "samples", _Sampled)
        vae = self.link(node_id, inputs, "vae", _Vae).checkpoint
        if vae.family == "flux":
            decoded = VAE(f"{vae.source}:vae").decode_packed(samples.latents, samples.height, samples.width)
            return (_Image(decoded, decoded=True),)
        return (_Image(VAE(f"{vae.source}:vae").decode(samples.latents), decoded=True),)

    def controlnet_loader(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        name = self.widget(node_id, inputs, "control_net_name", str)
        try:
            return (_Control(self.map.controlnet(name)),)
        except ModelMapError as error:
            raise self.fail(node_id, str(error)) from None

    def _control(self, node_id: str, inputs: dict[str, Any]) -> tuple[str, Handle, float]:
        control = self.link(node_id, inputs, "control_net", _Control)
        image = self.link(node_id, inputs, "image", _Image)
        if image.decoded:
            raise self.fail(node_id, "a ControlNet image must come from a LoadImage")
        return control.model, image.source, self.widget(node_id, inputs, "strength", float)

    def controlnet_apply(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        conditioning = self.link(node_id, inputs, "conditioning", _Conditioning)
        return (replace(conditioning, control=self._control(node_id, inputs)),)

    def controlnet_apply_advanced(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        start = self.widget(node_id, inputs, "start_percent", float) if "start_percent" in inputs else 0.0
        end = self.widget(node_id, inputs, "end_percent", float) if "end_percent" in inputs else 1.0
        if (start, end) != (0.0, 1.0):
            raise self.fail(node_id, f"start_percent/end_percent must be 0/1, got {start}/{end}")
        control = self._control(node_id, inputs)
        positive = self.link(node_id, inputs, "positive", _Conditioning)
        negative = self.link(node_id, inputs, "negative", _Conditioning)
        return (replace(positive, control=control), replace(negative, control=control))

    def ksampler_advanced(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        start = self.widget(node_id, inputs, "start_at_step", int)
        end = self.widget(node_id, inputs, "end_at_step", int)
        steps = self.widget(node_id, inputs, "steps", int)
        if start != 0 or end < steps:
            raise self.fail(
                node_id, "start_at_step must be 0 and end_at_step ≥ steps (partial sampling is not supported)"
            )
        if self.widget(node_id, inputs, "add_noise", str) != "enable":
            raise self.fail(node_id, "add_noise must be 'enable'")
        return self._sample(node_id, inputs, "noise_seed", 1.0)

    def ksampler(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        return self._sample(node_id, inputs, "seed", self.widget(node_id, inputs, "denoise", float))

    def _sample(
        self, node_id: str, inputs: dict[str, Any], seed_name: str, denoise: float
    ) -> tuple[Any, ...]:
        model = self.link(node_id, inputs, "model", _Model)
        positive = self.link(node_id, inputs, "positive", _Conditioning)
        negative = self.link(node_id, inputs, "negative", _Conditioning)
        latent = self.link(node_id, inputs, "latent_image", _Latent)
        seed = self.widget(node_id, inputs, seed_name, int)
        steps = self.widget(node_id, inputs, "steps", int)
        cfg = self.widget(node_id, inputs, "cfg", float)
        main = node_id == self.roles.sampler
        if main:
            seed_value: Handle | int = self.request_input("seed", seed, int, minimum=0, maximum=2**63 - 1)
            steps_value: Handle | int = self.request_input("steps", steps, int, minimum=1, maximum=200)
            cfg_value: Handle | float = (
                cfg  # FLUX.1: guidance_scale is FluxGuidance's (declared below), not declared twice
                if model.checkpoint.family == "flux"
                else self.request_input("guidance_scale", cfg, float, minimum=0, maximum=100)
            )
        else:
            seed_value, steps_value, cfg_value = seed, steps, cfg
        controls = {c for c in (positive.control, negative.control) if c is not None}
        if len(controls) > 1:
            raise self.fail(
                node_id, "positive and negative use different ControlNets (one per sampler is supported)"
            )
        family = model.checkpoint.family
        if family in ("flux", "sd3"):  # conditioned on the control image's VAE latents
            vae = VAE(f"{model.checkpoint.source}:vae")
            adapters = []
            for model_id, image, strength in controls:
                control = ControlNet(model_id)
                apply = control.apply_latents if family == "flux" else control.apply_sd3
                pixels = load_resized_image(image, latent.height, latent.width)
                adapters.append(apply(vae.encode_control(pixels), strength))
        else:
            adapters = [
                ControlNet(c[0]).apply(load_control_image(c[1], latent.height, latent.width), c[2])
                for c in controls
            ]
        img2img: dict[str, Any] = {}
        height, width = latent.height, latent.width
        if latent.init is not None and family == "flux":
            raise self.fail(node_id, "img2img (VAEEncode) is not supported for flux yet")
        if latent.init is not None:
            strength = (
                self.request_input("strength", denoise, float, minimum=0, maximum=1, exclusive_minimum=True)
                if main
                else denoise
            )
            img2img = {"init_latents": latent.init, "strength": strength}
            height = width = 0  # the image's own size (the init latents carry it)
            if adapters:
                raise self.fail(node_id, "a ControlNet with img2img is not supported")
        elif denoise != 1.0:
            raise self.fail(node_id, f"denoise must be 1.0 with an empty latent image, got {denoise}")
        source = model.checkpoint.source
        scheduler = NoiseScheduler(f"{source}:scheduler")
        common = {
            "steps": steps_value,
            "seed": seed_value,
            "height": height,
            "width": width,
            "loras": model.loras,
        }
        if family == "flux":  # one branch; the guidance is FluxGuidance's, embedded in the transformer
            if cfg != 1.0:
                raise self.fail(
                    node_id, f"FLUX.1 has no CFG: set cfg to 1.0 and use FluxGuidance (got {cfg})"
                )
            guidance = positive.guidance if positive.guidance is not None else FLUX_DEFAULT_GUIDANCE
            guidance_value: Handle | float = (
                self.request_input("guidance_scale", guidance, float, minimum=0, maximum=100)
                if main
                else guidance
            )
            latents = denoise_loop(
                Transformer(f"{source}:transformer"),
                scheduler,
                prompt_embeds=positive.embeds,
                pooled_prompt_embeds=positive.pooled,
                guidance_scale=guidance_value,
                guidance="embedded",
                adapters=adapters,
                **common,
            )
            return (_Sampled(latents, model.checkpoint, height, width),)
        latents = denoise_loop(
            Transformer(f"{source}:transformer") if family == "sd3" else UNet(f"{source}:unet"),
            scheduler,
            prompt_embeds=positive.embeds,
            negative_prompt_embeds=negative.embeds,
            pooled_prompt_embeds=positive.pooled,
            negative_pooled_prompt_embeds=negative.pooled,
            guidance_scale=cfg_value,
            extra_iterations=1 if family == "sd15" else 0,  # SD 1.5's PNDM repeats one timestep
            adapters=adapters,
            **common,
            **img2img,
        )
        return (_Sampled(latents, model.checkpoint),)

    # ---- roles ----

    def find_roles(self) -> None:
        samplers = sorted(
            (i for i, n in self.prompt.items() if n.get("class_type") in ("KSampler", "KSamplerAdvanced")),
            key=_sort_key,
        )
        if not samplers:
            return
        self.roles.sampler = samplers[0]
        inputs = self.prompt[samplers[0]].get("inputs", {})
        for name, role in (("positive", "prompt"), ("negative", "negative_prompt")):
            text_node = self._trace(
                inputs.get(name),
                "CLIPTextEncode",
                ("conditioning", "positive" if role == "prompt" else "negative"),
            )
            if text_node and text_node not in self.roles.texts:
                self.roles.texts[text_node] = role
        latent = self._trace(inputs.get("latent_image"), "EmptyLatentImage", ())
        self.roles.latent = latent or ""

    def _trace(self, value: Any, target: str, through: tuple[str, ...]) -> str | None:
        for _ in range(len(self.prompt)):
            ref = _ref(value)
            if ref is None or ref[0] not in self.prompt:
                return None
            node = self.prompt[ref[0]]
            if node.get("class_type") == target:
                return ref[0]
            inputs = node.get("inputs", {})
            value = next((inputs[n] for n in through if n in inputs), None)
        return None


def _sort_key(node_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then the others. ASCII digits only (int() refuses '²', which
    isdigit() accepts) and compared as (length, text): int() refuses ids of over 4300 digits."""
    if node_id.isascii() and node_id.isdigit():
        digits = node_id.lstrip("0")
        return (0, len(digits), digits)
    return (1, 0, node_id)


def _show(value: Any) -> str:
    """A value as an error message shows it: short (a message must not echo a megabyte back)."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
        return "an integer outside the 64-bit range"  # repr() of a huge int may even raise
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


OUTPUT_CLASSES = ("SaveImage", "PreviewImage")


def supported_classes() -> list[str]:
    probe = _Translator({}, ModelMap(), Workflow("probe"))
    return sorted([*probe.handlers, *OUTPUT_CLASSES])


def import_comfyui(
    prompt: dict[str, Any], name: str, model_map: ModelMap | None = None, description: str = ""
) -> compiler_pb2.WorkflowSpec:
    """Translate a ComfyUI API-format prompt; raises ComfyUIError naming every problem it finds."""
    if not isinstance(prompt, dict) or not prompt:
        raise ComfyUIError(["workflow: expected a non-empty JSON object of nodes (ComfyUI API format)"])
    if "nodes" in prompt and "links" in prompt:
        raise ComfyUIError(["workflow: this is ComfyUI's UI format; export it with 'Save (API Format)'"])
    known = set(supported_classes())
    errors = []
    for node_id, node in sorted(prompt.items(), key=lambda item: _sort_key(item[0])):
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            errors.append(f"node {node_id}: needs a class_type (a string) and inputs")
        elif not isinstance(node.get("inputs", {}), dict):
            errors.append(f"node {node_id}: inputs must be a JSON object, got {_show(node['inputs'])}")
        elif node["class_type"] not in known:
            errors.append(f"node {node_id}: unsupported ComfyUI node class {_show(node['class_type'])}")
    if errors:
        raise ComfyUIError([*errors, f"supported node classes: {', '.join(sorted(known))}"])
    with Workflow(name, description=description or f"imported from ComfyUI ({len(prompt)} nodes)") as wf:
        translator = _Translator(prompt, model_map or ModelMap(), wf)
        translator.find_roles()
        outputs = [
            i
            for i, n in sorted(prompt.items(), key=lambda item: _sort_key(item[0]))
            if n["class_type"] in OUTPUT_CLASSES
        ]
        if not outputs:
            raise ComfyUIError(["workflow: no SaveImage or PreviewImage node, so nothing to compute"])
        for index, node_id in enumerate(outputs):
            image = translator.link(node_id, prompt[node_id].get("inputs", {}), "images", _Image)
            if not image.decoded:
                raise translator.fail(node_id, "saves a loaded image unchanged; nothing to compute")
            wf.output("image" if index == 0 else f"image_{node_id}", image.source)
    return wf.to_spec()
