"""Two data-engine processes on loopback: a producer on A's arena, a consumer that B serves by
pulling over gRPC; stopping the engines removes their shared-memory segments."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from lego.dataplane import DataPlane
from lego.v1 import common_pb2
from lego_cli.bench_dataengine import engine_process


def test_two_engine_processes_share_through_the_arena_and_pull_over_grpc() -> None:
    array = np.arange(2 * 1024 * 1024, dtype=np.float64).reshape(1024, 2048)  # 16 MiB

    async def exchange(a: str, b: str) -> list[str]:
        producer, consumer = DataPlane(a), DataPlane(b)
        handle = await producer.put("r/n/out", array, consumers=1)
        assert np.array_equal(await DataPlane(a).get(handle), array)  # another client, same host
        assert np.array_equal(await consumer.get(handle), array)  # B pulls from A
        assert (await consumer._stub.Stats(common_pb2.Empty())).bytes_pulled == array.nbytes
        paths = [(await plane._stub.Arena(common_pb2.Empty())).path for plane in (producer, consumer)]
        assert await producer.release(["r/n/out"]) == 1
        return paths

    with engine_process(64) as a, engine_process(64) as b:
        paths = asyncio.run(exchange(a, b))
        assert all(Path(path).exists() for path in paths)
    assert not any(Path(path).exists() for path in paths)
