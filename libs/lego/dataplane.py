"""Client side of the data engine: the host's shared-memory arena when it can be mapped, chunked gRPC
streams otherwise (and between hosts)."""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from lego import arena_layout, tensors
from lego.grpc_server import channel
from lego.v1 import common_pb2, dataengine_pb2, dataengine_pb2_grpc

# Chunk size of tensor streams, from `lego bench dataengine --chunk-sizes 256K,1M,4M,16M` (remote pull of
# 64 MiB over loopback, 2-core VM, two runs): 256 KiB 0.55-0.60 GB/s, 1 MiB 0.68-0.82, 4 MiB 0.65-0.91,
# 16 MiB 0.52-0.65. 1 MiB and 4 MiB are on the plateau; 1 MiB keeps per-chunk buffers small.
CHUNK_BYTES = 1024 * 1024
# Tensors up to this size travel inside the publish step that allocates them: one round trip, not two.
INLINE_BYTES = 256 * 1024


@dataclass(frozen=True)
class StreamPart:
    """One part of a stream of partial outputs, as a reader receives it."""

    index: int
    array: np.ndarray
    total: int  # parts the stream will hold, as its producer said (0: not said)
    last: bool


def chunks(
    handle: common_pb2.TensorHandle,
    data: bytes | memoryview,
    consumers: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[dataengine_pb2.TensorChunk]:
    """A tensor as a stream: the header and consumer count ride on the first chunk."""
    view = memoryview(data)
    yield dataengine_pb2.TensorChunk(header=handle, data=bytes(view[:chunk_bytes]), consumers=consumers)
    for offset in range(chunk_bytes, len(view), chunk_bytes):
        yield dataengine_pb2.TensorChunk(data=bytes(view[offset : offset + chunk_bytes]))


async def read_chunks(
    stream: AsyncIterator[dataengine_pb2.TensorChunk],
) -> tuple[common_pb2.TensorHandle, bytearray]:
    header: common_pb2.TensorHandle | None = None
    buffer = bytearray()
    async for chunk in stream:
        if header is None:
            header = chunk.header
            buffer = bytearray()
        buffer += chunk.data
    if header is None:
        raise ValueError("empty tensor stream")
    return header, buffer


async def put_array(
    stub: dataengine_pb2_grpc.DataEngineStub, tensor_id: str, array: np.ndarray, consumers: int = 0
) -> common_pb2.TensorHandle:
    handle = tensors.make_handle(tensor_id, array)
    reply: common_pb2.TensorHandle = await stub.Put(chunks(handle, tensors.to_bytes(array), consumers))
    return reply


async def get_array(stub: dataengine_pb2_grpc.DataEngineStub, handle: common_pb2.TensorHandle) -> np.ndarray:
    header, data = await read_chunks(stub.Get(dataengine_pb2.GetTensorRequest(handle=handle)))
    return tensors.from_bytes(header, data)


def _flat_bytes(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).reshape(-1).view(np.uint8)


def _view(arena: mmap.mmap, handle: common_pb2.TensorHandle, found: tuple[int, int]) -> np.ndarray:
    """A read-only numpy view of a tensor's bytes in the arena, at (offset, nbytes) `found`."""
    dtype = np.dtype(handle.dtype)
    view = np.frombuffer(arena, dtype, found[1] // dtype.itemsize, found[0])
    view.flags.writeable = False
    return view.reshape(tuple(handle.shape))


def _refusal(status: grpc.StatusCode, message: str) -> grpc.aio.AioRpcError:
    """A failed publish step, raised as a failed unary call would raise it."""
    return grpc.aio.AioRpcError(status, grpc.aio.Metadata(), grpc.aio.Metadata(), message)


class DataPlane:
    """A process's access to its host's data engine: publish outputs, read inputs by handle.

    On the engine's host, `put` writes straight into the engine's shared-memory arena (one copy) and
    `get` returns a read-only numpy view of the arena (no copy, and no call when the arena's index
    knows the tensor). A view is valid until the tensor is freed (its last consumer released it or
    its request ended): copy it to keep it longer. Elsewhere, both go through gRPC streams; reads of
    tensors held on other hosts go through the local engine, which pulls and caches a replica.
    """

    def __init__(self, address: str, shared_memory: bool = True) -> None:
        self.address = address
        self._stub = dataengine_pb2_grpc.DataEngineStub(channel(address))
        self._use_arena = shared_memory
        self._arena: mmap.mmap | None = None
        self._arena_checked = False
        self._arena_id: tuple[str, bytes] = ("", b"")  # the mapped segment's path and token
        # Outputs go through one long-lived Publish stream: on this 2-core VM a message round trip on
        # an open stream takes ~0.3 ms, a unary call ~1.1 ms.
        self._publisher: (
            grpc.aio.StreamStreamCall[dataengine_pb2.PublishRequest, dataengine_pb2.PublishReply] | None
        ) = None
        self._publish_lock = asyncio.Lock()

    async def arena(self) -> mmap.mmap | None:
        """The engine's arena mapped into this process, or None when it is on another host."""
        if self._use_arena and not self._arena_checked:
            await self._map_arena()
        return self._arena

    async def _map_arena(self) -> None:
        """Map the arena the engine serves now, unless it is the one already mapped."""
        info = await self._stub.Arena(common_pb2.Empty())
        if not self._arena_checked or (info.path, info.token) != self._arena_id:
            self._arena = arena_layout.attach(info.path, info.token)
            self._arena_id = (info.path, info.token)
            self._arena_checked = True

    async def _replaced(self, arena: mmap.mmap, tensor_id: str, found: tuple[int, int]) -> bool:
        """Whether `arena` is no longer the engine's (a SIGKILLed engine brought back on the same
        address serves a new one). The engine has just placed `tensor_id` at `found`, so the index of
        its arena names it there; only when the mapped index does not (or an index slot was taken
        meanwhile) the engine is asked which arena it serves, and that one is mapped."""
        if len(tensor_id.encode()) > arena_layout.MAX_INDEXED_ID:
            return False  # never indexed: nothing to check against
        if arena_layout.lookup(arena, tensor_id) == found:
            return False
        if self._arena is arena:  # not remapped by a concurrent call yet
            await self._map_arena()
        return self._arena is not arena

    async def _publish(self, request: dataengine_pb2.PublishRequest) -> dataengine_pb2.PublishReply:
        """One step on the Publish stream, reopened once if it broke (the engine restarted: a step
        is safe to repeat, a tensor put again replaces itself); a refused step raises AioRpcError."""
        async with self._publish_lock:
            for attempt in range(2):
                if self._publisher is None:
                    self._publisher = self._stub.Publish()
                try:
                    await self._publisher.write(request)
                    reply = await self._publisher.read()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:  # the stream ended
                    if attempt and isinstance(error, grpc.aio.AioRpcError):
                        self._publisher = None
                        raise
                    reply = grpc.aio.EOF
                if reply is not grpc.aio.EOF:
                    break
                self._publisher = None
            else:
                raise _refusal(grpc.StatusCode.UNAVAILABLE, "the data engine closed the publish stream")
        if reply.code:
            status = next((c for c in grpc.StatusCode if c.value[0] == reply.code), grpc.StatusCode.UNKNOWN)
            raise _refusal(status, reply.error)
        published: dataengine_pb2.PublishReply = reply
        return published

    def close(self) -> None:
        """End the publish stream, if open (the engine gives back blocks reserved and not committed)."""
        if self._publisher is not None:
            self._publisher.cancel()
            self._publisher = None

    async def put(self, tensor_id: str, array: np.ndarray, consumers: int = 0) -> common_pb2.TensorHandle:
        """Publish a tensor; with `consumers` > 0 it is freed after that many `release` calls."""
        return (await self.put_many([(tensor_id, array)], consumers))[0]

    async def put_many(
        self, outputs: list[tuple[str, np.ndarray]], consumers: int = 0
    ) -> list[common_pb2.TensorHandle]:
        """Publish several tensors (a batch's outputs) in one step: the small ones with their bytes,
        the rest written into blocks the step reserved, then committed together in a second."""
        arena = await self.arena()
        if arena is None or not outputs:
            return list(await asyncio.gather(*(put_array(self._stub, *o, consumers) for o in outputs)))
        request = dataengine_pb2.PublishRequest()
        large = []
        for index, (tensor_id, array) in enumerate(outputs):
            tensor = request.tensors.add(header=tensors.make_handle(tensor_id, array), consumers=consumers)
            if 0 < array.nbytes <= INLINE_BYTES:
                tensor.data = tensors.to_bytes(array)
            else:
                large.append(index)
        placements = (await self._publish(request)).placements
        handles = [placement.handle for placement in placements]
        if not large:
            return handles
        for index in large:
            placement = placements[index]
            target = np.frombuffer(arena, np.uint8, placement.handle.nbytes, placement.offset)
            np.copyto(target, _flat_bytes(outputs[index][1]))
        commit = dataengine_pb2.PublishRequest(commit=[outputs[index][0] for index in large])
        for index, handle in zip(large, (await self._publish(commit)).committed, strict=True):
            handles[index] = handle
            found = (placements[index].offset, handle.nbytes)
            if await self._replaced(arena, handle.tensor_id, found):
                return await self.put_many(outputs, consumers)  # the bytes went to the old arena
        return handles

    def local(self, handle: common_pb2.TensorHandle) -> np.ndarray | None:
        """The tensor at once when its handle carries it or the mapped arena's index has it (no call,
        nothing awaited); None otherwise: then `get` it."""
        if handle.data:
            return tensors.from_bytes(handle, handle.data)
        if self._arena is None or not handle.dtype:
            return None
        found = arena_layout.lookup(self._arena, handle.tensor_id)
        if found is None or found[1] != handle.nbytes:
            return None
        return _view(self._arena, handle, found)

    async def get(self, handle: common_pb2.TensorHandle) -> np.ndarray:
        """The tensor, waiting for it if it has not been published yet (lazy arrival)."""
        if handle.data:
            return tensors.from_bytes(handle, handle.data)
        arena = await self.arena()
        if arena is None:
            return await get_array(self._stub, handle)
        found = arena_layout.lookup(arena, handle.tensor_id)
        if found is None or found[1] != handle.nbytes or not handle.dtype:
            placement = await self._stub.Locate(dataengine_pb2.GetTensorRequest(handle=handle))
            found = placement.offset, placement.handle.nbytes
            if await self._replaced(arena, handle.tensor_id, found):
                return await self.get(handle)
            if not handle.dtype:  # a pending handle: dtype and shape are known once it arrives
                handle = placement.handle
        return _view(arena, handle, found)

    async def prefetch(self, handle: common_pb2.TensorHandle) -> None:
        """Have the engine start pulling a remote tensor now; a later `get` finds the replica."""
        await self._stub.Prefetch(dataengine_pb2.GetTensorRequest(handle=handle))

    async def release(self, tensor_ids: list[str]) -> int:
        """One consumer of each tensor is done; returns how many tensors that freed."""
        reply = await self._stub.Release(dataengine_pb2.ReleaseTensorsRequest(tensor_ids=tensor_ids))
        return int(reply.freed)

    async def publish_part(
        self, stream_id: str, index: int, array: np.ndarray, last: bool = False, total: int = 0
    ) -> None:
        """Publish part `index` of a stream of partial outputs while the producer still runs
        (`total`: how many parts the stream will hold, when known)."""
        header = tensors.make_handle(stream_id, array)
        part = dataengine_pb2.TensorPart(
            stream_id=stream_id,
            index=index,
            dtype=header.dtype,
            shape=header.shape,
            data=tensors.to_bytes(array),
            last=last,
            total=total,
        )
        await self._stub.PublishPart(part)

    async def read_parts(self, stream_id: str, start: int = 0) -> AsyncIterator[StreamPart]:
        """The stream's parts from `start`, each as soon as it is published, until the last one."""
        async for part in self._stub.ReadParts(
            dataengine_pb2.ReadPartsRequest(stream_id=stream_id, start=start)
        ):
            header = common_pb2.TensorHandle(
                tensor_id=stream_id, dtype=part.dtype, shape=part.shape, nbytes=len(part.data)
            )
            yield StreamPart(part.index, tensors.from_bytes(header, part.data), part.total, part.last)
