"""Client side of the data engine: the host's shared-memory arena when it can be mapped, chunked gRPC
streams otherwise (and between hosts)."""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import AsyncIterator, Iterator

import numpy as np

from lego import arena_layout, tensors
from lego.grpc_server import channel
from lego.v1 import common_pb2, dataengine_pb2, dataengine_pb2_grpc

# Chunk size of tensor streams, from `lego bench dataengine --chunk-sizes 256K,1M,4M,16M` (remote pull of
# 64 MiB over loopback, 2-core VM, two runs): 256 KiB 0.55-0.60 GB/s, 1 MiB 0.68-0.82, 4 MiB 0.65-0.91,
# 16 MiB 0.52-0.65. 1 MiB and 4 MiB are on the plateau; 1 MiB keeps per-chunk buffers small.
CHUNK_BYTES = 1024 * 1024
# Tensors up to this size travel inside the Allocate call: one round trip (~0.4 ms here) instead of two.
INLINE_BYTES = 256 * 1024


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

    async def put(self, tensor_id: str, array: np.ndarray, consumers: int = 0) -> common_pb2.TensorHandle:
        """Publish a tensor; with `consumers` > 0 it is freed after that many `release` calls."""
        arena = await self.arena()
        if arena is None:
            return await put_array(self._stub, tensor_id, array, consumers)
        header = tensors.make_handle(tensor_id, array)
        request = dataengine_pb2.AllocateRequest(header=header, consumers=consumers)
        if 0 < header.nbytes <= INLINE_BYTES:  # one call instead of two
            request.data = tensors.to_bytes(array)
            placed: dataengine_pb2.Placement = await self._stub.Allocate(request)
            return placed.handle
        placement = await self._stub.Allocate(request)
        target = np.frombuffer(arena, np.uint8, header.nbytes, placement.offset)
        np.copyto(target, _flat_bytes(array))
        handle: common_pb2.TensorHandle = await self._stub.Commit(
            dataengine_pb2.CommitRequest(tensor_id=tensor_id)
        )
        if await self._replaced(arena, tensor_id, (placement.offset, header.nbytes)):
            return await self.put(tensor_id, array, consumers)  # the bytes went to the old arena
        return handle

    async def put_many(self, outputs: list[tuple[str, np.ndarray]]) -> list[common_pb2.TensorHandle]:
        """Publish several tensors (a batch's outputs): the small ones in one call, the rest each alone."""
        arena = await self.arena()
        small = [
            i
            for i, (_, array) in enumerate(outputs)
            if arena is not None and 0 < array.nbytes <= INLINE_BYTES
        ]
        handles: dict[int, common_pb2.TensorHandle] = {}
        if small:
            request = dataengine_pb2.AllocateManyRequest()
            for index in small:
                tensor_id, array = outputs[index]
                request.tensors.add(
                    header=tensors.make_handle(tensor_id, array), data=tensors.to_bytes(array)
                )
            placed: dataengine_pb2.Placements = await self._stub.AllocateMany(request)
            handles.update(zip(small, (p.handle for p in placed.placements), strict=True))
        rest = [i for i in range(len(outputs)) if i not in handles]
        handles.update(zip(rest, await asyncio.gather(*(self.put(*outputs[i]) for i in rest)), strict=True))
        return [handles[i] for i in range(len(outputs))]

    async def get(self, handle: common_pb2.TensorHandle) -> np.ndarray:
        """The tensor, waiting for it if it has not been published yet (lazy arrival)."""
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
        view = np.frombuffer(
            arena, np.dtype(handle.dtype), found[1] // np.dtype(handle.dtype).itemsize, found[0]
        )
        view.flags.writeable = False
        return view.reshape(tuple(handle.shape))

    async def prefetch(self, handle: common_pb2.TensorHandle) -> None:
        """Have the engine start pulling a remote tensor now; a later `get` finds the replica."""
        await self._stub.Prefetch(dataengine_pb2.GetTensorRequest(handle=handle))

    async def release(self, tensor_ids: list[str]) -> int:
        """One consumer of each tensor is done; returns how many tensors that freed."""
        reply = await self._stub.Release(dataengine_pb2.ReleaseTensorsRequest(tensor_ids=tensor_ids))
        return int(reply.freed)

    async def publish_part(self, stream_id: str, index: int, array: np.ndarray, last: bool = False) -> None:
        """Publish part `index` of a stream of partial outputs while the producer still runs."""
        header = tensors.make_handle(stream_id, array)
        part = dataengine_pb2.TensorPart(
            stream_id=stream_id,
            index=index,
            dtype=header.dtype,
            shape=header.shape,
            data=tensors.to_bytes(array),
            last=last,
        )
        await self._stub.PublishPart(part)

    async def read_parts(self, stream_id: str, start: int = 0) -> AsyncIterator[np.ndarray]:
        """The stream's parts from `start`, each as soon as it is published, until the last one."""
        async for part in self._stub.ReadParts(
            dataengine_pb2.ReadPartsRequest(stream_id=stream_id, start=start)
        ):
            header = common_pb2.TensorHandle(
                tensor_id=stream_id, dtype=part.dtype, shape=part.shape, nbytes=len(part.data)
            )
            yield tensors.from_bytes(header, part.data)
