"""The evaluation's workloads: each family's three workflows (trace tenants A, B, C), mixes of
families and skewed tenant mixes, and the arrival series (trace files, rate multiples, synthetic
Poisson/Gamma arrivals). `lego sim` and `lego bench slo` both take their requests from here, so the
simulator and the live cluster replay exactly the same work.

Tenants map as in the paper's setup (traces/README.md): A → txt2img, B → ControlNet canny, C →
ControlNet depth (SD3-medium: pose). The models are the real checkpoints' ids; the emulated backend
and the simulator time them from their H800 profiles (nothing is loaded).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lego.builtin_workflows import flux_txt2img, sd3_txt2img, sd15_controlnet, sd15_txt2img
from lego.data_uri import encode_data_uri
from lego.traces import TraceRequest, load_trace, parse_synthetic, rescale
from lego.v1 import compiler_pb2
from lego.values import Scalar

# The control image of B and C requests (emulated workers only check that it is there).
CONTROL_IMAGE = encode_data_uri(np.full((64, 64, 3), 128, dtype=np.uint8))
TENANTS = ("A", "B", "C")
STANDALONE_RUNS = 2  # per workflow, before a run (`standalone_runs`)
FLUX_DEV = "black-forest-labs/FLUX.1-dev"


@dataclass(frozen=True)
class Workload:
    """Workflows by tenant name (`A`, or `family/A` in a mix) and the inputs each request sends."""

    workflows: dict[str, compiler_pb2.WorkflowSpec]
    inputs: dict[str, dict[str, Scalar]]


def _tenants(
    a: compiler_pb2.WorkflowSpec,
    b: compiler_pb2.WorkflowSpec,
    c: compiler_pb2.WorkflowSpec,
    common: dict[str, Scalar],
) -> Workload:
    control = {**common, "control_image": CONTROL_IMAGE}
    return Workload({"A": a, "B": b, "C": c}, {"A": common, "B": control, "C": control})


def _sd15() -> Workload:
    """SD 1.5, 50 steps, CFG 7.5, 512x512."""
    return _tenants(
        sd15_txt2img("sd15-txt2img", "sd15"),
        sd15_controlnet("sd15-canny", "sd15", controlnet="controlnet_canny"),
        sd15_controlnet("sd15-depth", "sd15", controlnet="controlnet_depth"),
        {"prompt": "a photo", "steps": 50, "guidance_scale": 7.5},
    )


def _flux(family: str, source: str, steps: int) -> Workload:
    """FLUX.1 at 1024x1024 with FLUX.1-dev's ControlNets (as in the paper's setup). Unlike the paper's
    runs it has no CFG branches: FLUX takes its guidance embedded in one transformer call."""
    return _tenants(
        flux_txt2img(f"{family}-txt2img", source, default_steps=steps),
        flux_txt2img(
            f"{family}-canny", source, default_steps=steps, controlnet=f"{FLUX_DEV}:controlnet_canny"
        ),
        flux_txt2img(
            f"{family}-depth", source, default_steps=steps, controlnet=f"{FLUX_DEV}:controlnet_depth"
        ),
        {"prompt": "a photo"},
    )


def _sd3(family: str, source: str, third: str, guidance: float) -> Workload:
    """SD3-medium / SD3.5-Large, 28 steps with CFG, 1024x1024."""
    return _tenants(
        sd3_txt2img(f"{family}-txt2img", source),
        sd3_txt2img(f"{family}-canny", source, controlnet="controlnet_canny"),
        sd3_txt2img(f"{family}-{third.removeprefix('controlnet_')}", source, controlnet=third),
        {"prompt": "a photo", "steps": 28, "guidance_scale": guidance},
    )


FAMILIES: dict[str, Callable[[], Workload]] = {
    "sd15": _sd15,
    "flux-schnell": lambda: _flux("flux-schnell", "black-forest-labs/FLUX.1-schnell", 4),
    "flux-dev": lambda: _flux("flux-dev", FLUX_DEV, 50),
    "sd3-medium": lambda: _sd3(
        "sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", "controlnet_pose", 7.0
    ),
    "sd35-large": lambda: _sd3(
        "sd35-large", "stabilityai/stable-diffusion-3.5-large", "controlnet_depth", 3.5
    ),
}


def workload(families: str) -> Workload:
    """One family (tenants A, B, C) or a comma-separated mix of them (tenants `family/A`, ...)."""
    names = [name for name in families.split(",") if name]
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown or not names:
        raise ValueError(f"unknown family {(unknown or [families])[0]!r} (choose from {', '.join(FAMILIES)})")
    if len(names) == 1:
        return FAMILIES[names[0]]()
    workflows: dict[str, compiler_pb2.WorkflowSpec] = {}
    inputs: dict[str, dict[str, Scalar]] = {}
    for name in names:
        family = FAMILIES[name]()
        workflows |= {f"{name}/{tenant}": spec for tenant, spec in family.workflows.items()}
        inputs |= {f"{name}/{tenant}": given for tenant, given in family.inputs.items()}
    return Workload(workflows, inputs)


def assign_tenants(requests: list[TraceRequest], tenants: list[str], skew: float, seed: int) -> list[str]:
    """The workload tenant of each request: its trace tenant (in a mix, within a family drawn at
    random), or, with `skew` > 0, tenant A for that share of the requests and the trace's for the
    rest. Seeded: the simulator and the live bench draw the same."""
    chooser = random.Random(seed)
    families = sorted({t.split("/")[0] for t in tenants if "/" in t})
    chosen = []
    for request in requests:
        tenant = "A" if chooser.random() < skew else request.tenant
        chosen.append(f"{chooser.choice(families)}/{tenant}" if families else tenant)
    return chosen


def series(trace: str, rs: str) -> list[tuple[float, list[TraceRequest]]]:
    """(request scale, requests) for each run: every trace file of a directory (its scale read from
    the name), one trace file at each multiple of its rate in `rs` ("0.5,1,2"; empty: as recorded),
    or synthetic arrivals (`poisson:rate=2,duration=120`, `gamma:rate=2,cv=3,duration=120`) at
    each multiple of their rate."""
    factors = [float(f) for f in rs.split(",") if f] or [1.0]
    if trace.startswith(("poisson:", "gamma:")):
        requests = parse_synthetic(trace)
        return [(factor, rescale(requests, factor)) for factor in factors]
    path = Path(trace)
    if path.is_dir():
        runs = []
        for file in sorted(path.glob("*.txt")):
            match = re.search(r"_rs([0-9.]+)_", file.name)
            runs.append((float(match.group(1)) if match else 1.0, load_trace(file)))
        if not runs:
            raise ValueError(f"no trace files (*.txt) in {path}")
        return sorted(runs, key=lambda run: run[0])
    if not path.is_file():
        raise ValueError(f"trace {trace!r} is neither a file, a directory, nor poisson:/gamma: arrivals")
    requests = load_trace(path)
    return [(factor, rescale(requests, factor)) for factor in factors]


def standalone_runs(chosen: Workload) -> list[str]:
    """The tenants of the requests a live bench sends alone on the idle cluster, one after another,
    before its warm-up (lego_cli.bench_slo: the first run of a workflow loads its models, the last
    is its standalone latency). The simulator replays them too: the models they load, one replica
    each, are what the warm-up and the run start from."""
    return [tenant for tenant in chosen.workflows for _ in range(STANDALONE_RUNS)]


def warmup_of(
    arrivals: list[tuple[float, str]], tenants: list[str], seconds: float
) -> list[tuple[float, str]]:
    """The warm-up replayed before a run, not counted: its arrivals (time, tenant) in the first
    `seconds`, then one request of every tenant not among them, so that each workflow has run once
    (its models loaded where the policy puts them) before the measurement, whatever the policy."""
    window = [(at, tenant) for at, tenant in arrivals if at <= seconds]
    seen = {tenant for _, tenant in window}
    return window + [(seconds, tenant) for tenant in tenants if tenant not in seen]
