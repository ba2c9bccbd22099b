"""Data engines with their shared-memory arenas: zero-copy local reads, arena full, refcount GC,
replicas freed with the original, prefetch, partial outputs, and bounded memory over 1000 requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
import pytest
from lego import arena_layout
from lego.dataplane import DataPlane
from lego.v1 import common_pb2, dataengine_pb2
from lego_dataengine.service import DataEngineService, serve


@pytest.fixture
async def engines() -> AsyncIterator[tuple[DataEngineService, DataEngineService]]:
    first, second = await serve(None, arena_mib=64), await serve(None, arena_mib=64)
    try:
        yield first, second
    finally:
        await first.stop()
        await second.stop()


async def stats(plane: DataPlane) -> dataengine_pb2.DataEngineStats:
    return await plane._stub.Stats(common_pb2.Empty())


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Wait for work the engines do in the background; fails the test after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.02)


async def stored(plane: DataPlane, tensors: int) -> bool:
    return (await stats(plane)).tensors == tensors


async def test_local_reads_are_read_only_views_of_the_arena(engines: tuple[DataEngineService, ...]) -> None:
    plane = DataPlane(engines[0].address)
    assert await plane.arena() is not None
    array = np.arange(1000, dtype=np.float32).reshape(10, 100)
    handle = await plane.put("r/n/out", array)
    assert list(handle.locations) == [engines[0].address] and handle.nbytes == 4000
    first, second = await plane.get(handle), await plane.get(handle)
    assert np.array_equal(first, array) and first.dtype == np.float32
    assert np.shares_memory(first, second)  # both are the arena's bytes, not copies
    assert not first.flags.writeable
    arena = await plane.arena()
    assert arena is not None and arena_layout.lookup(arena, "r/n/out") is not None  # read without a call
    over_grpc = DataPlane(engines[0].address, shared_memory=False)
    assert await over_grpc.arena() is None
    assert np.array_equal(await over_grpc.get(handle), array)
    assert np.array_equal(await plane.get(await over_grpc.put("r/n/2", array[:, ::2])), array[:, ::2])


async def test_a_local_reader_waits_for_a_tensor_that_has_not_arrived(
    engines: tuple[DataEngineService, ...],
) -> None:
    producer, consumer = DataPlane(engines[0].address), DataPlane(engines[0].address)
    array = np.ones((4, 4), dtype=np.int64)
    handle = common_pb2.TensorHandle(tensor_id="r/late/out", dtype="int64", shape=[4, 4], nbytes=128)
    reader = asyncio.create_task(consumer.get(handle))
    await asyncio.sleep(0.2)
    assert not reader.done()
    await producer.put("r/late/out", array)
    assert np.array_equal(await asyncio.wait_for(reader, 5), array)


async def test_a_full_arena_refuses_with_resource_exhausted_and_keeps_what_it_holds(
    engines: tuple[DataEngineService, ...],
) -> None:
    plane = DataPlane(engines[0].address)
    kept = np.full(40 * 1024 * 1024, 7, dtype=np.uint8)
    handle = await plane.put("r/big/out", kept)
    used = (await stats(plane)).arena_used
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await plane.put("r/too-big/out", np.zeros(30 * 1024 * 1024, dtype=np.uint8))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "31457280 bytes requested" in str(refused.value.details())
    assert "bytes free" in str(refused.value.details())
    assert (await stats(plane)).arena_used == used
    assert np.array_equal(await plane.get(handle), kept)
    with pytest.raises(grpc.aio.AioRpcError) as also_refused:  # over gRPC too
        await DataPlane(engines[0].address, shared_memory=False).put("r/x/out", np.zeros(30 << 20, np.uint8))
    assert also_refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await plane._stub.Free(dataengine_pb2.FreeRequest(request_id="r"))
    await plane.put("r/too-big/out", np.zeros(30 * 1024 * 1024, dtype=np.uint8))  # room again


async def test_the_last_release_frees_the_tensor_and_its_replicas(
    engines: tuple[DataEngineService, ...],
) -> None:
    producer, remote = DataPlane(engines[0].address), DataPlane(engines[1].address)
    array = np.arange(300_000, dtype=np.float32)
    handle = await producer.put("r/n/out", array, consumers=2)
    assert np.array_equal(await remote.get(handle), array)  # engine B pulls and keeps a replica
    assert (await stats(remote)).tensors == 1
    assert await producer.release(["r/n/out"]) == 0
    assert (await stats(producer)).tensors == 1
    assert await producer.release(["r/n/out"]) == 1
    assert (await stats(producer)).arena_used == 0
    await eventually(lambda: stored(remote, 0))  # A frees B's replica in the background
    assert (await stats(remote)).arena_used == 0


async def test_prefetch_pulls_before_the_reader_asks(engines: tuple[DataEngineService, ...]) -> None:
    producer, consumer = DataPlane(engines[0].address), DataPlane(engines[1].address)
    array = np.arange(3 * 1024 * 1024, dtype=np.float32)
    handle = await producer.put("r/n/out", array)
    await consumer.prefetch(handle)
    await eventually(lambda: stored(consumer, 1))
    assert (await stats(consumer)).bytes_pulled == array.nbytes
    assert np.array_equal(await consumer.get(handle), array)
    assert (await stats(consumer)).bytes_pulled == array.nbytes  # the get pulled nothing more


async def test_partial_outputs_reach_a_reader_while_the_producer_runs(
    engines: tuple[DataEngineService, ...],
) -> None:
    producer, consumer = DataPlane(engines[0].address), DataPlane(engines[0].address)
    received: list[np.ndarray] = []

    async def read() -> None:
        async for part in consumer.read_parts("r/controlnet/residuals"):
            received.append(part.array)

    reader = asyncio.create_task(read())
    await producer.publish_part("r/controlnet/residuals", 0, np.zeros((2, 2), np.float32))
    await eventually(lambda: asyncio.sleep(0, bool(received)))
    assert len(received) == 1 and not reader.done()  # part 0 arrived before the producer finished
    await producer.publish_part("r/controlnet/residuals", 1, np.ones((2, 2), np.float32), last=True)
    await asyncio.wait_for(reader, 5)
    assert [float(part.sum()) for part in received] == [0.0, 4.0]
    assert (await producer._stub.Free(dataengine_pb2.FreeRequest(request_id="r"))).freed == 1
    assert (await stats(producer)).part_streams == 0


async def test_arena_usage_returns_to_its_baseline_after_1000_requests(
    engines: tuple[DataEngineService, ...],
) -> None:
    worker, remote = DataPlane(engines[0].address), DataPlane(engines[1].address)
    baselines = [(await stats(plane)).arena_used for plane in (worker, remote)]
    rng = np.random.default_rng(0)
    for index in range(1000):
        request = f"req{index}"
        latents = rng.standard_normal((4, 16, 16), dtype=np.float32)
        embeds = await worker.put(f"{request}/encode/embeds", latents, consumers=1)
        await worker.put(f"{request}/denoise/latents", latents * 2)
        reader = remote if index % 50 == 0 else worker  # some consumers are on the other host
        assert np.array_equal(await reader.get(embeds), latents)
        await worker.release([embeds.tensor_id])  # refcount GC for one tensor (and its replica) ...
        await worker._stub.Free(dataengine_pb2.FreeRequest(request_id=request))  # ... the request's rest
    await eventually(lambda: stored(remote, 0))  # replica frees travel in the background
    for plane, baseline in zip((worker, remote), baselines, strict=True):
        after = await stats(plane)
        assert (after.arena_used, after.tensors) == (baseline, 0)
        assert after.arena_largest_free == after.arena_capacity  # no fragmentation left behind


async def test_put_many_publishes_a_batch_of_outputs_in_order() -> None:
    engine = await serve(None)
    try:
        plane = DataPlane(engine.address)
        outputs = [
            ("r/n/small", np.arange(16, dtype=np.float32)),
            ("r/n/large", np.ones((1024, 1024), dtype=np.float32)),  # 4 MiB: its own put
            ("r/n/scalar", np.array(7, dtype=np.int64)),
        ]
        handles = await plane.put_many(outputs)
        assert [h.tensor_id for h in handles] == [name for name, _ in outputs]
        for handle, (_, array) in zip(handles, outputs, strict=True):
            assert np.array_equal(await plane.get(handle), array)
    finally:
        await engine.stop()
