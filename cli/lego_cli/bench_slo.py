"""Trace replay on a live cluster of emulated GPUs: SLO attainment under a scheduling policy.

`lego bench slo --trace FILE --family sd15 --workers 8 --policy lego --time-scale K --json OUT`
starts an embedded cluster (emulated H800 workers, admission control on), registers the family's
three workflows (tenants A, B, C of the trace), measures each one's standalone latency alone on the
idle cluster, sets its SLO to `--slo-factor` x that, and replays the trace open loop: each request
is sent at its arrival time (divided by K, as the emulated GPUs run K times faster), whatever the
cluster is doing. Latencies and GPU-seconds are reported in emulated-GPU time (wall time x K).
`--rs 0.5,1,2` replays the trace at those multiples of its request rate; `--duration S` keeps only
its first S seconds. The figures have the simulator's keys (`lego sim`), so the two can be compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from lego.client import AsyncGatewayClient, LegoError
from lego.grpc_server import channel
from lego.traces import TraceRequest
from lego.v1 import compiler_pb2_grpc
from lego.values import Scalar
from lego_coordinator.scheduler import POLICIES
from lego_coordinator.service import CoordinatorConfig
from lego_coordinator.simulator import Outcome, summarize
from lego_worker.agent import WorkerConfig

from lego_cli.cluster import EmbeddedCluster
from lego_cli.plot import attainment_plot
from lego_cli.sim import FAMILIES, series

UNBOUNDED_SLO_MS = 3_600_000.0  # the standalone runs must not be dropped while their models load
STANDALONE_RUNS = 2  # the first run of a workflow loads its models; the last is its standalone latency


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, required=True, help="a trace file, or a directory of them")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd15")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--policy", default="lego", help=f"one or more of {','.join(POLICIES)}")
    parser.add_argument("--time-scale", type=float, default=10.0, help="emulated GPUs run K times faster")
    parser.add_argument("--rs", default="", help="request-rate multiples of a single trace, e.g. 0.5,1,2")
    parser.add_argument("--duration", type=float, default=0.0, help="replay only the first S seconds")
    parser.add_argument("--slo-factor", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="SLO attainment vs RS per policy (PNG)")


async def _register(
    cluster: EmbeddedCluster, family: str
) -> tuple[dict[str, str], dict[str, dict[str, Scalar]]]:
    workflows, inputs = FAMILIES[family]()
    async with channel(cluster.compiler_address) as chan:
        stub = compiler_pb2_grpc.CompilerStub(chan)
        for spec in workflows.values():
            await stub.RegisterWorkflow(spec)
    return {tenant: spec.name for tenant, spec in workflows.items()}, inputs


async def _standalone_s(
    client: AsyncGatewayClient, names: dict[str, str], inputs: dict[str, dict[str, Scalar]]
) -> dict[str, float]:
    """Each workflow alone on the idle cluster, wall seconds (its models loaded by a first run)."""
    measured = {}
    for tenant, name in names.items():
        for _ in range(STANDALONE_RUNS):
            started = time.perf_counter()
            await client.generate(name, inputs[tenant], slo_ms=UNBOUNDED_SLO_MS)
            measured[tenant] = time.perf_counter() - started
    return measured


async def _one(
    client: AsyncGatewayClient,
    workflow: str,
    inputs: dict[str, Scalar],
    slo_s: float,
    at: float,
    scale: float,
) -> tuple[Outcome, float]:
    """Send at wall time `at`; the outcome in emulated time, and how late the send was."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    sent = time.perf_counter()
    outcome = Outcome(workflow, (sent - at) * scale, slo_s * scale)
    try:
        await client.generate(workflow, inputs, slo_ms=slo_s * 1000, request_id=uuid.uuid4().hex)
        outcome.latency_s = (time.perf_counter() - sent) * scale
    except LegoError as error:
        outcome.failure = {
            grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected",
            grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
        }.get(error.code, error.code.name.lower())
    return outcome, sent - at


async def replay(
    args: argparse.Namespace, policy: str, runs: list[tuple[float, list[TraceRequest]]]
) -> list[dict]:
    """Every run of the series on one fresh cluster with `policy` (one cluster per policy)."""
    cluster = EmbeddedCluster(
        workers=args.workers,
        worker=WorkerConfig(backend="emulated", time_scale=args.time_scale),
        coordinator_config=CoordinatorConfig(
            policy=policy, enforce_slo=True, slo_factor=args.slo_factor, time_scale=args.time_scale
        ),
    )
    results = []
    async with cluster, AsyncGatewayClient(cluster.gateway_address, timeout_s=3600) as client:
        names, inputs = await _register(cluster, args.family)
        standalone = await _standalone_s(client, names, inputs)
        for scale, requests in runs:
            if args.duration > 0:
                requests = [r for r in requests if r.time_s <= args.duration]
            start = time.perf_counter() + 0.5
            sends = [
                _one(
                    client,
                    names[r.tenant],
                    inputs[r.tenant],
                    args.slo_factor * standalone[r.tenant],
                    start + r.time_s / args.time_scale,
                    args.time_scale,
                )
                for r in requests
            ]
            answered = await asyncio.gather(*sends)
            lags = sorted(lag for _, lag in answered)
            results.append(
                {"policy": policy, "rs": scale}
                | summarize([outcome for outcome, _ in answered])
                | {
                    "failures": dict(Counter(o.failure for o, _ in answered if o.failure)),
                    "standalone_s": {names[t]: round(s * args.time_scale, 4) for t, s in standalone.items()},
                    "generator_lag_p99_ms": round(1000 * lags[int(0.99 * (len(lags) - 1))], 2)
                    if lags
                    else None,
                    "generator_lag_max_ms": round(1000 * lags[-1], 2) if lags else None,
                }
            )
            await asyncio.sleep(1.0)  # let the cluster drain between runs
    return results


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    policies = [p for p in args.policy.split(",") if p]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise SystemExit(f"error: unknown policy {unknown[0]!r} (choose from {', '.join(POLICIES)})")
    runs = series(args.trace, args.rs)
    results: list[dict[str, Any]] = []
    max_rs: dict[str, float | None] = {}
    for policy in policies:
        measured = asyncio.run(replay(args, policy, runs))
        results += measured
        passing = [r["rs"] for r in measured if (r["slo_attainment"] or 0) >= 0.9]
        max_rs[policy] = max(passing) if passing else None
    figures = {
        "family": args.family,
        "workers": args.workers,
        "time_scale": args.time_scale,
        "max_rs_at_90": max_rs,
        "runs": results,
    }
    return figures | results[0] if len(results) == 1 else figures  # one run: its figures at the top


def run(args: argparse.Namespace) -> int:
    figures = run_bench(args)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    if args.plot is not None:
        title = f"lego bench slo: {args.family}, {args.workers} emulated GPUs, time scale {args.time_scale:g}"
        attainment_plot(figures["runs"], args.plot, title)
    return 0
