"""Worker runtime: tiny-denoiser throughput per batch size, model sharing on vs off, and partial
outputs (a ControlNet's block samples streamed to the transformer beside it: lego_cli.bench_parts).

Sharing: two workflows (plain txt2img and a LoRA variant of it) alternate on one worker whose memory
budget holds one copy of every model plus half again. With sharing on they use the same model ids
(one resident copy each); with sharing off the second workflow uses private copies (`tiny-sd15#b`),
as a monolithic deployment would, and the budget forces swapping.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from lego.builtin_workflows import TINY_SD15_TXT2IMG, sd15_txt2img
from lego.grpc_server import channel
from lego.v1 import common_pb2, compiler_pb2_grpc, gateway_pb2, gateway_pb2_grpc, worker_pb2_grpc
from lego.values import to_values
from lego.workflow import LoRA
from lego_worker.agent import WorkerConfig
from lego_worker.executor import Executor
from lego_worker.presets import make_tiny_lora
from lego_worker.torch_backend import TorchBackend

from lego_cli.bench_parts import partial_outputs
from lego_cli.cluster import EmbeddedCluster

BATCH_SIZES = (1, 2, 4, 8)
COMPONENTS = ("text_encoder", "unet", "vae", "scheduler")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per batch size (median)")
    parser.add_argument("--requests", type=int, default=6, help="requests per workflow in the sharing runs")
    parser.add_argument("--steps", type=int, default=4)


def batch_throughput(repeats: int) -> dict[str, float]:
    executor = Executor(TorchBackend(), memory_budget_bytes=10**10)
    rng = np.random.default_rng(0)
    results = {}
    for size in BATCH_SIZES:
        items = [
            {
                "sample": rng.standard_normal((1, 4, 16, 16), dtype=np.float32),
                "timestep": np.array(500, dtype=np.int64),
                "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32),
            }
            for _ in range(size)
        ]
        executor.run("unet", "tiny-sd15:unet", "denoise", items)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            executor.run("unet", "tiny-sd15:unet", "denoise", items)
            times.append(time.perf_counter() - started)
        results[str(size)] = round(size / statistics.median(times), 2)
    return results


def _footprint_of_one_copy() -> int:
    backend = TorchBackend()
    return sum(backend.footprint(f"tiny-sd15:{component}") for component in COMPONENTS)


async def sharing_run(shared: bool, lora: Path, requests: int, steps: int) -> dict[str, Any]:
    budget = int(_footprint_of_one_copy() * 1.5)
    source_b = "tiny-sd15" if shared else "tiny-sd15#b"
    async with EmbeddedCluster(workers=1, worker=WorkerConfig(memory_bytes=budget)) as cluster:
        async with channel(cluster.compiler_address) as chan:
            spec = sd15_txt2img("bench-b", source_b, default_size=128, loras=[LoRA(str(lora))])
            await compiler_pb2_grpc.CompilerStub(chan).RegisterWorkflow(spec)
        started = time.perf_counter()
        async with channel(cluster.gateway_address) as chan:
            gateway = gateway_pb2_grpc.GatewayStub(chan)
            for index in range(requests * 2):
                workflow = TINY_SD15_TXT2IMG if index % 2 == 0 else "bench-b"
                inputs = to_values({"prompt": f"request {index}", "steps": steps})
                await gateway.Generate(gateway_pb2.GenerateRequest(workflow=workflow, inputs=inputs))
        total = time.perf_counter() - started
        worker = next(s for s in cluster.services if type(s).__name__ == "WorkerService")
        async with channel(worker.address) as chan:
            status = await worker_pb2_grpc.WorkerStub(chan).GetStatus(common_pb2.Empty())
    return {
        "peak_memory_bytes": status.peak_memory_bytes,
        "model_loads": status.loads,
        "evictions": status.evictions,
        "load_s": round(status.load_s, 4),
        "total_s": round(total, 3),
        "memory_budget_bytes": budget,
    }


def run(args: argparse.Namespace) -> int:
    figures: dict[str, Any] = {"batch_throughput": batch_throughput(args.repeats)}
    with tempfile.TemporaryDirectory() as scratch:
        lora = make_tiny_lora(Path(scratch) / "lora")
        figures["sharing_on"] = asyncio.run(sharing_run(True, lora, args.requests, args.steps))
        figures["sharing_off"] = asyncio.run(sharing_run(False, lora, args.requests, args.steps))
    figures["partial_outputs"] = partial_outputs(args.repeats)
    on, off = figures["sharing_on"], figures["sharing_off"]
    figures["ratios"] = {
        "batch8_vs_batch1_throughput": round(
            figures["batch_throughput"]["8"] / figures["batch_throughput"]["1"], 2
        ),
        "sharing_peak_memory_saved": round(1 - on["peak_memory_bytes"] / off["peak_memory_bytes"], 3),
        "sharing_loads_saved": off["model_loads"] - on["model_loads"],
        "sharing_speedup": round(off["total_s"] / on["total_s"], 3),
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0
