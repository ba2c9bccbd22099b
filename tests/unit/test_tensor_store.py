import asyncio

import pytest
from lego.allocator import ArenaFull
from lego.v1 import common_pb2, dataengine_pb2
from lego_dataengine.parts import PartStreams
from lego_dataengine.tensor_store import FreedBeforeArrival, TensorStore


def handle(tensor_id: str, nbytes: int = 100) -> common_pb2.TensorHandle:
    return common_pb2.TensorHandle(tensor_id=tensor_id, dtype="uint8", shape=[nbytes], nbytes=nbytes)


def test_reserve_commit_get_and_free_by_request() -> None:
    store = TensorStore(1024)
    store.reserve(handle("r1/a/out"))
    assert store.get("r1/a/out") is None  # pending: not readable yet
    store.commit("r1/a/out")
    store.commit(store.reserve(handle("r1/b/out")).handle.tensor_id)
    store.commit(store.reserve(handle("r2/a/out")).handle.tensor_id)
    assert len(store) == 3 and store.bytes_stored == 300
    freed = store.free([], request_id="r1")
    assert sorted(e.handle.tensor_id for e in freed) == ["r1/a/out", "r1/b/out"]
    assert store.allocator.used_bytes == 128 and len(store) == 1


def test_reference_counts_free_at_the_last_release() -> None:
    store = TensorStore(1024)
    store.reserve(handle("r/a/out"), consumers=2)
    store.commit("r/a/out")
    assert store.release(["r/a/out"]) == []
    assert [e.handle.tensor_id for e in store.release(["r/a/out"])] == ["r/a/out"]
    assert store.release(["r/a/out"]) == [] and store.allocator.used_bytes == 0


def test_a_tensor_freed_while_written_keeps_its_block_until_the_writer_is_done() -> None:
    store = TensorStore(128)
    store.reserve(handle("r/a/out", 128))
    store.free([], request_id="r")
    with pytest.raises(ArenaFull):
        store.reserve(handle("r2/a/out", 128))  # the writer may still be copying into the block
    with pytest.raises(KeyError, match="freed while being written"):
        store.commit("r/a/out")
    assert store.allocator.used_bytes == 0


def test_a_pinned_tensor_keeps_its_block_until_unpinned() -> None:
    store = TensorStore(128)
    entry = store.reserve(handle("r/a/out", 128))
    store.commit("r/a/out")
    store.pin(entry)
    assert len(store.free(["r/a/out"])) == 1 and store.get("r/a/out") is None
    assert store.allocator.used_bytes == 128
    store.unpin(entry)
    assert store.allocator.used_bytes == 0


def test_abort_and_replacement_give_blocks_back() -> None:
    store = TensorStore(1024)
    store.reserve(handle("r/a/out"))
    store.abort("r/a/out")
    assert store.allocator.used_bytes == 0
    for _ in range(2):  # a re-run node publishes the same id again: the old block is freed
        store.reserve(handle("r/a/out"))
        store.commit("r/a/out")
    assert store.allocator.used_bytes == 128 and len(store) == 1


async def test_wait_for_returns_when_the_tensor_is_committed() -> None:
    store = TensorStore(1024)
    waiter = asyncio.create_task(store.wait_for("r/a/out", 5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    store.reserve(handle("r/a/out"))
    store.commit("r/a/out")
    assert (await waiter).handle.tensor_id == "r/a/out"


async def test_a_wait_ends_when_its_request_is_freed_and_later_waits_fail_at_once() -> None:
    # a consumer waiting for a dropped request's producer must not hold its worker for the timeout
    store = TensorStore(1024)
    waiting = asyncio.create_task(store.wait_for("r1/producer/out", timeout_s=60))
    await asyncio.sleep(0)
    store.free([], request_id="r1")
    with pytest.raises(FreedBeforeArrival, match="r1/producer/out will not arrive"):
        await asyncio.wait_for(waiting, timeout=1)
    with pytest.raises(FreedBeforeArrival):
        await asyncio.wait_for(store.wait_for("r1/other/out", timeout_s=60), timeout=1)
    store.reserve(handle("r1/again/out"))  # the same request id writing again: waits wait again
    with pytest.raises(TimeoutError):
        await store.wait_for("r1/later/out", timeout_s=0.01)


async def test_parts_arrive_in_order_as_they_are_published() -> None:
    streams = PartStreams()
    seen: list[int] = []

    async def read() -> None:
        async for part in streams.read("r/a/out", 0, 5):
            seen.append(part.index)

    reader = asyncio.create_task(read())
    await streams.publish(dataengine_pb2.TensorPart(stream_id="r/a/out", index=0))
    await asyncio.sleep(0.01)
    assert seen == [0] and not reader.done()
    with pytest.raises(ValueError, match="expected part 1, got 2"):
        await streams.publish(dataengine_pb2.TensorPart(stream_id="r/a/out", index=2))
    await streams.publish(dataengine_pb2.TensorPart(stream_id="r/a/out", index=1, last=True))
    await asyncio.wait_for(reader, 5)
    assert seen == [0, 1]
    assert [p.index async for p in streams.read("r/a/out", 1, 5)] == [1]  # a late reader starts anywhere
    with pytest.raises(ValueError, match="finished"):
        await streams.publish(dataengine_pb2.TensorPart(stream_id="r/a/out", index=2))
    # a producer re-run after a failure publishes its parts again: the ones held are kept
    await streams.publish(dataengine_pb2.TensorPart(stream_id="r/a/out", index=0, data=b"again"))
    assert [p.data async for p in streams.read("r/a/out", 0, 5)] == [b"", b""]
    assert streams.free([], request_id="r") == 1 and len(streams) == 0
