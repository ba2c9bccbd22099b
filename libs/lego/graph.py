"""Graph passes shared by the compiler and the coordinator (pure functions, no I/O).

- `validate_spec`: every error in a workflow template, each naming the node and the input.
- `instantiate`: one request's graph: the denoise loop unrolled for its step count, CFG branches
  split into separate denoiser nodes, dead nodes removed, depth from the sinks, consumer counts.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from lego import operators
from lego.v1 import compiler_pb2
from lego.values import Scalar, from_value


@dataclass(frozen=True)
class Ref:
    """An edge: output `output` of node `node` of the same request."""

    node: str
    output: str


@dataclass
class TaskNode:
    id: str
    op: str
    model: str
    mode: str
    inputs: dict[str, Ref | Scalar]
    outputs: tuple[str, ...]
    state_key: str = ""  # non-empty: must run where the first node with this key ran
    patches: tuple[tuple[str, float], ...] = ()  # LoRA (source, scale) applied for this call
    step: int = 0  # 1-based denoise step this node completes (progress); 0: none
    total_steps: int = 0
    depth: int = 0  # longest path to a sink, in nodes; deeper nodes run first within a request


@dataclass
class RequestGraph:
    nodes: dict[str, TaskNode]  # in a topological order
    outputs: dict[str, Ref]
    consumers: dict[Ref, int] = field(default_factory=dict)

    def model_calls(self) -> int:
        return len(self.nodes)


def validate_spec(spec: compiler_pb2.WorkflowSpec) -> list[str]:
    errors: list[str] = []
    if not spec.name:
        errors.append("workflow: name is empty")
    if spec.ir_version != 1:
        errors.append(f"workflow {spec.name}: ir_version {spec.ir_version} is not supported (expected 1)")
    inputs = {i.name for i in spec.inputs}
    produced: dict[str, set[str]] = {}
    for node in spec.nodes:
        if node.id in produced:
            errors.append(f"node {node.id}: duplicate node id")
        produced[node.id] = set(node.outputs)
    for node in spec.nodes:
        expected = _expected_inputs(node, errors)
        bound = [b.name for b in node.inputs]
        for name in sorted(set(expected) - set(bound)):
            errors.append(f"node {node.id}: missing required input {name!r}")
        for name in sorted(set(bound) - set(expected)) if expected else []:
            errors.append(f"node {node.id}: unexpected input {name!r} (expects {list(expected)})")
        for binding in node.inputs:
            source = binding.WhichOneof("source")
            if source == "ref" and binding.ref.output not in produced.get(binding.ref.node, set()):
                errors.append(
                    f"node {node.id}: input {binding.name!r} refers to "
                    f"{binding.ref.node}.{binding.ref.output}, which does not exist"
                )
            elif source == "workflow_input" and binding.workflow_input not in inputs:
                errors.append(
                    f"node {node.id}: input {binding.name!r} refers to unknown workflow input "
                    f"{binding.workflow_input!r}"
                )
            elif source is None:
                errors.append(f"node {node.id}: input {binding.name!r} has no source")
        for patch in node.patches:
            if node.op != operators.DENOISE_LOOP:
                errors.append(f"node {node.id}: patches apply to denoise loops only, not {node.op}")
            if not patch.source or not math.isfinite(patch.scale):
                errors.append(
                    f"node {node.id}: a LoRA needs a source and a finite scale, "
                    f"got {patch.source!r} at {patch.scale}"
                )
    cycle = _find_cycle(spec)
    if cycle:
        errors.append(f"cycle: {' -> '.join(cycle)}")
    if not spec.outputs:
        errors.append(f"workflow {spec.name}: declares no outputs")
    for output in spec.outputs:
        if output.source.output not in produced.get(output.source.node, set()):
            errors.append(
                f"output {output.name}: refers to {output.source.node}.{output.source.output}, "
                "which does not exist"
            )
    return errors


def _expected_inputs(node: compiler_pb2.NodeSpec, errors: list[str]) -> tuple[str, ...]:
    if node.op == operators.DENOISE_LOOP:
        for attribute in operators.DENOISE_LOOP_ATTRIBUTES:
            if attribute not in node.attributes:
                errors.append(f"node {node.id}: denoise loop needs attribute {attribute!r}")
        for attribute in ("latent_channels", "vae_scale_factor", "extra_iterations"):
            value = node.attributes.get(attribute, "0")
            if not value.isdigit():
                errors.append(
                    f"node {node.id}: attribute {attribute} must be a non-negative integer, got {value!r}"
                )
        return operators.DENOISE_LOOP_INPUTS
    try:
        signature = operators.signature(node.op, node.mode)
    except KeyError as error:
        errors.append(f"node {node.id}: {error.args[0]}")
        return ()
    for output in node.outputs:
        if output not in signature.outputs:
            errors.append(f"node {node.id}: {node.op}.{node.mode} has no output {output!r}")
    return signature.inputs


def _find_cycle(spec: compiler_pb2.WorkflowSpec) -> list[str]:
    edges = {n.id: [b.ref.node for b in n.inputs if b.WhichOneof("source") == "ref"] for n in spec.nodes}
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


def _resolve(binding: compiler_pb2.Binding, request_inputs: dict[str, Scalar]) -> Ref | Scalar:
    source = binding.WhichOneof("source")
    if source == "ref":
        return Ref(binding.ref.node, binding.ref.output)
    if source == "workflow_input":
        return request_inputs[binding.workflow_input]
    value = from_value(binding.constant)
    if value is None or not isinstance(value, str | int | float | bool):
        raise ValueError(f"input {binding.name}: constant must be a scalar")
    return value


def instantiate(spec: compiler_pb2.WorkflowSpec, request_inputs: dict[str, Scalar]) -> RequestGraph:
    """The graph of model calls for one request (its inputs already validated and defaulted)."""
    nodes: dict[str, TaskNode] = {}
    renamed: dict[Ref, Ref] = {}  # a template output → the request node that produces it

    def bind(binding: compiler_pb2.Binding) -> Ref | Scalar:
        value = _resolve(binding, request_inputs)
        return renamed.get(value, value) if isinstance(value, Ref) else value

    for node in spec.nodes:
        inputs = {b.name: bind(b) for b in node.inputs}
        if node.op == operators.DENOISE_LOOP:
            final = _unroll_denoise_loop(node, inputs, nodes)
            renamed[Ref(node.id, "latents")] = final
        else:
            nodes[node.id] = TaskNode(node.id, node.op, node.model, node.mode, inputs, tuple(node.outputs))
    outputs = {
        o.name: renamed.get(Ref(o.source.node, o.source.output), Ref(o.source.node, o.source.output))
        for o in spec.outputs
    }
    graph = RequestGraph(nodes=nodes, outputs=outputs)
    eliminate_dead_nodes(graph)
    compute_depths(graph)
    count_consumers(graph)
    return graph


def _unroll_denoise_loop(
    loop: compiler_pb2.NodeSpec, inputs: dict[str, Ref | Scalar], nodes: dict[str, TaskNode]
) -> Ref:
    steps = inputs["steps"]
    guidance = inputs["guidance_scale"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"node {loop.id}: steps must be a positive integer per request, got {steps!r}")
    if not isinstance(guidance, int | float):
        raise ValueError(f"node {loop.id}: guidance_scale must be a number per request, got {guidance!r}")
    cfg = guidance > 1.0
    iterations = steps + int(loop.attributes.get("extra_iterations", "0"))
    scheduler = loop.attributes["scheduler"]
    state_key = loop.id
    patches = tuple((patch.source, patch.scale) for patch in loop.patches)
    init_id = f"{loop.id}/init"
    nodes[init_id] = TaskNode(
        init_id,
        "noise_scheduler",
        scheduler,
        "init",
        {
            "seed": inputs["seed"],
            "height": inputs["height"],
            "width": inputs["width"],
            "steps": steps,
            "iterations": iterations,
            "latent_channels": int(loop.attributes["latent_channels"]),
            "vae_scale_factor": int(loop.attributes["vae_scale_factor"]),
        },
        ("latents", "model_input", "timestep"),
        state_key=state_key,
    )
    previous = init_id
    for step in range(iterations):
        prefix = f"{loop.id}/step{step}"

        def denoiser(
            branch: str, embeds: Ref | Scalar, prefix: str = prefix, previous: str = previous
        ) -> str:
            node_id = f"{prefix}/{branch}"
            nodes[node_id] = TaskNode(
                node_id,
                "unet",
                loop.model,
                "denoise",
                {
                    "sample": Ref(previous, "model_input"),
                    "timestep": Ref(previous, "timestep"),
                    "encoder_hidden_states": embeds,
                },
                ("noise_pred",),
                patches=patches,
            )
            return node_id

        sched_inputs: dict[str, Ref | Scalar] = {"latents": Ref(previous, "latents"), "step_index": step}
        if cfg:  # the unconditional branch first, as diffusers batches them
            uncond = denoiser("uncond", inputs["negative_prompt_embeds"])
            cond = denoiser("cond", inputs["prompt_embeds"])
            sched_inputs |= {
                "noise_pred_uncond": Ref(uncond, "noise_pred"),
                "noise_pred_cond": Ref(cond, "noise_pred"),
                "guidance_scale": float(guidance),
            }
            mode = "cfg_step"
        else:
            cond = denoiser("cond", inputs["prompt_embeds"])
            sched_inputs["noise_pred"] = Ref(cond, "noise_pred")
            mode = "step"
        step_id = f"{prefix}/scheduler"
        nodes[step_id] = TaskNode(
            step_id,
            "noise_scheduler",
            scheduler,
            mode,
            sched_inputs,
            ("latents", "model_input", "timestep"),
            state_key=state_key,
            step=step + 1,
            total_steps=iterations,
        )
        previous = step_id
    return Ref(previous, "latents")


def _refs(node: TaskNode) -> list[Ref]:
    return [value for value in node.inputs.values() if isinstance(value, Ref)]


def eliminate_dead_nodes(graph: RequestGraph) -> None:
    """Drop nodes no workflow output depends on (e.g. the negative prompt when CFG is off)."""
    live: set[str] = set()
    queue = deque(ref.node for ref in graph.outputs.values())
    while queue:
        node_id = queue.popleft()
        if node_id in live:
            continue
        live.add(node_id)
        queue.extend(ref.node for ref in _refs(graph.nodes[node_id]))
    graph.nodes = {node_id: node for node_id, node in graph.nodes.items() if node_id in live}


def compute_depths(graph: RequestGraph) -> None:
    for node in reversed(list(graph.nodes.values())):  # reverse topological order
        node.depth = max(node.depth, 1)
        for ref in _refs(node):
            producer = graph.nodes[ref.node]
            producer.depth = max(producer.depth, node.depth + 1)


def count_consumers(graph: RequestGraph) -> None:
    """How many nodes read each tensor (+1 for a workflow output): the reference counts for GC."""
    counts: dict[Ref, int] = {}
    for node in graph.nodes.values():
        for ref in _refs(node):
            counts[ref] = counts.get(ref, 0) + 1
    for ref in graph.outputs.values():
        counts[ref] = counts.get(ref, 0) + 1
    graph.consumers = counts
