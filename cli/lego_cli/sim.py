"""Simulate a trace against a cluster of N GPUs (profiled H800s) under a scheduling policy.

`lego sim --gpus 8 --trace FILE --family sd15|flux-schnell --policy lego,static --json OUT`. The
trace's tenants map to the family's three workflows (A: txt2img, B: ControlNet canny, C: ControlNet
depth).
`--rs 0.5,1,2` replays the trace at those multiples of its request rate (burst shape kept); with a
directory as `--trace` every trace file in it is run (its request scale is read from the name).
The simulator drives the coordinator's own scheduler core (lego_coordinator.simulator).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from lego.builtin_workflows import flux_txt2img, sd15_controlnet, sd15_txt2img
from lego.profiles import ProfileSet, default_profile_dir, load_batch_sizes
from lego.traces import TraceRequest, load_trace, rescale
from lego.v1 import compiler_pb2
from lego.values import Scalar
from lego_coordinator.scheduler import POLICIES
from lego_coordinator.simulator import Arrival, Simulator, offered_gpu_seconds, standalone_latencies
from lego_worker.images import encode_data_uri

from lego_cli.plot import attainment_plot

# The control image of B and C requests (emulated workers only check that it is there).
CONTROL_IMAGE = encode_data_uri(np.full((64, 64, 3), 128, dtype=np.uint8))
Family = Callable[[], tuple[dict[str, compiler_pb2.WorkflowSpec], dict[str, dict[str, Scalar]]]]


def _sd15() -> tuple[dict[str, compiler_pb2.WorkflowSpec], dict[str, dict[str, Scalar]]]:
    workflows = {
        "A": sd15_txt2img("sd15-txt2img", "sd15"),
        "B": sd15_controlnet("sd15-canny", "sd15", controlnet="controlnet_canny"),
        "C": sd15_controlnet("sd15-depth", "sd15", controlnet="controlnet_depth"),
    }
    common: dict[str, Scalar] = {"prompt": "a photo", "steps": 50, "guidance_scale": 7.5}
    inputs = {
        "A": common,
        "B": {**common, "control_image": CONTROL_IMAGE},
        "C": {**common, "control_image": CONTROL_IMAGE},
    }
    return workflows, inputs


def _flux_schnell() -> tuple[dict[str, compiler_pb2.WorkflowSpec], dict[str, dict[str, Scalar]]]:
    """FLUX.1-schnell, 4 steps, 1024x1024, with FLUX.1-dev's ControlNets (as in the paper's setup).
    Unlike the paper's runs it has no CFG branches: FLUX takes its guidance embedded."""
    source, dev = "black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-dev"
    workflows = {
        "A": flux_txt2img("flux-schnell-txt2img", source, default_steps=4),
        "B": flux_txt2img(
            "flux-schnell-canny", source, default_steps=4, controlnet=f"{dev}:controlnet_canny"
        ),
        "C": flux_txt2img(
            "flux-schnell-depth", source, default_steps=4, controlnet=f"{dev}:controlnet_depth"
        ),
    }
    common: dict[str, Scalar] = {"prompt": "a photo"}
    inputs = {
        "A": common,
        "B": {**common, "control_image": CONTROL_IMAGE},
        "C": {**common, "control_image": CONTROL_IMAGE},
    }
    return workflows, inputs


FAMILIES: dict[str, Family] = {"sd15": _sd15, "flux-schnell": _flux_schnell}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--trace", type=Path, required=True, help="a trace file, or a directory of them")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd15")
    parser.add_argument("--policy", default="lego", help=f"one or more of {','.join(POLICIES)}")
    parser.add_argument("--rs", default="", help="request-rate multiples of a single trace, e.g. 0.5,1,2")
    parser.add_argument("--slo-factor", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="SLO attainment vs RS per policy (PNG)")


def series(trace: Path, rs: str) -> list[tuple[float, list[TraceRequest]]]:
    """(request scale, requests) for each run: every trace of a directory (its scale read from the
    name), or one trace at each multiple of its rate in `rs` ("0.5,1,2"; empty: as recorded)."""
    if trace.is_dir():
        runs = []
        for path in sorted(trace.glob("*.txt")):
            match = re.search(r"_rs([0-9.]+)_", path.name)
            runs.append((float(match.group(1)) if match else 1.0, load_trace(path)))
        return sorted(runs, key=lambda run: run[0])
    requests = load_trace(trace)
    factors = [float(f) for f in rs.split(",") if f] or [1.0]
    return [(factor, rescale(requests, factor)) for factor in factors]


def run_simulation(args: argparse.Namespace) -> dict[str, Any]:
    policies = [p for p in args.policy.split(",") if p]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise SystemExit(f"error: unknown policy {unknown[0]!r} (choose from {', '.join(POLICIES)})")
    directory = default_profile_dir()
    profiles, batch_sizes = ProfileSet(directory), load_batch_sizes(directory)
    workflows, inputs = FAMILIES[args.family]()
    standalone = standalone_latencies(workflows, inputs, profiles)
    runs: list[dict[str, Any]] = []
    max_rs: dict[str, float | None] = {}
    for policy in policies:
        best: float | None = None
        for scale, requests in series(args.trace, args.rs):
            arrivals = [Arrival(r.time_s, r.tenant, inputs[r.tenant]) for r in requests]
            simulator = Simulator(workflows, args.gpus, profiles, policy, batch_sizes, args.slo_factor)
            summary = simulator.run(arrivals).summary()
            duration = max(requests[-1].time_s, 1e-9) if requests else 1.0
            offered = offered_gpu_seconds(arrivals, standalone) / duration  # GPUs' worth of work
            runs.append({"policy": policy, "rs": scale, "offered_gpus": round(offered, 3)} | summary)
            attainment = summary["slo_attainment"]
            if isinstance(attainment, float) and attainment >= 0.9:
                best = scale if best is None else max(best, scale)
        max_rs[policy] = best
    first = runs[0]
    capacity_rs = first["rs"] * args.gpus / first["offered_gpus"] if first["offered_gpus"] else None
    return {
        "family": args.family,
        "gpus": args.gpus,
        "standalone_s": {name: round(s, 4) for name, s in standalone.items()},
        "capacity_rs": round(capacity_rs, 3) if capacity_rs else None,
        "max_rs_at_90": max_rs,
        "runs": runs,
    }


def run(args: argparse.Namespace) -> int:
    figures = run_simulation(args)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    if args.plot is not None:
        attainment_plot(figures["runs"], args.plot, f"lego sim: {args.family}, {args.gpus} GPUs")
    return 0
