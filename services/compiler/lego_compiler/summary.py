"""A compiled template in numbers (pure): what `lego workflows compile` prints."""

from __future__ import annotations

from collections import Counter
from typing import Any

from lego.v1 import compiler_pb2
from lego.validation import node_bindings


def edges(spec: compiler_pb2.WorkflowSpec) -> list[str]:
    """`producer.output -> consumer.input` for every node-to-node edge (adapters' inputs included)."""
    found = []
    for node in spec.nodes:
        for binding in node_bindings(node):
            if binding.WhichOneof("source") == "ref":
                found.append(f"{binding.ref.node}.{binding.ref.output} -> {node.id}.{binding.name}")
    return found


def describe(spec: compiler_pb2.WorkflowSpec, given_nodes: int | None = None) -> dict[str, Any]:
    models = Counter(node.model for node in spec.nodes if node.model)
    models.update(adapter.model for node in spec.nodes for adapter in node.adapters)
    return {
        "name": spec.name,
        "ir_version": spec.ir_version,
        "node_count": len(spec.nodes),
        "removed_by_optimisation": (given_nodes - len(spec.nodes)) if given_nodes is not None else 0,
        "nodes_per_model": dict(sorted(models.items())),
        "nodes_per_op": dict(sorted(Counter(node.op for node in spec.nodes).items())),
        "inputs": [i.name for i in spec.inputs],
        "outputs": {o.name: f"{o.source.node}.{o.source.output}" for o in spec.outputs},
        "edges": edges(spec),
    }
