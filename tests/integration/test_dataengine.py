"""Two data engines on loopback: put, local get, remote pull with a cached replica, lazy arrival, free."""

from __future__ import annotations

import asyncio

import numpy as np
from lego import dataplane
from lego.grpc_server import channel
from lego.v1 import common_pb2, dataengine_pb2, dataengine_pb2_grpc
from lego_dataengine.service import serve


async def test_put_get_pull_and_free() -> None:
    first, second = await serve(None), await serve(None)
    try:
        async with channel(first.address) as a, channel(second.address) as b:
            stub_a = dataengine_pb2_grpc.DataEngineStub(a)
            stub_b = dataengine_pb2_grpc.DataEngineStub(b)
            array = np.arange(3 * 1024 * 1024, dtype=np.float32).reshape(3, 1024, 1024)  # 12 MiB: many chunks
            handle = await dataplane.put_array(stub_a, "req1/node/out", array)
            assert list(handle.locations) == [first.address]
            assert np.array_equal(await dataplane.get_array(stub_a, handle), array)

            pulled = await dataplane.get_array(stub_b, handle)  # not on B: B pulls it from A
            assert np.array_equal(pulled, array)
            stats_b = await stub_b.Stats(common_pb2.Empty())
            assert stats_b.tensors == 1 and stats_b.bytes_pulled == array.nbytes
            await dataplane.get_array(stub_b, handle)  # the replica is cached: no second pull
            assert (await stub_b.Stats(common_pb2.Empty())).bytes_pulled == array.nbytes

            freed = await stub_a.Free(dataengine_pb2.FreeRequest(request_id="req1"))
            assert freed.freed == 1
            assert (await stub_a.Stats(common_pb2.Empty())).bytes_stored == 0
    finally:
        await first.stop()
        await second.stop()


async def test_a_reader_waits_for_a_tensor_that_has_not_arrived() -> None:
    engine = await serve(None)
    try:
        async with channel(engine.address) as chan:
            stub = dataengine_pb2_grpc.DataEngineStub(chan)
            array = np.ones((4, 4), dtype=np.float32)
            handle = common_pb2.TensorHandle(
                tensor_id="r/late/out", dtype="float32", shape=[4, 4], nbytes=array.nbytes
            )
            reader = asyncio.create_task(dataplane.get_array(stub, handle))
            await asyncio.sleep(0.2)
            assert not reader.done()
            await dataplane.put_array(stub, "r/late/out", array)
            assert np.array_equal(await asyncio.wait_for(reader, 5), array)
    finally:
        await engine.stop()
