"""Control-plane overhead per request: end-to-end latency minus the time its batches ran.

A 4-step CFG text-to-image workflow (tiny-sd15 ids, emulated H800 timing at time-scale 1) runs
request after request on a warm cluster of emulated workers; each request's overhead is its latency
at the gateway minus the execution seconds of its batches, as the workers measured them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from pathlib import Path
from typing import Any

from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego.grpc_server import channel
from lego.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from lego.values import to_values
from lego_worker.agent import WorkerConfig

from lego_cli.cluster import EmbeddedCluster, ProcessCluster

COMPONENTS = ("text_encoder", "unet", "vae", "scheduler")
Samples = tuple[list[float], list[float], int]  # overheads, latencies, nodes per request


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--store",
        default="memory",
        help="memory: every service in this process; etcd://HOST:PORT: one process each",
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def _warm(worker_addresses: list[str]) -> None:
    for address in worker_addresses:
        async with channel(address) as chan:
            stub = worker_pb2_grpc.WorkerStub(chan)
            for component in COMPONENTS:
                await stub.LoadModel(worker_pb2.ModelRequest(model=f"tiny-sd15:{component}"))


async def _requests(gateway_address: str, args: argparse.Namespace) -> Samples:
    overheads, latencies, nodes = [], [], 0
    async with channel(gateway_address) as chan:
        gateway = gateway_pb2_grpc.GatewayStub(chan)
        for index in range(args.requests + 1):
            inputs = to_values({"prompt": f"request {index}", "steps": args.steps, "guidance_scale": 7.5})
            reply = await gateway.Generate(
                gateway_pb2.GenerateRequest(workflow=TINY_SD15_TXT2IMG, inputs=inputs)
            )
            if index == 0:
                continue  # warm-up: connections, caches
            latencies.append(reply.latency_s)
            overheads.append(reply.latency_s - reply.execution_s)
            nodes = reply.nodes_executed
    return overheads, latencies, nodes


async def _embedded(args: argparse.Namespace) -> Samples:
    config = WorkerConfig(backend="emulated", time_scale=1.0)
    async with EmbeddedCluster(workers=args.workers, worker=config) as cluster:
        await _warm([s.address for s in cluster.services if type(s).__name__ == "WorkerService"])
        return await _requests(cluster.gateway_address, args)


def _processes(args: argparse.Namespace) -> Samples:
    worker_args = ("--backend", "emulated", "--time-scale", "1")
    with open(os.devnull, "wb") as quiet:
        cluster = ProcessCluster(args.store, args.workers, log_file=quiet, worker_args=worker_args)
        cluster.start()
        try:
            asyncio.run(_warm([p.address for p in cluster.processes if p.name.startswith("worker")]))
            return asyncio.run(_requests(cluster.gateway_address, args))
        finally:
            cluster.stop()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    overheads, latencies, nodes = asyncio.run(_embedded(args)) if args.store == "memory" else _processes(args)
    return {
        "store": args.store,
        "requests": args.requests,
        "tasks_per_request": nodes,
        "overhead_p50_ms": round(1000 * statistics.median(overheads), 2),
        "overhead_p99_ms": round(1000 * percentile(overheads, 0.99), 2),
        "overhead_mean_ms": round(1000 * statistics.fmean(overheads), 2),
        "latency_p50_ms": round(1000 * statistics.median(latencies), 2),
        "overhead_per_task_ms": round(1000 * statistics.median(overheads) / max(1, nodes), 3),
        "targets_ms": {"p50": 20, "p99": 50},
    }


def run(args: argparse.Namespace) -> int:
    figures = measure(args)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0
