"""A synthetic LoRA mix for the asynchronous-LoRA benchmark.

`--loras zipf:distinct=N,s=S[,seed=K]` gives each request one of N LoRAs (`emulated-lora/style-i`),
drawn by Zipf rank as lego_cli.prompts draws prompts: a few popular LoRAs that the workers keep and
a long tail they fetch (each fetch takes its emulated time: lego_worker.emulated_backend
`lora_fetch_s`, log-normal around a production trace's 4.4 s). A LoRA is part of a workflow's
template, so each (tenant, LoRA) pair is a workflow of its own: the tenant's, with that LoRA on its
denoise loop and the loop's `lora_async_steps` bound.
"""

from __future__ import annotations

from lego import operators
from lego.v1 import compiler_pb2

from lego_cli.prompts import draw_ranks, parse_zipf
from lego_cli.workloads import Workload

MAX_LORAS = 1000
WHAT = "LoRA mix"


def parse_lora_mix(spec: str) -> int:
    """The number of distinct LoRAs; errors name the field, its limit and the value."""
    distinct, _, _ = parse_zipf(spec, WHAT, MAX_LORAS)
    return distinct


def lora_source(rank: int) -> str:
    return f"emulated-lora/style-{rank}.safetensors"


def variant(tenant: str, rank: int) -> str:
    return f"{tenant}+lora{rank}"


def _with_lora(spec: compiler_pb2.WorkflowSpec, rank: int, async_steps: int) -> compiler_pb2.WorkflowSpec:
    patched = compiler_pb2.WorkflowSpec()
    patched.CopyFrom(spec)
    patched.name = f"{spec.name}-lora{rank}"
    for node in patched.nodes:
        if node.op == operators.DENOISE_LOOP:
            node.patches.add(source=lora_source(rank), scale=1.0)
            if async_steps:
                node.attributes["lora_async_steps"] = str(async_steps)
    return patched


def with_loras(chosen: Workload, spec: str, async_steps: int) -> Workload:
    """The workload plus every tenant's variant with each LoRA of the mix (tenant `A+lora3`)."""
    workflows = dict(chosen.workflows)
    inputs = dict(chosen.inputs)
    for tenant, base in chosen.workflows.items():
        for rank in range(parse_lora_mix(spec)):
            workflows[variant(tenant, rank)] = _with_lora(base, rank, async_steps)
            inputs[variant(tenant, rank)] = chosen.inputs[tenant]
    return Workload(workflows, inputs)


def assign_loras(spec: str, tenants: list[str]) -> list[str]:
    """Each request's workflow variant: its tenant with the LoRA drawn for it (seeded)."""
    ranks = draw_ranks(spec, len(tenants), WHAT, MAX_LORAS)
    return [variant(tenant, rank) for tenant, rank in zip(tenants, ranks, strict=True)]
