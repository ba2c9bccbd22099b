"""The workflow programming model: calling operators inside `with Workflow(...)` records a graph.

with Workflow("sd15-txt2img") as wf:
    prompt = wf.input("prompt", str, min_length=1)
    embeds = TextEncoder("tiny-sd15:text_encoder")(prompt)
    ...
    wf.output("image", VAE("tiny-sd15:vae").decode(latents))
spec = wf.to_spec()   # the protobuf IR the compiler registers
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lego import operators
from lego.v1 import compiler_pb2
from lego.values import Scalar, to_value

IR_VERSION = 2  # 1: the walking skeleton; 2: adapters, LoRA targets, img2img (1 is still read)
_current: contextvars.ContextVar[Workflow | None] = contextvars.ContextVar("lego_workflow", default=None)
_collected: contextvars.ContextVar[list[Workflow] | None] = contextvars.ContextVar(
    "lego_collect", default=None
)

_TYPES: dict[type, compiler_pb2.ValueType.ValueType] = {
    str: compiler_pb2.VALUE_TYPE_STRING,
    int: compiler_pb2.VALUE_TYPE_INT,
    float: compiler_pb2.VALUE_TYPE_FLOAT,
    bool: compiler_pb2.VALUE_TYPE_BOOL,
}


@dataclass(frozen=True)
class LoRA:
    """A LoRA patch for a denoiser: applied to the shared base model per call, never a copy of it."""

    source: str  # a safetensors file (diffusers/kohya LoRA format) or a directory holding one
    scale: float = 1.0
    target: str = ""  # the model id it patches; empty: the loop's denoiser


@dataclass(frozen=True)
class AdapterUse:
    """An adapter (e.g. a ControlNet) attached to a denoise loop: called once per step and branch."""

    kind: str
    model: str
    inputs: dict[str, Bindable]


@dataclass(frozen=True)
class Handle:
    """A symbolic value: a node's output, or a workflow input."""

    workflow: Workflow
    node: str = ""
    output: str = ""
    workflow_input: str = ""


Bindable = Handle | Scalar


def current_workflow() -> Workflow:
    workflow = _current.get()
    if workflow is None:
        raise RuntimeError("operators must be called inside `with Workflow(name):`")
    return workflow


class Workflow:
    def __init__(self, name: str, description: str = "") -> None:
        self.name = name
        self.description = description
        self._inputs: list[compiler_pb2.InputSpec] = []
        self._nodes: list[compiler_pb2.NodeSpec] = []
        self._outputs: list[compiler_pb2.WorkflowOutput] = []
        self._token: contextvars.Token[Workflow | None] | None = None

    def __enter__(self) -> Workflow:
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _current.reset(self._token)
        collected = _collected.get()
        if collected is not None and exc[0] is None:
            collected.append(self)

    def input(
        self,
        name: str,
        type_: type,
        *,
        default: Scalar | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_minimum: bool = False,
        multiple_of: int = 0,
        min_length: int = 0,
        max_length: int = 0,
    ) -> Handle:
        if type_ not in _TYPES:
            raise TypeError(f"input {name}: type must be one of str, int, float, bool")
        spec = compiler_pb2.InputSpec(
            name=name,
            type=_TYPES[type_],
            required=default is None,
            multiple_of=multiple_of,
            min_length=min_length,
            max_length=max_length,
            exclusive_minimum=exclusive_minimum,
        )
        if default is not None:
            spec.default_value.CopyFrom(to_value(default))
        if minimum is not None:
            spec.minimum = minimum
        if maximum is not None:
            spec.maximum = maximum
        self._inputs.append(spec)
        return Handle(self, workflow_input=name)

    def output(self, name: str, handle: Handle) -> None:
        source = compiler_pb2.OutputRef(node=handle.node, output=handle.output)
        self._outputs.append(compiler_pb2.WorkflowOutput(name=name, source=source))

    def add_node(
        self,
        op: str,
        model: str,
        mode: str,
        inputs: dict[str, Bindable],
        outputs: tuple[str, ...],
        attributes: dict[str, str] | None = None,
    ) -> dict[str, Handle]:
        node_id = f"{op}_{len(self._nodes)}"
        node = compiler_pb2.NodeSpec(
            id=node_id, op=op, model=model, mode=mode, outputs=list(outputs), attributes=attributes or {}
        )
        for name, value in inputs.items():
            node.inputs.append(_binding(name, value))
        self._nodes.append(node)
        return {output: Handle(self, node=node_id, output=output) for output in outputs}

    def node(self, node_id: str) -> compiler_pb2.NodeSpec:
        return next(node for node in self._nodes if node.id == node_id)

    def to_spec(self) -> compiler_pb2.WorkflowSpec:
        return compiler_pb2.WorkflowSpec(
            ir_version=IR_VERSION,
            name=self.name,
            description=self.description,
            inputs=self._inputs,
            nodes=self._nodes,
            outputs=self._outputs,
        )


@contextlib.contextmanager
def collect_workflows() -> Iterator[list[Workflow]]:
    """Every `with Workflow(...)` block completed inside this context, in order (for loading files)."""
    collected: list[Workflow] = []
    token = _collected.set(collected)
    try:
        yield collected
    finally:
        _collected.reset(token)


def _binding(name: str, value: Bindable) -> compiler_pb2.Binding:
    if isinstance(value, Handle):
        if value.workflow_input:
            return compiler_pb2.Binding(name=name, workflow_input=value.workflow_input)
        return compiler_pb2.Binding(
            name=name, ref=compiler_pb2.OutputRef(node=value.node, output=value.output)
        )
    return compiler_pb2.Binding(name=name, constant=to_value(value))


class _ModelOperator:
    op = ""

    def __init__(self, model: str) -> None:
        self.model = model

    def _call(self, mode: str, **inputs: Bindable) -> Handle:
        return self._call_all(mode, **inputs)[0]

    def _call_all(self, mode: str, **inputs: Bindable) -> tuple[Handle, ...]:
        signature = operators.signature(self.op, mode)
        handles = current_workflow().add_node(self.op, self.model, mode, inputs, signature.outputs)
        return tuple(handles[output] for output in signature.outputs)


class TextEncoder(_ModelOperator):
    op = "text_encoder"

    def __call__(self, text: Bindable) -> Handle:
        return self._call("encode", text=text)

    def encode_pooled(self, text: Bindable) -> tuple[Handle, Handle]:
        """A text-encoder stack (SDXL's `<source>:text_encoders`): (hidden states, pooled embedding)."""
        embeddings, pooled = self._call_all("encode_pooled", text=text)
        return embeddings, pooled


class VAE(_ModelOperator):
    op = "vae"

    def decode(self, latents: Bindable) -> Handle:
        return self._call("decode", latents=latents)

    def decode_packed(self, latents: Bindable, height: Bindable, width: Bindable) -> Handle:
        """FLUX.1: unpack 2x2 latent patches for a height x width image, then decode."""
        return self._call("decode_packed", latents=latents, height=height, width=width)

    def encode(self, pixels: Bindable) -> Handle:
        """The latent distribution of an image (from `load_image`); a denoise loop samples it."""
        return self._call("encode", pixels=pixels)

    def encode_control(self, pixels: Bindable) -> Handle:
        """A FLUX.1 or SD3 ControlNet's control image as a latent distribution
        (`ControlNet.apply_latents`, `ControlNet.apply_sd3`)."""
        return self._call("encode_control", pixels=pixels)


class ControlNet(_ModelOperator):
    """A ControlNet: an adapter of a denoise loop, one node per step and CFG branch."""

    op = "controlnet"

    def apply(self, control_image: Bindable, scale: Bindable = 1.0) -> AdapterUse:
        return AdapterUse(
            "controlnet", self.model, {"control_image": control_image, "conditioning_scale": scale}
        )

    def apply_latents(self, control_latents: Handle, scale: Bindable = 1.0) -> AdapterUse:
        """FLUX.1: conditioned on the control image's VAE latents (`VAE.encode_control` output)."""
        return AdapterUse("flux_controlnet", self.model, self._latent_inputs(control_latents, scale))

    def apply_sd3(self, control_latents: Handle, scale: Bindable = 1.0) -> AdapterUse:
        """SD3 / 3.5: conditioned on the control image's VAE latents (a `VAE.encode_control` output).

        Each request runs that encode with one copy of the image per CFG branch in one call, as
        StableDiffusion3ControlNetPipeline does; the scheduler init samples it with the request's seed."""
        return AdapterUse("sd3_controlnet", self.model, self._latent_inputs(control_latents, scale))

    @staticmethod
    def _latent_inputs(control_latents: Handle, scale: Bindable) -> dict[str, Bindable]:
        scaling = Handle(control_latents.workflow, node=control_latents.node, output="latent_scaling")
        return {"control_dist": control_latents, "control_scaling": scaling, "conditioning_scale": scale}


def load_image(image: Bindable) -> Handle:
    """An image (a data: URI or a path, usually a workflow input) as VAE-encoder input pixels."""
    return _ImageOperator()._call("load", image=image)


def load_resized_image(image: Bindable, height: Bindable, width: Bindable) -> Handle:
    """An image resized to height x width as VAE-encoder input pixels (SD3's img2img)."""
    return _ImageOperator()._call("load_resized", image=image, height=height, width=width)


def load_control_image(image: Bindable, height: Bindable, width: Bindable) -> Handle:
    """An image resized to height x width as a ControlNet's conditioning image."""
    operator = _ImageOperator()
    return operator._call("load_control", image=image, height=height, width=width)


class _ImageOperator(_ModelOperator):
    op = "image"

    def __init__(self) -> None:
        super().__init__(operators.IMAGE_MODEL)


class Transformer(_ModelOperator):
    """A transformer denoiser (FLUX.1); used through `denoise_loop(..., guidance="embedded")`."""

    op = "transformer"


class UNet(_ModelOperator):
    """A denoiser; used through `denoise_loop`, which calls it once per step and CFG branch."""

    op = "unet"


class NoiseScheduler(_ModelOperator):
    op = "noise_scheduler"


def denoise_loop(
    denoiser: UNet | Transformer,
    scheduler: NoiseScheduler,
    *,
    prompt_embeds: Handle,
    negative_prompt_embeds: Handle | None = None,
    steps: Bindable,
    guidance_scale: Bindable,
    seed: Bindable,
    height: Bindable,
    width: Bindable,
    latent_channels: int = 4,
    vae_scale_factor: int = 8,
    extra_iterations: int = 0,
    loras: Sequence[LoRA] = (),
    lora_async_steps: int = 0,
    approx_cache: bool = False,
    adapters: Sequence[AdapterUse] = (),
    init_latents: Handle | None = None,
    strength: Bindable | None = None,
    pooled_prompt_embeds: Handle | None = None,
    negative_pooled_prompt_embeds: Handle | None = None,
    guidance: str = "cfg",
) -> Handle:
    """The denoising loop; steps and CFG (on iff guidance_scale > 1) are resolved per request.

    The loop runs once per entry of the scheduler's timesteps: `steps + extra_iterations` times
    (PNDM's PLMS mode repeats one timestep, so it needs extra_iterations=1). With `init_latents`
    (a `VAE.encode` output) and `strength` it is img2img: it skips the first
    `steps - int(steps * strength)` timesteps and starts from the noised image. With pooled
    embeddings (SDXL) the denoiser is conditioned on them and on the image size.
    `guidance="embedded"` (FLUX.1): one branch; the denoiser takes guidance_scale itself (dev) or
    ignores it (schnell); needs pooled_prompt_embeds and no negative prompt.
    `lora_async_steps=K` (bounded asynchronous LoRA loading): a worker that does not hold the LoRAs
    yet runs the loop's first K iterations without them while they load, and applies them from
    iteration K at the latest; K = 0 waits for them, so the image equals synchronous loading.
    `approx_cache=True` (approximate caching, after NIRVANA): a request whose prompt embedding is
    close to a finished request's starts from that request's latent after K iterations and runs
    only the rest (more similar → larger K, at most half); text-to-image loops only.
    """
    inputs: dict[str, Any] = {"prompt_embeds": prompt_embeds}
    if guidance == "cfg":
        if negative_prompt_embeds is None:
            raise ValueError("denoise_loop: classifier-free guidance needs negative_prompt_embeds")
        inputs["negative_prompt_embeds"] = negative_prompt_embeds
    elif guidance == "embedded":
        if pooled_prompt_embeds is None:
            raise ValueError("denoise_loop: embedded guidance (FLUX.1) needs pooled_prompt_embeds")
        inputs["pooled_prompt_embeds"] = pooled_prompt_embeds
    else:
        raise ValueError(f"denoise_loop: guidance must be 'cfg' or 'embedded', got {guidance!r}")
    inputs |= {
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "height": height,
        "width": width,
    }
    attributes = {
        "scheduler": scheduler.model,
        "latent_channels": str(latent_channels),
        "vae_scale_factor": str(vae_scale_factor),
        "extra_iterations": str(extra_iterations),
    }
    if guidance != "cfg":
        attributes["guidance"] = guidance
    if lora_async_steps:
        attributes["lora_async_steps"] = str(lora_async_steps)
    if approx_cache:
        attributes["approx_cache"] = "1"
    if denoiser.op != "unet":
        attributes["denoiser_op"] = denoiser.op
    if (init_latents is None) != (strength is None):
        raise ValueError("denoise_loop: img2img needs both init_latents and strength")
    if init_latents is not None and strength is not None:
        scaling = Handle(init_latents.workflow, node=init_latents.node, output="latent_scaling")
        inputs |= {"init_latents": init_latents, "init_scaling": scaling, "strength": strength}
    if guidance == "cfg" and (pooled_prompt_embeds is None) != (negative_pooled_prompt_embeds is None):
        raise ValueError("denoise_loop: pass both pooled_prompt_embeds and negative_pooled_prompt_embeds")
    if guidance == "cfg" and pooled_prompt_embeds is not None and negative_pooled_prompt_embeds is not None:
        inputs |= {
            "pooled_prompt_embeds": pooled_prompt_embeds,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
        }
    workflow = current_workflow()
    handles = workflow.add_node(operators.DENOISE_LOOP, denoiser.model, "", inputs, ("latents",), attributes)
    node = workflow.node(handles["latents"].node)
    for lora in loras:
        node.patches.add(source=lora.source, scale=lora.scale, target=lora.target)
    for adapter in adapters:
        message = node.adapters.add(kind=adapter.kind, model=adapter.model)
        for name, value in adapter.inputs.items():
            message.inputs.append(_binding(name, value))
    return handles["latents"]
