"""Trace replay on a live cluster of emulated GPUs: SLO attainment under a scheduling policy.

`lego bench slo --trace FILE --family flux-schnell --workers 8 --policy lego --time-scale K --json OUT`
starts an embedded cluster (emulated H800 workers, admission control on), registers the workload's
workflows (a family's tenants A, B, C, or a mix: lego_cli.workloads, the same as `lego sim`),
prefetches their models into every worker's host memory (private copies per workflow under the
monolithic policies), measures each workflow's standalone latency alone on the idle cluster, sets
its SLO to `--slo-factor` x that, replays a warm-up (the first `--warmup` seconds of the run's own
arrivals, not counted) and then the trace, open loop: each request is sent at its arrival time
(divided by K, as the emulated GPUs run K times faster), whatever the cluster is doing. Latencies
and GPU-seconds are reported in emulated-GPU time (wall time x K). `--duration S` keeps only the
first S seconds of each run. The figures have the simulator's keys, so the two can be compared.

`--connect GATEWAY --store etcd://HOST:PORT` replays on a running cluster instead (lego_cli.bench_target:
one policy, the cluster's; its workers must run the emulated backend at `--time-scale`).

`--opt embed-cache` replays every run twice on fresh clusters, without and with the workers' exact
text-embedding cache, and adds `speedup`: the baseline's median latency over the optimised one's,
both runs' busy device seconds, the cache's hit rate and the encoder seconds it saved.
`--prompts zipf:distinct=N,s=S` gives each request its own prompt from a synthetic set with a known
repetition structure (lego_cli.prompts); without it every request of a tenant sends the same prompt.
The standalone runs that set the SLOs send prompts of their own, so a cache never shortens them.
`--opt approx-cache` (needs `--prompts`) replays them again with approximate caching on every
text-to-image loop (lego_cli.approx): a request whose prompt is close to a finished one's skips up
to half its steps; per run, the requests resumed and the steps they skipped, and `approx_quality`,
what a skip costs in pixels, measured with real tiny models.

`--loras zipf:distinct=N,s=S` makes each request use one of N LoRAs (lego_cli.loras; the emulated
workers fetch a LoRA they do not hold in `--lora-fetch-s` seconds, median of a log-normal, and keep
`--lora-capacity` of them); the SLOs stay those of the workflows without LoRAs. `--opt async-lora`
replays such runs again with bounded asynchronous loading (`--lora-async-steps` K: a loop's first K
steps may run before its LoRA has loaded) and adds `lora_quality`, the image cost of K late steps
measured with real tiny models (lego_cli.lora_quality).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from lego.client import AsyncGatewayClient, LegoError
from lego.graph import instantiate
from lego.grpc_server import channel
from lego.request_inputs import resolve_inputs
from lego.traces import TraceRequest
from lego.v1 import compiler_pb2_grpc, worker_pb2, worker_pb2_grpc
from lego.values import Scalar
from lego_coordinator.scheduler import as_placed
from lego_coordinator.service import CoordinatorConfig
from lego_coordinator.simulator import Outcome, summarize
from lego_worker.agent import WorkerConfig
from lego_worker.emulated_backend import LORA_FETCH_MEDIAN_S
from lego_worker.lora_loads import DEFAULT_CAPACITY as DEFAULT_LORA_CAPACITY

from lego_cli import bench_target, lora_quality
from lego_cli.approx import measure_quality, with_approx_cache
from lego_cli.bench_target import BenchTarget, Counters
from lego_cli.cluster import EmbeddedCluster
from lego_cli.loras import assign_loras, parse_lora_mix, with_loras
from lego_cli.plot import attainment_plot
from lego_cli.prompts import draw_prompts, parse_prompt_set, repeat_share
from lego_cli.sim import TARGET, add_workload_flags, arrivals_of, load_workload, policies_of
from lego_cli.workloads import Workload, standalone_runs, warmup_of

UNBOUNDED_SLO_MS = 3_600_000.0  # the standalone runs must not be dropped while their models load
OPTIMISATIONS = ("embed-cache", "approx-cache", "async-lora")
DEFAULT_EMBEDDING_CACHE_MB = 256.0
DEFAULT_LORA_ASYNC_STEPS = 8


def configure(parser: argparse.ArgumentParser) -> None:
    add_workload_flags(parser)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--connect",
        default="",
        metavar="GATEWAY",
        help="replay on this running cluster (the gateway's gRPC HOST:PORT; started with --enforce-slo "
        "and the same --time-scale) instead of starting one",
    )
    parser.add_argument(
        "--store",
        default="etcd://127.0.0.1:2379",
        help="with --connect: the cluster's store, where its compiler and coordinator are found",
    )
    parser.add_argument("--time-scale", type=float, default=10.0, help="emulated GPUs run K times faster")
    parser.add_argument("--duration", type=float, default=0.0, help="replay only the first S seconds")
    parser.add_argument(
        "--opt",
        type=optimisations_of,
        default=(),
        help=f"replay each run without and with these optimisations: {', '.join(OPTIMISATIONS)}",
    )
    parser.add_argument(
        "--prompts",
        type=_zipf_flag(parse_prompt_set),
        default="",
        help="a prompt per request: zipf:distinct=N,s=S[,seed=K]",
    )
    parser.add_argument(
        "--embedding-cache-mb",
        type=float,
        default=DEFAULT_EMBEDDING_CACHE_MB,
        help=f"the embedding cache's size under --opt embed-cache (default {DEFAULT_EMBEDDING_CACHE_MB:g})",
    )
    parser.add_argument(
        "--loras",
        type=_zipf_flag(parse_lora_mix),
        default="",
        help="a LoRA per request: zipf:distinct=N,s=S[,seed=K]",
    )
    parser.add_argument(
        "--lora-async-steps",
        type=int,
        default=DEFAULT_LORA_ASYNC_STEPS,
        help=f"--opt async-lora: steps run before a LoRA loads (default {DEFAULT_LORA_ASYNC_STEPS})",
    )
    parser.add_argument(
        "--lora-fetch-s",
        type=float,
        default=LORA_FETCH_MEDIAN_S,
        help=f"median seconds of an emulated LoRA fetch (default {LORA_FETCH_MEDIAN_S})",
    )
    parser.add_argument(
        "--lora-capacity",
        type=int,
        default=DEFAULT_LORA_CAPACITY,
        help=f"LoRAs each worker holds (default {DEFAULT_LORA_CAPACITY})",
    )


def optimisations_of(text: str) -> tuple[str, ...]:
    chosen = tuple(name for name in text.split(",") if name)
    built = ", ".join(OPTIMISATIONS)
    for name in chosen:
        if name not in OPTIMISATIONS:
            raise argparse.ArgumentTypeError(f"unknown optimisation {name!r} (built: {built})")
    return chosen


def check_flags(args: argparse.Namespace) -> None:
    """Errors name the flag, its limit and the value."""
    if "approx-cache" in args.opt and not args.prompts:
        raise ValueError(
            "--opt approx-cache needs --prompts zipf:distinct=N,s=S: prompts that resemble each other"
        )
    if "async-lora" in args.opt and not args.loras:
        raise ValueError("--opt async-lora needs --loras zipf:distinct=N,s=S: requests that use LoRAs")
    if args.lora_async_steps < 1:
        raise ValueError(f"--lora-async-steps must be ≥ 1, got {args.lora_async_steps}")
    if args.lora_fetch_s < 0:
        raise ValueError(f"--lora-fetch-s must be ≥ 0, got {args.lora_fetch_s:g}")
    if args.lora_capacity < 1:
        raise ValueError(f"--lora-capacity must be ≥ 1, got {args.lora_capacity}")
    if args.connect and args.opt:
        raise ValueError(
            f"--opt {'+'.join(args.opt)} needs clusters started without and with it: not with --connect"
        )
    if args.connect and len(policies_of(args.policy)) > 1:
        raise ValueError(f"--policy {args.policy}: a running cluster (--connect) serves one policy")


def _zipf_flag(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type for a Zipf spec flag (empty: not given): `parse`'s errors as usage errors."""

    def check(text: str) -> str:
        try:
            if text:
                parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    return check


async def _register(cluster: BenchTarget, chosen: Workload) -> dict[str, str]:
    """Register every workflow of the workload: tenant → registered name."""
    async with channel(cluster.compiler_address) as chan:
        stub = compiler_pb2_grpc.CompilerStub(chan)
        for spec in chosen.workflows.values():
            await stub.RegisterWorkflow(spec)
    return {tenant: spec.name for tenant, spec in chosen.workflows.items()}


async def _prefetch(cluster: BenchTarget, chosen: Workload, policy: str) -> int:
    """Every model the policy will run (private copies under the baselines) into every worker's host
    memory, as the simulator's workers start; the number of prefetches."""
    models: set[str] = set()
    for tenant, spec in chosen.workflows.items():
        graph = as_placed(policy, spec.name, instantiate(spec, resolve_inputs(spec, chosen.inputs[tenant])))
        models |= {node.model for node in graph.nodes.values() if not node.model.startswith("builtin:")}
    status = await bench_target.cluster_status(cluster.coordinator_address)
    addresses = [worker.address for worker in status.workers]

    async def fill(address: str) -> None:
        async with channel(address) as worker_channel:
            stub = worker_pb2_grpc.WorkerStub(worker_channel)
            for model in sorted(models):
                await stub.PrefetchModel(worker_pb2.ModelRequest(model=model))

    await asyncio.gather(*(fill(address) for address in addresses))
    return len(models) * len(addresses)


async def _standalone_s(
    client: AsyncGatewayClient, names: dict[str, str], chosen: Workload
) -> dict[str, float]:
    """Each workflow alone on the idle cluster, wall seconds (its models loaded by a first run), with
    prompts of their own: no cache, exact or approximate, may answer them."""
    measured = {}
    for tenant in standalone_runs(chosen):
        started = time.perf_counter()
        alone = {**chosen.inputs[tenant], "prompt": f"standalone {uuid.uuid4().hex}"}  # like no other
        await client.generate(names[tenant], alone, slo_ms=UNBOUNDED_SLO_MS)
        measured[tenant] = time.perf_counter() - started
    return measured


async def _one(
    client: AsyncGatewayClient,
    workflow: str,
    inputs: dict[str, Scalar],
    slo_s: float,
    at: float,
    scale: float,
) -> tuple[Outcome, float, str, tuple[int, int]]:
    """Send at wall time `at`; the outcome in emulated time, how late the send was, the gateway's
    message if it failed, and (the denoiser calls that ran before their LoRA had loaded, the steps
    an approximate-cache hit skipped)."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    sent = time.perf_counter()
    outcome = Outcome(workflow, (sent - at) * scale, slo_s * scale)
    try:
        image = await client.generate(workflow, inputs, slo_ms=slo_s * 1000, request_id=uuid.uuid4().hex)
        outcome.latency_s = (time.perf_counter() - sent) * scale
    except LegoError as error:
        outcome.failure = {
            grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected",
            grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
        }.get(error.code, error.code.name.lower())
        return outcome, sent - at, error.message, (0, 0)
    return outcome, sent - at, "", (image.unpatched_calls, image.skipped_steps)


async def _replay_run(
    client: AsyncGatewayClient,
    names: dict[str, str],
    chosen: Workload,
    arrivals: list[tuple[float, str]],
    slo_s: dict[str, float],
    scale: float,
    prompts: list[str] | None = None,
) -> list[tuple[Outcome, float, str, tuple[int, int]]]:
    """One open-loop replay of (arrival time, tenant) pairs, starting half a second from now; with
    `prompts`, request i sends prompts[i]."""
    start = time.perf_counter() + 0.5
    inputs = [chosen.inputs[tenant] for _, tenant in arrivals]
    if prompts is not None:
        inputs = [{**given, "prompt": text} for given, text in zip(inputs, prompts, strict=True)]
    sends = [
        _one(client, names[tenant], given, slo_s[tenant], start + at / scale, scale)
        for (at, tenant), given in zip(arrivals, inputs, strict=True)
    ]
    return list(await asyncio.gather(*sends))


def _since(now: Counters, before: Counters, time_scale: float, cached: bool) -> dict[str, Any]:
    """The run's loads, busy device seconds and embedding-cache figures, in emulated time."""
    hits, misses = now.cache.hits - before.cache.hits, now.cache.misses - before.cache.misses
    cache = {
        "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
        "encoder_seconds_saved": round((now.cache.saved_s - before.cache.saved_s) * time_scale, 3),
    }
    loras = {
        "fetches": now.loras.fetches - before.loras.fetches,
        "waiting_batches": now.loras.waits - before.loras.waits,
        "unpatched_batches": now.loras.unpatched - before.loras.unpatched,
    }
    return {
        "model_loads": now.loads - before.loads,
        "gpu_seconds": round((now.busy_s - before.busy_s) * time_scale, 3),
        "embedding_cache": cache if cached and now.detailed else None,
        "lora_workers": loras if now.detailed else {},  # a running cluster's workers count none
    }


def _target(
    args: argparse.Namespace, policy: str, cache_bytes: int
) -> contextlib.AbstractAsyncContextManager[BenchTarget]:
    """The running cluster given by `--connect`, else a fresh embedded one with `policy`."""
    if args.connect:
        return bench_target.connected(args.connect, args.store, policy)
    cluster = EmbeddedCluster(
        workers=args.workers,
        worker=WorkerConfig(
            backend="emulated",
            time_scale=args.time_scale,
            profile_dir=args.profile,
            embedding_cache_bytes=cache_bytes,
            lora_fetch_s=args.lora_fetch_s,
            lora_capacity=args.lora_capacity,
        ),
        coordinator_config=CoordinatorConfig(
            policy=policy,
            enforce_slo=True,
            slo_factor=args.slo_factor,
            time_scale=args.time_scale,
            profile_dir=args.profile,
            ready_depth=args.ready_depth,
        ),
    )
    return bench_target.embedded(cluster)


async def replay(
    args: argparse.Namespace,
    policy: str,
    chosen: Workload,
    runs: list[tuple[float, list[TraceRequest]]],
    opts: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Every run of the series on one fresh cluster with `policy` and `opts` (one cluster each)."""
    cache_bytes = int(args.embedding_cache_mb * 2**20) if "embed-cache" in opts else 0
    results = []
    served = chosen
    if args.loras:  # each tenant's workflow with each LoRA of the mix, asynchronous or not
        async_steps = args.lora_async_steps if "async-lora" in opts else 0
        served = with_loras(chosen, args.loras, async_steps)
    if "approx-cache" in opts:
        served = with_approx_cache(served)
    async with (
        _target(args, policy, cache_bytes) as cluster,
        AsyncGatewayClient(cluster.gateway_address, timeout_s=3600) as client,
    ):
        names = await _register(cluster, served)
        prefetched = await _prefetch(cluster, chosen, policy)
        base = {tenant: names[tenant] for tenant in chosen.workflows}
        standalone = await _standalone_s(client, base, chosen)
        # a LoRA variant keeps its tenant's SLO: the LoRA's fetch is what the optimisation hides
        slo_s = {tenant: args.slo_factor * standalone[tenant.split("+")[0]] for tenant in served.workflows}
        unbounded = dict.fromkeys(slo_s, UNBOUNDED_SLO_MS / 1000)
        for scale, requests in runs:
            if args.duration > 0:
                requests = [r for r in requests if r.time_s <= args.duration]
            tenants = [a.workflow for a in arrivals_of(requests, chosen, args)]
            if args.loras:
                tenants = assign_loras(args.loras, tenants)
            arrivals = [(r.time_s, tenant) for r, tenant in zip(requests, tenants, strict=True)]
            warmup = warmup_of(arrivals, sorted(chosen.workflows), args.warmup)
            await _replay_run(client, names, served, warmup, unbounded, args.time_scale)
            prompts = draw_prompts(args.prompts, len(arrivals)) if args.prompts else None
            before = await cluster.counters()
            answered = await _replay_run(client, names, served, arrivals, slo_s, args.time_scale, prompts)
            counted = _since(await cluster.counters(), before, args.time_scale, cached=cache_bytes > 0)
            lags = sorted(lag for _, lag, _, _ in answered)
            unpatched = [calls for outcome, _, _, (calls, _) in answered if not outcome.failure]
            skipped = [steps for outcome, _, _, (_, steps) in answered if not outcome.failure]
            first_messages: dict[str, str] = {}
            for outcome, _, message, _ in answered:
                if outcome.failure:
                    first_messages.setdefault(outcome.failure, message)
            results.append(
                {"policy": policy, "rs": scale, "opt": "+".join(opts) or "none", "workers": cluster.workers}
                | summarize([outcome for outcome, _, _, _ in answered])
                | {
                    "failures": dict(Counter(o.failure for o, _, _, _ in answered if o.failure)),
                    "first_failure_messages": first_messages,
                    "standalone_s": {names[t]: round(s * args.time_scale, 4) for t, s in standalone.items()},
                    "warmup_requests": len(warmup),
                    "prefetched": prefetched,
                    "generator_lag_p99_ms": round(1000 * lags[int(0.99 * (len(lags) - 1))], 2)
                    if lags
                    else None,
                    "generator_lag_max_ms": round(1000 * lags[-1], 2) if lags else None,
                    "prompt_repeat_share": round(repeat_share(prompts), 4) if prompts else None,
                    "lora": _lora_figures(args, opts, unpatched) | counted.pop("lora_workers")
                    if args.loras
                    else None,
                    "approx_cache": _approx_figures(skipped) if "approx-cache" in opts else None,
                }
                | counted
            )
            await asyncio.sleep(1.0)  # let the cluster drain between runs
    return results


def _lora_figures(args: argparse.Namespace, opts: tuple[str, ...], unpatched: list[int]) -> dict[str, Any]:
    return {
        "mix": args.loras,
        "async_steps": args.lora_async_steps if "async-lora" in opts else 0,
        # with --connect the workers were started with their own --lora-fetch-s, unknown here
        "fetch_median_s": None if args.connect else args.lora_fetch_s,
        "requests_unpatched": sum(1 for calls in unpatched if calls),
        "unpatched_calls_per_request": round(sum(unpatched) / len(unpatched), 3) if unpatched else None,
    }


def _approx_figures(skipped: list[int]) -> dict[str, Any]:
    resumed = [steps for steps in skipped if steps]
    return {
        "requests_resumed": len(resumed),
        "resumed_share": round(len(resumed) / len(skipped), 4) if skipped else None,
        "skipped_steps_per_resumed_request": round(sum(resumed) / len(resumed), 3) if resumed else None,
    }


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    try:
        check_flags(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    policies = policies_of(args.policy)
    chosen, runs = load_workload(args)
    results: list[dict[str, Any]] = []
    max_rs: dict[str, float | None] = {}
    speedups = []
    for policy in policies:
        measured = asyncio.run(replay(args, policy, chosen, runs))
        results += measured
        passing = [r["rs"] for r in measured if (r["slo_attainment"] or 0) >= TARGET]
        max_rs[policy] = max(passing) if passing else None
        if args.opt:
            optimised = asyncio.run(replay(args, policy, chosen, runs, args.opt))
            results += optimised
            speedups += [_speedup(base, opt) for base, opt in zip(measured, optimised, strict=True)]
    figures = {
        "family": args.family,
        "skew": args.skew,
        "workers": results[0]["workers"] if results else args.workers,
        "time_scale": args.time_scale,
        "max_rs_at_90": max_rs,
        "runs": results,
    } | ({"speedup": speedups} if args.opt else {})
    tenant, spec = next(iter(chosen.workflows.items()))  # the quality runs take its steps
    steps = int(resolve_inputs(spec, chosen.inputs[tenant])["steps"])
    if "async-lora" in args.opt:
        bound = min(args.lora_async_steps, steps)
        bounds = sorted({max(1, bound // 4), max(1, bound // 2), bound})
        figures["lora_quality"] = asyncio.run(lora_quality.measure(steps, bounds))
    if "approx-cache" in args.opt:
        figures["approx_quality"] = asyncio.run(measure_quality(steps))
    return figures | results[0] if len(results) == 1 else figures  # one run: its figures at the top


def _speedup(base: dict[str, Any], optimised: dict[str, Any]) -> dict[str, Any]:
    """One run replayed without and with the optimisations: latency ratio (> 1: faster) and SLOs."""
    ratio = base["p50_s"] / optimised["p50_s"] if base["p50_s"] and optimised["p50_s"] else None
    return {
        "policy": base["policy"],
        "rs": base["rs"],
        "opt": optimised["opt"],
        "p50_speedup": round(ratio, 4) if ratio else None,
        "gpu_seconds": {"baseline": base["gpu_seconds"], "optimised": optimised["gpu_seconds"]},
        "slo_attainment": {"baseline": base["slo_attainment"], "optimised": optimised["slo_attainment"]},
        "embedding_cache": optimised["embedding_cache"],
        "prompt_repeat_share": optimised["prompt_repeat_share"],
        "lora": {"baseline": base["lora"], "optimised": optimised["lora"]} if base["lora"] else None,
        "approx_cache": optimised["approx_cache"],
    }


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
