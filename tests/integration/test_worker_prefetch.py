"""A worker starts pulling a batch's remote inputs as soon as the batch is dispatched to it."""

from __future__ import annotations

import asyncio

import numpy as np
from lego.dataplane import DataPlane
from lego.grpc_server import channel
from lego.store import MemoryStore
from lego.v1 import common_pb2, coordinator_pb2, dataengine_pb2_grpc
from lego_dataengine.service import serve as serve_dataengine
from lego_worker.agent import WorkerAgent, WorkerConfig, build_executor


async def test_remote_inputs_are_pulled_when_the_batch_arrives_not_when_it_starts() -> None:
    producer_host, consumer_host = await serve_dataengine(None), await serve_dataengine(None)
    try:
        array = np.arange(1 << 20, dtype=np.float32)  # 4 MiB on the producer's host
        handle = await DataPlane(producer_host.address).put("r/n/out", array)
        config = WorkerConfig(worker_id="w", backend="emulated")
        agent = WorkerAgent(config, MemoryStore(), "unused", consumer_host.address, build_executor(config))
        batch = coordinator_pb2.TaskBatch(batch_id="b1", op="unet", model="tiny-sd15:unet", mode="denoise")
        batch.tasks.add(task_id="r/x", request_id="r", node_id="x").inputs["sample"].tensor.CopyFrom(handle)
        agent.prefetch_inputs(batch)  # what the stream does on receipt, before the batch is queued
        async with channel(consumer_host.address) as chan:
            stub = dataengine_pb2_grpc.DataEngineStub(chan)
            for _ in range(100):
                stats = await stub.Stats(common_pb2.Empty())
                if stats.bytes_pulled >= array.nbytes:
                    break
                await asyncio.sleep(0.02)
        assert stats.bytes_pulled == array.nbytes
        assert np.array_equal(await DataPlane(consumer_host.address).get(handle), array)
    finally:
        await producer_host.stop()
        await consumer_host.stop()
