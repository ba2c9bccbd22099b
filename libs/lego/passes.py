"""Optimisation passes over a workflow template (pure: each returns a new spec, the input is unchanged).

- `eliminate_common_subexpressions`: nodes with the same operator, model, mode, inputs, attributes,
  patches and adapters compute the same values; all but the first are dropped and their consumers
  read the first (e.g. the same negative prompt encoded twice).
- `eliminate_dead_template_nodes`: nodes no workflow output depends on.
- `optimise`: both, in that order (what the compiler stores).

The per-request passes (unrolling, CFG split, depths, reference counts) are in `lego.graph`.
"""

from __future__ import annotations

from collections import deque

from lego.v1 import compiler_pb2
from lego.validation import node_bindings


def _copy(spec: compiler_pb2.WorkflowSpec) -> compiler_pb2.WorkflowSpec:
    result = compiler_pb2.WorkflowSpec()
    result.CopyFrom(spec)
    return result


def _signature(node: compiler_pb2.NodeSpec) -> bytes:
    """The node without its id, serialised deterministically: equal for equal computations."""
    anonymous = compiler_pb2.NodeSpec()
    anonymous.CopyFrom(node)
    anonymous.id = ""
    inputs = sorted(anonymous.inputs, key=lambda b: b.name)
    del anonymous.inputs[:]
    anonymous.inputs.extend(inputs)
    return anonymous.SerializeToString(deterministic=True)


def eliminate_common_subexpressions(spec: compiler_pb2.WorkflowSpec) -> compiler_pb2.WorkflowSpec:
    """Merge identical nodes (in node order, which `Workflow` records topologically)."""
    result = _copy(spec)
    canonical: dict[bytes, str] = {}
    renamed: dict[str, str] = {}  # a dropped node → the node that computes the same values
    kept: list[compiler_pb2.NodeSpec] = []
    for node in result.nodes:
        for binding in node_bindings(node):
            if binding.WhichOneof("source") == "ref" and binding.ref.node in renamed:
                binding.ref.node = renamed[binding.ref.node]
        key = _signature(node)
        if key in canonical:
            renamed[node.id] = canonical[key]
        else:
            canonical[key] = node.id
            kept.append(node)
    del result.nodes[:]
    result.nodes.extend(kept)
    for output in result.outputs:
        output.source.node = renamed.get(output.source.node, output.source.node)
    return result


def eliminate_dead_template_nodes(spec: compiler_pb2.WorkflowSpec) -> compiler_pb2.WorkflowSpec:
    result = _copy(spec)
    by_id = {node.id: node for node in result.nodes}
    live: set[str] = set()
    queue = deque(output.source.node for output in result.outputs)
    while queue:
        node_id = queue.popleft()
        if node_id in live or node_id not in by_id:
            continue
        live.add(node_id)
        queue.extend(b.ref.node for b in node_bindings(by_id[node_id]) if b.WhichOneof("source") == "ref")
    kept = [node for node in result.nodes if node.id in live]
    del result.nodes[:]
    result.nodes.extend(kept)
    return result


def optimise(spec: compiler_pb2.WorkflowSpec) -> compiler_pb2.WorkflowSpec:
    return eliminate_dead_template_nodes(eliminate_common_subexpressions(spec))
