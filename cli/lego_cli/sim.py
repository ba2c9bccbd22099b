"""Simulate a trace against a cluster of N GPUs (profiled H800s) under scheduling policies.

`lego sim --gpus 8 --trace FILE --family flux-schnell --policy lego,static --json OUT`. The trace's
tenants map to the family's three workflows (lego_cli.workloads); `--family a,b` mixes families (each
request's family drawn at random), `--skew 0.9` sends 90 % of the requests to tenant A.
`--trace` is a trace file (`--rs 0.5,1,2` replays it at those multiples of its rate, burst shape
kept), a directory of them (every file, its request scale read from the name) or synthetic arrivals
(`poisson:rate=2,duration=120`, `gamma:rate=2,cv=3,duration=120`). `--gpus 4,8,16` runs each cluster
size and reports the fewest GPUs that hold 90 % attainment. Each run is preceded by a warm-up (the
first `--warmup` seconds of its own arrivals, not counted). The simulator drives the coordinator's
own scheduler core (lego_coordinator.simulator).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from lego import native
from lego.profiles import ProfileSet, default_profile_dir, load_batch_sizes
from lego.traces import TraceRequest
from lego_coordinator.__main__ import add_ready_depth_flag
from lego_coordinator.scheduler import POLICIES
from lego_coordinator.simulator import Arrival, Simulator, offered_gpu_seconds, standalone_latencies

from lego_cli.plot import attainment_plot
from lego_cli.workloads import (
    FAMILIES,
    Workload,
    assign_tenants,
    series,
    standalone_runs,
    warmup_of,
    workload,
)

TARGET = 0.9  # the attainment a policy must hold


def add_workload_flags(parser: argparse.ArgumentParser) -> None:
    """The flags `lego sim` and `lego bench slo` share: what is replayed, and under which policies."""
    parser.add_argument(
        "--trace",
        "--traces",
        dest="trace",
        required=True,
        help="a trace file, a directory of them, or poisson:/gamma: arrivals",
    )
    parser.add_argument(
        "--family", default="sd15", help=f"one of {', '.join(FAMILIES)}, or several (a mix), comma-separated"
    )
    parser.add_argument("--skew", type=float, default=0.0, help="send this share of the requests to tenant A")
    parser.add_argument("--seed", type=int, default=0, help="draws the families of a mix and the skew")
    parser.add_argument(
        "--policy", "--policies", dest="policy", default="lego", help=f"one or more of {','.join(POLICIES)}"
    )
    parser.add_argument("--rs", default="", help="request-rate multiples of a single trace, e.g. 0.5,1,2")
    parser.add_argument(
        "--warmup",
        type=float,
        default=30.0,
        help="seconds of each run's arrivals replayed first (then one request of each workflow not in them)",
    )
    parser.add_argument("--slo-factor", type=float, default=2.0)
    add_ready_depth_flag(parser)
    parser.add_argument(
        "--profile", type=Path, default=None, help="profiles (default profiles/h800; see lego profile)"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="SLO attainment vs RS (or GPUs) per policy")


def configure(parser: argparse.ArgumentParser) -> None:
    add_workload_flags(parser)
    parser.add_argument("--gpus", default="8", help="cluster size, or several: 4,8,16")
    parser.add_argument(
        "--overhead-ms",
        type=float,
        default=0.0,
        help="control-plane time per batch beside its execution, as a live cluster adds (default 0)",
    )


def policies_of(text: str) -> list[str]:
    policies = [p for p in text.split(",") if p]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown or not policies:
        raise SystemExit(
            f"error: unknown policy {(unknown or [text])[0]!r} (choose from {', '.join(POLICIES)})"
        )
    return policies


def load_workload(args: argparse.Namespace) -> tuple[Workload, list[tuple[float, list[TraceRequest]]]]:
    """The workload and the arrival series the flags name; a bad flag exits naming it."""
    if not 0 <= args.skew <= 1:
        raise SystemExit(f"error: --skew must be between 0 and 1, got {args.skew}")
    try:
        return workload(args.family), series(args.trace, args.rs)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def arrivals_of(requests: list[TraceRequest], chosen: Workload, args: argparse.Namespace) -> list[Arrival]:
    tenants = assign_tenants(requests, sorted(chosen.workflows), args.skew, args.seed)
    return [Arrival(r.time_s, t, chosen.inputs[t]) for r, t in zip(requests, tenants, strict=True)]


def best_passing(runs: list[dict[str, Any]], key: str, smallest: bool) -> float | None:
    """The largest RS (or the fewest GPUs) among runs holding the target attainment."""
    passing = [run[key] for run in runs if (run["slo_attainment"] or 0.0) >= TARGET]
    if not passing:
        return None
    return min(passing) if smallest else max(passing)


def run_simulation(args: argparse.Namespace) -> dict[str, Any]:
    policies = policies_of(args.policy)
    try:
        gpu_counts = sorted({int(g) for g in str(args.gpus).split(",") if g})
    except ValueError:
        raise SystemExit(f"error: --gpus must be integers, got {args.gpus!r}") from None
    if not gpu_counts or gpu_counts[0] < 1:
        raise SystemExit(f"error: --gpus must be ≥ 1, got {args.gpus!r}")
    if not 0 <= args.overhead_ms < 10_000:
        raise SystemExit(f"error: --overhead-ms must be between 0 and 10000, got {args.overhead_ms}")
    overhead_s = args.overhead_ms / 1000
    chosen, runs_of_trace = load_workload(args)
    directory = args.profile or default_profile_dir()
    if not any(directory.glob("*.json")):
        raise SystemExit(f"error: --profile {directory} holds no profiles (*.json)")
    profiles, batch_sizes = ProfileSet(directory), load_batch_sizes(directory)
    standalone = standalone_latencies(chosen.workflows, chosen.inputs, profiles, overhead_s)
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for policy in policies:
        for gpus in gpu_counts:
            for scale, requests in runs_of_trace:
                arrivals = arrivals_of(requests, chosen, args)
                plan = warmup_of(
                    [(a.time_s, a.workflow) for a in arrivals], sorted(chosen.workflows), args.warmup
                )
                warmup = [Arrival(at, tenant, chosen.inputs[tenant]) for at, tenant in plan]
                alone = [Arrival(0.0, tenant, chosen.inputs[tenant]) for tenant in standalone_runs(chosen)]
                simulator = Simulator(
                    chosen.workflows,
                    gpus,
                    profiles,
                    policy,
                    batch_sizes,
                    args.slo_factor,
                    overhead_s=overhead_s,
                    ready_depth=args.ready_depth,
                )
                summary = simulator.run(arrivals, warmup, alone).summary()
                duration = max(requests[-1].time_s, 1e-9) if requests else 1.0
                offered = offered_gpu_seconds(arrivals, standalone) / duration  # GPUs' worth of work
                runs.append(
                    {"policy": policy, "gpus": gpus, "rs": scale, "offered_gpus": round(offered, 3)} | summary
                )
    first = runs[0]
    capacity_rs = first["rs"] * gpu_counts[0] / first["offered_gpus"] if first["offered_gpus"] else None
    figures: dict[str, Any] = {
        "family": args.family,
        "skew": args.skew,
        "gpus": gpu_counts[0] if len(gpu_counts) == 1 else gpu_counts,
        "overhead_ms": args.overhead_ms,
        "ready_depth": args.ready_depth,
        "standalone_s": {name: round(s, 4) for name, s in standalone.items()},
        "capacity_rs": round(capacity_rs, 3) if capacity_rs else None,
        "max_rs_at_90": {
            policy: best_passing(
                [r for r in runs if r["policy"] == policy and r["gpus"] == gpu_counts[0]], "rs", False
            )
            for policy in policies
        },
    }
    if len(gpu_counts) > 1:
        figures["min_gpus_at_90"] = {
            policy: {
                str(scale): best_passing(
                    [r for r in runs if r["policy"] == policy and r["rs"] == scale], "gpus", True
                )
                for scale, _ in runs_of_trace
            }
            for policy in policies
        }
    figures["simulation_wall_s"] = round(time.perf_counter() - started, 2)
    figures["compiled_core"] = native.requested()  # the scheduler compiled with mypyc (lego.native)
    figures["runs"] = runs
    return figures


def run(args: argparse.Namespace) -> int:
    figures = run_simulation(args)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    if args.plot is not None:
        by_gpus = isinstance(figures["gpus"], list) and len(series(args.trace, args.rs)) == 1
        gpus = "" if by_gpus else f", {figures['gpus']} GPUs"
        title = f"lego sim: {args.family}{f', skew {args.skew:g}' if args.skew else ''}{gpus}"
        attainment_plot(figures["runs"], args.plot, title, x="gpus" if by_gpus else "rs")
    return 0
