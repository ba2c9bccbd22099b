"""Validating a workflow template (pure): every error, each naming the node and the input.

Checks: names and IR version, unknown operators and modes, missing and unexpected inputs, dangling
handles (a reference to a node or output that does not exist), type mismatches on every edge, cycles,
denoise-loop attributes and img2img inputs, adapters (ControlNets), and LoRA patches whose target
model is not in the graph.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from lego import operators
from lego.v1 import compiler_pb2
from lego.values import from_value

SUPPORTED_IR_VERSIONS = (1, 2)
VALUE_TYPES = {
    compiler_pb2.VALUE_TYPE_STRING: operators.STRING,
    compiler_pb2.VALUE_TYPE_INT: operators.INT,
    compiler_pb2.VALUE_TYPE_FLOAT: operators.FLOAT,
    compiler_pb2.VALUE_TYPE_BOOL: operators.BOOL,
}


def node_bindings(node: compiler_pb2.NodeSpec) -> Iterator[compiler_pb2.Binding]:
    """Every input binding of a node, its adapters' included."""
    yield from node.inputs
    for adapter in node.adapters:
        yield from adapter.inputs


def _output_types(node: compiler_pb2.NodeSpec) -> dict[str, str]:
    if node.op == operators.DENOISE_LOOP:
        return {"latents": operators.LATENTS}
    try:
        signature = operators.signature(node.op, node.mode)
    except KeyError:
        return {output: "" for output in node.outputs}  # reported once, at the node
    return {output: signature.types.get(output, "") for output in node.outputs}


def _constant_type(binding: compiler_pb2.Binding) -> str:
    value = from_value(binding.constant)
    if isinstance(value, bool):
        return operators.BOOL
    if isinstance(value, int):
        return operators.INT
    if isinstance(value, float):
        return operators.FLOAT
    if isinstance(value, str):
        return operators.STRING
    return ""


class _Checker:
    def __init__(self, spec: compiler_pb2.WorkflowSpec) -> None:
        self.spec = spec
        self.errors: list[str] = []
        self.input_types = {i.name: VALUE_TYPES.get(i.type, "") for i in spec.inputs}
        self.outputs: dict[str, dict[str, str]] = {}
        for node in spec.nodes:
            if node.id in self.outputs:
                self.errors.append(f"node {node.id}: duplicate node id")
            self.outputs[node.id] = _output_types(node)
        self.models = {n.model for n in spec.nodes if n.model} | {
            a.model for n in spec.nodes for a in n.adapters if a.model
        }

    def binding(self, where: str, binding: compiler_pb2.Binding, expected: str) -> None:
        source = binding.WhichOneof("source")
        if source == "ref":
            ref = binding.ref
            if ref.node not in self.outputs:
                self.errors.append(
                    f"{where}: input {binding.name!r} refers to {ref.node}.{ref.output}, which does not "
                    f"exist (no node {ref.node!r})"
                )
                return
            if ref.output not in self.outputs[ref.node]:
                self.errors.append(
                    f"{where}: input {binding.name!r} refers to {ref.node}.{ref.output}, which does not "
                    f"exist (outputs: {sorted(self.outputs[ref.node])})"
                )
                return
            actual, origin = self.outputs[ref.node][ref.output], f"{ref.node}.{ref.output}"
        elif source == "workflow_input":
            if binding.workflow_input not in self.input_types:
                self.errors.append(
                    f"{where}: input {binding.name!r} refers to unknown workflow input "
                    f"{binding.workflow_input!r}"
                )
                return
            actual, origin = self.input_types[binding.workflow_input], f"input {binding.workflow_input}"
        elif source == "constant":
            actual, origin = _constant_type(binding), "a constant"
        else:
            self.errors.append(f"{where}: input {binding.name!r} has no source")
            return
        if expected and actual and not operators.compatible(actual, expected):
            self.errors.append(
                f"{where}: input {binding.name!r} expects {expected}, got {actual} from {origin}"
            )

    def bindings(self, where: str, given: list[compiler_pb2.Binding], expected: dict[str, str]) -> None:
        names = [b.name for b in given]
        for name in sorted(set(expected) - set(names)):
            self.errors.append(f"{where}: missing required input {name!r}")
        for name in sorted({n for n in names if names.count(n) > 1}):
            self.errors.append(f"{where}: input {name!r} is bound twice")
        for binding in given:
            if binding.name not in expected:
                self.errors.append(f"{where}: unexpected input {binding.name!r} (expects {sorted(expected)})")
            else:
                self.binding(where, binding, expected[binding.name])

    def node(self, node: compiler_pb2.NodeSpec) -> None:
        where = f"node {node.id}"
        if node.op == operators.DENOISE_LOOP:
            self.loop(node)
            return
        try:
            signature = operators.signature(node.op, node.mode)
        except KeyError as error:
            self.errors.append(f"{where}: {error.args[0]}")
            return
        for output in node.outputs:
            if output not in signature.outputs:
                self.errors.append(f"{where}: {node.op}.{node.mode} has no output {output!r}")
        self.bindings(where, list(node.inputs), {n: signature.types.get(n, "") for n in signature.inputs})
        if node.patches or node.adapters:
            self.errors.append(f"{where}: patches and adapters apply to denoise loops only, not {node.op}")

    def loop(self, node: compiler_pb2.NodeSpec) -> None:
        where = f"node {node.id}"
        for attribute in operators.DENOISE_LOOP_ATTRIBUTES:
            if attribute not in node.attributes:
                self.errors.append(f"{where}: denoise loop needs attribute {attribute!r}")
        for attribute in ("latent_channels", "vae_scale_factor", "extra_iterations"):
            value = node.attributes.get(attribute, "0")
            if not value.isdigit():
                self.errors.append(
                    f"{where}: attribute {attribute} must be a non-negative integer, got {value!r}"
                )
        names = {b.name for b in node.inputs}
        guidance = node.attributes.get("guidance", "cfg")
        if guidance == "embedded":  # FLUX.1: no negative prompt; img2img optional
            present = self.groups(where, names, operators.DENOISE_LOOP_OPTIONAL_GROUPS[:1])
            embedded = (*operators.EMBEDDED_GUIDANCE_INPUTS, *present)
            self.bindings(where, list(node.inputs), {n: operators.DENOISE_LOOP_TYPES[n] for n in embedded})
            self.patches(node)
            self.adapters(node, "flux_controlnet")
            return
        if guidance != "cfg":
            self.errors.append(f"{where}: attribute guidance must be 'cfg' or 'embedded', got {guidance!r}")
        denoiser_op = node.attributes.get("denoiser_op", "unet")
        if denoiser_op not in ("unet", "transformer"):
            self.errors.append(
                f"{where}: attribute denoiser_op must be 'unet' or 'transformer', got {denoiser_op!r}"
            )
        elif denoiser_op == "transformer" and "pooled_prompt_embeds" not in names:
            self.errors.append(f"{where}: a transformer denoiser (SD3) needs pooled_prompt_embeds")
        elif denoiser_op == "transformer" and node.adapters:
            self.errors.append(f"{where}: ControlNets for transformer denoisers (SD3) are not supported yet")
        present = self.groups(where, names, operators.DENOISE_LOOP_OPTIONAL_GROUPS)
        expected = {n: operators.DENOISE_LOOP_TYPES[n] for n in (*operators.DENOISE_LOOP_INPUTS, *present)}
        self.bindings(where, list(node.inputs), expected)
        self.patches(node)
        self.adapters(node, "controlnet")

    def groups(self, where: str, names: set[str], groups: tuple[tuple[str, ...], ...]) -> list[str]:
        """The optional loop inputs bound; each group is all or nothing."""
        present: list[str] = []
        for group in groups:
            bound = [n for n in group if n in names]
            if bound and len(bound) != len(group):
                missing = sorted(set(group) - set(bound))
                self.errors.append(f"{where}: input {bound[0]!r} needs inputs {missing} too")
            present += bound
        return present

    def adapters(self, node: compiler_pb2.NodeSpec, expected_kind: str) -> None:
        where = f"node {node.id}"
        if len(node.adapters) > 1:
            self.errors.append(
                f"{where}: one ControlNet per denoise loop is supported, got {len(node.adapters)}"
            )
        for index, adapter in enumerate(node.adapters):
            adapter_where = f"{where} adapter {index} ({adapter.kind} {adapter.model})"
            if adapter.kind not in operators.ADAPTERS:
                self.errors.append(
                    f"{where}: unknown adapter kind {adapter.kind!r} (known: {sorted(operators.ADAPTERS)})"
                )
                continue
            if adapter.kind != expected_kind:
                self.errors.append(
                    f"{where}: adapter {index} is a {adapter.kind}; this loop takes {expected_kind}"
                )
                continue
            if not adapter.model:
                self.errors.append(f"{adapter_where}: needs a model")
            self.bindings(adapter_where, list(adapter.inputs), operators.ADAPTERS[adapter.kind])

    def patches(self, node: compiler_pb2.NodeSpec) -> None:
        for patch in node.patches:
            if not patch.source or not math.isfinite(patch.scale):
                self.errors.append(
                    f"node {node.id}: a LoRA needs a source and a finite scale, "
                    f"got {patch.source!r} at {patch.scale}"
                )
            target = patch.target or node.model
            if target not in self.models:
                self.errors.append(
                    f"node {node.id}: LoRA {patch.source} targets model {target!r}, which is not in the "
                    f"graph (models: {sorted(self.models)})"
                )
            elif target != node.model:
                self.errors.append(
                    f"node {node.id}: LoRA {patch.source} targets {target!r}; a loop's LoRA patches its "
                    f"denoiser {node.model!r}"
                )


def find_cycle(spec: compiler_pb2.WorkflowSpec) -> list[str]:
    edges = {
        n.id: [b.ref.node for b in node_bindings(n) if b.WhichOneof("source") == "ref"] for n in spec.nodes
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for succ in edges.get(node, []):
            if state.get(succ) == 1:
                return [*path[path.index(succ) :], succ]
            if succ in edges and succ not in state:
                found = visit(succ)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node_id in edges:
        if node_id not in state:
            found = visit(node_id)
            if found:
                return found
    return []


def validate_spec(spec: compiler_pb2.WorkflowSpec) -> list[str]:
    """Every error in a workflow template; empty when it is valid."""
    checker = _Checker(spec)
    errors = checker.errors
    if not spec.name:
        errors.insert(0, "workflow: name is empty")
    if spec.ir_version not in SUPPORTED_IR_VERSIONS:
        errors.append(
            f"workflow {spec.name}: ir_version {spec.ir_version} is not supported "
            f"(supported: {', '.join(map(str, SUPPORTED_IR_VERSIONS))})"
        )
    for node in spec.nodes:
        checker.node(node)
    cycle = find_cycle(spec)
    if cycle:
        errors.append(f"cycle: {' -> '.join(cycle)}")
    if not spec.outputs:
        errors.append(f"workflow {spec.name}: declares no outputs")
    for output in spec.outputs:
        if output.source.output not in checker.outputs.get(output.source.node, {}):
            errors.append(
                f"output {output.name}: refers to {output.source.node}.{output.source.output}, "
                "which does not exist"
            )
    return errors
