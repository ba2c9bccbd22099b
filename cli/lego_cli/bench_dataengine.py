"""Data-engine throughput and latency: local put+get, remote pull, next to a plain memcpy.

Starts two data-engine processes (A and B) on loopback. For each size it measures, in one run:
- memcpy: `numpy.copyto` of the same number of bytes in this process (the baseline);
- local: put into A through its shared-memory arena + get as a zero-copy view (one producer, one
  consumer, both on A's host); `local_get_p50_us` is the consumer's side alone (the handoff);
- remote: B pulls the tensor from A over loopback gRPC into B's arena and the consumer reads it there.
Figures are medians over the repeats. `--chunk-sizes` also measures the remote pull of one size for
several stream chunk sizes (an engine pair per chunk size), which is how the default was chosen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from lego.dataplane import CHUNK_BYTES, DataPlane
from lego.v1 import dataengine_pb2

KIB, MIB = 1024, 1024 * 1024
DEFAULT_SIZES = "4K,64K,1M,16M,64M,256M"
BYTES_PER_SIZE = 1024 * MIB  # the repeats of one size move about this much, at least 3 of them
STARTUP_TIMEOUT_S = 30.0


def parse_size(text: str) -> int:
    units = {"K": KIB, "M": MIB, "G": 1024 * MIB}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the JSON figures to OUT")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated (default: {DEFAULT_SIZES})")
    parser.add_argument("--repeats", type=int, default=30, help="most repeats per size (default: 30)")
    parser.add_argument(
        "--chunk-sizes", default="", help="e.g. 256K,1M,4M: also time a 64 MiB remote pull per chunk size"
    )
    parser.add_argument("--arena-mib", type=int, default=1024, help="arena of each engine (default: 1024)")


@contextmanager
def engine_process(
    arena_mib: int, chunk_bytes: int = CHUNK_BYTES, host: str = "127.0.0.1", wrapper: Sequence[str] = ()
) -> Iterator[str]:
    """A `python -m lego_dataengine` process (run under `wrapper`, e.g. `ip netns exec NS`); yields its
    address, stops it by PID."""
    command = [
        *wrapper,
        sys.executable,
        "-m",
        "lego_dataengine",
        "--arena-mib",
        str(arena_mib),
        "--chunk-kib",
        str(chunk_bytes // KIB),
        "--host",
        host,
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], STARTUP_TIMEOUT_S)
        line = process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"data engine did not start (exit code {process.poll()})")
        yield str(json.loads(line)["address"])
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def timed(repeats: int, step: Callable[[int], Awaitable[float]]) -> float:
    """Median seconds of `step(i)`, which returns the seconds it measured (so it can leave set-up out)."""
    return statistics.median([await step(index) for index in range(repeats)])


def memcpy_seconds(size: int, repeats: int) -> float:
    source = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    target = np.empty_like(source)
    samples = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        np.copyto(target, source)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples[1:])  # the first copy also faults the target's pages in


async def measure_size(a: str, b: str, size: int, repeats: int) -> dict[str, float]:
    producer, consumer, remote, admin = DataPlane(a), DataPlane(a), DataPlane(b), DataPlane(a)
    array = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8)

    async def free(request: str) -> None:
        for plane in (admin, remote):
            await plane._stub.Free(dataengine_pb2.FreeRequest(request_id=request))

    get_samples: list[float] = []

    async def local(index: int) -> float:
        started = time.perf_counter()
        handle = await producer.put(f"local{index}/n/out", array)
        handed = time.perf_counter()
        view = await consumer.get(handle)
        finished = time.perf_counter()
        assert view.nbytes == size
        get_samples.append(finished - handed)
        await free(f"local{index}")
        return finished - started

    async def pull(index: int) -> float:
        handle = await producer.put(f"remote{index}/n/out", array)
        started = time.perf_counter()
        view = await remote.get(handle)
        elapsed = time.perf_counter() - started
        assert view.nbytes == size and view[-1] == array[-1]
        await free(f"remote{index}")
        return elapsed

    await local(-1)  # warm-up: channels, arena mappings, page faults
    get_samples.clear()
    await pull(-1)
    memcpy_s = memcpy_seconds(size, repeats)
    local_s = await timed(repeats, local)
    remote_s = await timed(repeats, pull)
    return {
        "size_bytes": size,
        "repeats": repeats,
        "memcpy_gbps": round(size / memcpy_s / 1e9, 3),
        "memcpy_p50_us": round(memcpy_s * 1e6, 1),
        "local_gbps": round(size / local_s / 1e9, 3),
        "local_p50_us": round(local_s * 1e6, 1),
        "local_get_p50_us": round(statistics.median(get_samples) * 1e6, 1),
        "remote_gbps": round(size / remote_s / 1e9, 3),
        "remote_p50_us": round(remote_s * 1e6, 1),
        "local_vs_memcpy": round(memcpy_s / local_s, 3),
    }


async def measure(a: str, b: str, sizes: list[int], most_repeats: int) -> list[dict[str, float]]:
    results = []
    for size in sizes:
        repeats = max(3, min(most_repeats, BYTES_PER_SIZE // size))
        results.append(await measure_size(a, b, size, repeats))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


async def pull_seconds(a: str, b: str, size: int, repeats: int) -> float:
    producer, remote = DataPlane(a), DataPlane(b)
    array = np.zeros(size, dtype=np.uint8)

    async def pull(index: int) -> float:
        handle = await producer.put(f"chunk{index}/n/out", array)
        started = time.perf_counter()
        await remote.get(handle)
        elapsed = time.perf_counter() - started
        for plane in (producer, remote):
            await plane._stub.Free(dataengine_pb2.FreeRequest(request_id=f"chunk{index}"))
        return elapsed

    await pull(-1)
    return await timed(repeats, pull)


def chunk_sweep(chunk_sizes: list[int], arena_mib: int) -> list[dict[str, float]]:
    rows = []
    for chunk in chunk_sizes:
        with engine_process(arena_mib, chunk) as a, engine_process(arena_mib, chunk) as b:
            seconds = asyncio.run(pull_seconds(a, b, 64 * MIB, 8))
        rows.append({"chunk_bytes": chunk, "remote_gbps_64mib": round(64 * MIB / seconds / 1e9, 3)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def run(args: argparse.Namespace) -> int:
    sizes = [parse_size(size) for size in args.sizes.split(",") if size.strip()]
    if max(sizes) * 2 > args.arena_mib * MIB:
        print(f"error: --arena-mib {args.arena_mib} is too small for {max(sizes)} bytes", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with engine_process(args.arena_mib) as a, engine_process(args.arena_mib) as b:
        results = asyncio.run(measure(a, b, sizes, args.repeats))
    report: dict[str, object] = {"benchmark": "dataengine", "chunk_bytes": CHUNK_BYTES, "results": results}
    if args.chunk_sizes:
        chunk_sizes = [parse_size(size) for size in args.chunk_sizes.split(",")]
        report["chunk_sweep"] = chunk_sweep(chunk_sizes, args.arena_mib)
    report["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
