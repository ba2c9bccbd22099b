"""Validating a workflow template (pure): every error, each naming the node and the input.

Checks: names and IR version, unknown operators and modes, missing and unexpected inputs, dangling
handles (a reference to a node or output that does not exist), type mismatches on every edge, cycles,
denoise-loop attributes and img2img inputs, adapters (ControlNets), and LoRA patches whose target
model is not in the graph.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

from lego import operators
from lego.v1 import compiler_pb2
from lego.values import from_value

SUPPORTED_IR_VERSIONS = (1, 2)
# Upper bounds of a denoise loop's integer attributes: a template may not ask a worker for absurd
# tensors, nor the coordinator to unroll an absurd loop (lego.graph also bounds steps per request).
LOOP_ATTRIBUTE_LIMITS = {
    "latent_channels": (1, 4096),
    "vae_scale_factor": (1, 4096),
    "extra_iterations": (0, 1000),
    "lora_async_steps": (0, 1000),  # lego.workflow.denoise_loop: steps that may run before a LoRA loads
    "approx_cache": (0, 1),  # 1: requests may resume from a similar request's cached latent
}
# Names a caller sees again in keys, URLs, tensor ids and error messages: bounded (the gateway takes
# workflow names of up to 256 characters).
MAX_NAME_CHARS = 256
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
        self.position: dict[str, int] = {}  # a node id → its index in the (topological) node list
        self.current = 0  # the index of the node being checked
        for index, node in enumerate(spec.nodes):
            if len(node.id) > MAX_NAME_CHARS:
                self.errors.append(f"node {node.id[:40]}...: id longer than {MAX_NAME_CHARS} characters")
            if node.id in self.outputs:
                self.errors.append(f"node {node.id[:MAX_NAME_CHARS]}: duplicate node id")
            else:
                self.position[node.id] = index
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
            if self.position.get(ref.node, -1) >= self.current:  # instantiation reads nodes in order
                self.errors.append(
                    f"{where}: input {binding.name!r} refers to {ref.node}.{ref.output}, which is not listed "
                    "before it (nodes must be in topological order: producers first)"
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
            value = from_value(binding.constant)
            if not isinstance(value, str | int | float | bool):
                self.errors.append(
                    f"{where}: input {binding.name!r} is a constant that is not a string, int, float or bool"
                )
                return
            if isinstance(value, float) and not math.isfinite(value):
                self.errors.append(f"{where}: input {binding.name!r} is a non-finite constant ({value})")
                return
            actual, origin = _constant_type(binding), "a constant"
        else:
            self.errors.append(f"{where}: input {binding.name!r} has no source")
            return
        if expected and actual and not operators.compatible(actual, expected):
            self.errors.append(
                f"{where}: input {binding.name!r} expects {expected}, got {actual} from {origin}"
            )

    def bindings(self, where: str, given: list[compiler_pb2.Binding], expected: dict[str, str]) -> None:
        names = Counter(b.name for b in given)
        for name in sorted(set(expected) - set(names)):
            self.errors.append(f"{where}: missing required input {name!r}")
        for name in sorted(n for n, count in names.items() if count > 1):
            self.errors.append(f"{where}: input {name!r} is bound twice")
        for binding in given:
            if binding.name not in expected:
                self.errors.append(f"{where}: unexpected input {binding.name!r} (expects {sorted(expected)})")
            else:
                self.binding(where, binding, expected[binding.name])

    def inputs(self) -> None:
        """The workflow's declared inputs: named once, a scalar type, a default of that type."""
        seen: set[str] = set()
        for spec_input in self.spec.inputs:
            where = f"workflow input {spec_input.name!r}"
            if not spec_input.name:
                self.errors.append("workflow input: name is empty")
            elif len(spec_input.name) > MAX_NAME_CHARS:
                self.errors.append(f"{where[:60]}...: name longer than {MAX_NAME_CHARS} characters")
            elif spec_input.name in seen:
                self.errors.append(f"{where}: declared twice")
            seen.add(spec_input.name)
            if spec_input.type not in VALUE_TYPES:
                self.errors.append(f"{where}: type must be string, int, float or bool, got {spec_input.type}")
                continue
            if not spec_input.HasField("default_value"):
                continue
            default = from_value(spec_input.default_value)
            expected = VALUE_TYPES[spec_input.type]
            actual = (
                _constant_type(compiler_pb2.Binding(constant=spec_input.default_value))
                if isinstance(default, str | int | float | bool)
                else ""
            )
            if not actual or not operators.compatible(actual, expected):
                self.errors.append(
                    f"{where}: its default must be of type {expected}, got {actual or 'no scalar'}"
                )

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
        for attribute, (low, high) in LOOP_ATTRIBUTE_LIMITS.items():
            value = node.attributes.get(attribute, str(low))
            # ASCII digits only: str.isdigit() accepts '²', which int() refuses
            if not (value.isascii() and value.isdigit() and len(value) <= 9 and low <= int(value) <= high):
                shown = value[:40]
                self.errors.append(
                    f"{where}: attribute {attribute} must be an integer from {low} to {high}, got {shown!r}"
                )
        names = {b.name for b in node.inputs}
        if node.attributes.get("approx_cache") == "1" and (node.adapters or "init_latents" in names):
            self.errors.append(
                f"{where}: approximate caching (approx_cache) is for text-to-image loops, "
                "not with a ControlNet or img2img"
            )
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
        elif denoiser_op == "transformer" and node.adapters and "init_latents" in names:
            self.errors.append(f"{where}: an SD3 ControlNet with img2img is not supported")
        present = self.groups(where, names, operators.DENOISE_LOOP_OPTIONAL_GROUPS)
        expected = {n: operators.DENOISE_LOOP_TYPES[n] for n in (*operators.DENOISE_LOOP_INPUTS, *present)}
        self.bindings(where, list(node.inputs), expected)
        self.patches(node)
        self.adapters(node, "sd3_controlnet" if denoiser_op == "transformer" else "controlnet")

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
            if adapter.kind == "sd3_controlnet":
                self.control_encode(adapter_where, adapter)

    def control_encode(self, where: str, adapter: compiler_pb2.Adapter) -> None:
        """An SD3 ControlNet's latents come from one `vae.encode_control` node, which instantiation
        runs again with one copy of the image per CFG branch."""
        refs = {b.name: b.ref for b in adapter.inputs if b.WhichOneof("source") == "ref"}
        dist, scaling = refs.get("control_dist"), refs.get("control_scaling")
        source = self.spec.nodes[self.position[dist.node]] if dist and dist.node in self.position else None
        if not (
            source is not None
            and dist is not None
            and scaling is not None
            and (source.op, source.mode, dist.output) == ("vae", "encode_control", "latent_dist")
            and (scaling.node, scaling.output) == (source.id, "latent_scaling")
        ):
            self.errors.append(
                f"{where}: control_dist and control_scaling must be the latent_dist and latent_scaling "
                "of one vae.encode_control node"
            )

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
    # iterative depth-first search: a long chain of nodes must not exhaust Python's recursion limit
    for start in edges:
        if start in state:
            continue
        state[start] = 1
        path = [start]
        stack = [iter(edges[start])]
        while stack:
            succ = next(stack[-1], None)
            if succ is None:
                stack.pop()
                state[path.pop()] = 2
            elif state.get(succ) == 1:
                return [*path[path.index(succ) :], succ]
            elif succ in edges and succ not in state:
                state[succ] = 1
                path.append(succ)
                stack.append(iter(edges[succ]))
    return []


def validate_spec(spec: compiler_pb2.WorkflowSpec) -> list[str]:
    """Every error in a workflow template; empty when it is valid."""
    checker = _Checker(spec)
    errors = checker.errors
    if not spec.name:
        errors.insert(0, "workflow: name is empty")
    elif len(spec.name) > MAX_NAME_CHARS:
        errors.insert(0, f"workflow {spec.name[:40]}...: name longer than {MAX_NAME_CHARS} characters")
    if spec.ir_version not in SUPPORTED_IR_VERSIONS:
        errors.append(
            f"workflow {spec.name}: ir_version {spec.ir_version} is not supported "
            f"(supported: {', '.join(map(str, SUPPORTED_IR_VERSIONS))})"
        )
    checker.inputs()
    for index, node in enumerate(spec.nodes):
        checker.current = index
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
