"""The workflow programming model: calling operators inside `with Workflow(...)` records a graph.

with Workflow("sd15-txt2img") as wf:
    prompt = wf.input("prompt", str, min_length=1)
    embeds = TextEncoder("tiny-sd15:text_encoder")(prompt)
    ...
    wf.output("image", VAE("tiny-sd15:vae").decode(latents))
spec = wf.to_spec()   # the protobuf IR the compiler registers
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lego import operators
from lego.v1 import compiler_pb2
from lego.values import Scalar, to_value

IR_VERSION = 1
_current: contextvars.ContextVar[Workflow | None] = contextvars.ContextVar("lego_workflow", default=None)

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
        signature = operators.signature(self.op, mode)
        handles = current_workflow().add_node(self.op, self.model, mode, inputs, signature.outputs)
        return handles[signature.outputs[0]]


class TextEncoder(_ModelOperator):
    op = "text_encoder"

    def __call__(self, text: Bindable) -> Handle:
        return self._call("encode", text=text)


class VAE(_ModelOperator):
    op = "vae"

    def decode(self, latents: Bindable) -> Handle:
        return self._call("decode", latents=latents)


class UNet(_ModelOperator):
    """A denoiser; used through `denoise_loop`, which calls it once per step and CFG branch."""

    op = "unet"


class NoiseScheduler(_ModelOperator):
    op = "noise_scheduler"


def denoise_loop(
    denoiser: UNet,
    scheduler: NoiseScheduler,
    *,
    prompt_embeds: Handle,
    negative_prompt_embeds: Handle,
    steps: Bindable,
    guidance_scale: Bindable,
    seed: Bindable,
    height: Bindable,
    width: Bindable,
    latent_channels: int = 4,
    vae_scale_factor: int = 8,
    extra_iterations: int = 0,
    loras: Sequence[LoRA] = (),
) -> Handle:
    """The denoising loop; steps and CFG (on iff guidance_scale > 1) are resolved per request.

    The loop runs once per entry of the scheduler's timesteps: `steps + extra_iterations` times
    (PNDM's PLMS mode repeats one timestep, so it needs extra_iterations=1).
    """
    inputs: dict[str, Any] = {
        "prompt_embeds": prompt_embeds,
        "negative_prompt_embeds": negative_prompt_embeds,
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
    workflow = current_workflow()
    handles = workflow.add_node(operators.DENOISE_LOOP, denoiser.model, "", inputs, ("latents",), attributes)
    node = workflow.node(handles["latents"].node)
    for lora in loras:
        node.patches.add(source=lora.source, scale=lora.scale)
    return handles["latents"]
