"""GPU transports behind the `Transport` interface: CUDA IPC between processes on one host, NVSHMEM
between GPUs (bootstrapped with a unique id passed through the cluster store, no MPI).

Tensors stay on the device. What crosses the data engine is a small descriptor, published as a CPU
tensor under `<tensor id>@<transport>` (so a request's Free also drops it): for CUDA IPC the 64-byte
memory handle, for NVSHMEM the (PE, heap offset) pair. cupy and nvshmem4py are imported lazily: they
come with the optional extra `gpu` (`pip install 'legodiffusion[gpu]'`).
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

import numpy as np

from lego.allocator import ArenaAllocator
from lego.dataplane import DataPlane
from lego.store import ClusterStore
from lego.v1 import common_pb2

NVSHMEM_UID_KEY = "/lego/nvshmem/{group}/uid"


def _descriptor_id(tensor_id: str, kind: str) -> str:
    return f"{tensor_id}@{kind}"


def _device_handle(tensor_id: str, array: Any, location: str) -> common_pb2.TensorHandle:
    return common_pb2.TensorHandle(
        tensor_id=tensor_id,
        dtype=np.dtype(array.dtype).name,
        shape=list(array.shape),
        nbytes=int(array.nbytes),
        locations=[location],
    )


class CudaIpcTransport:
    """Same host: the producer exports a device buffer; a consumer maps it (no copy)."""

    def __init__(self, plane: DataPlane) -> None:
        self.cupy = importlib.import_module("cupy")
        self.plane = plane
        self._exported: dict[str, Any] = {}  # tensor id -> the buffer consumers map; kept alive
        self._opened: dict[str, Any] = {}

    async def put(self, tensor_id: str, array: Any, consumers: int = 0) -> common_pb2.TensorHandle:
        cupy = self.cupy
        memory = cupy.cuda.Memory(int(array.nbytes))  # its own cudaMalloc: IPC handles name whole allocations
        target = cupy.ndarray(array.shape, array.dtype, cupy.cuda.MemoryPointer(memory, 0))
        target[...] = array
        self._exported[tensor_id] = memory
        ipc = np.frombuffer(cupy.cuda.runtime.ipcGetMemHandle(memory.ptr), dtype=np.uint8)
        await self.plane.put(_descriptor_id(tensor_id, "cuda-ipc"), ipc, consumers)
        return _device_handle(tensor_id, array, self.plane.address)

    async def get(self, handle: common_pb2.TensorHandle) -> Any:
        cupy = self.cupy
        descriptor = common_pb2.TensorHandle()
        descriptor.CopyFrom(handle)
        descriptor.tensor_id = _descriptor_id(handle.tensor_id, "cuda-ipc")
        descriptor.dtype, descriptor.nbytes = "uint8", 64
        descriptor.shape[:] = [64]
        ipc = bytes(await self.plane.get(descriptor))
        pointer = cupy.cuda.runtime.ipcOpenMemHandle(ipc)
        memory = cupy.cuda.UnownedMemory(pointer, handle.nbytes, owner=None)
        self._opened[handle.tensor_id] = pointer
        return cupy.ndarray(tuple(handle.shape), handle.dtype, cupy.cuda.MemoryPointer(memory, 0))

    def free(self, tensor_ids: list[str]) -> None:
        """Drop exported buffers and close mapped ones (call when the tensors are released)."""
        for tensor_id in tensor_ids:
            self._exported.pop(tensor_id, None)
            pointer = self._opened.pop(tensor_id, None)
            if pointer is not None:
                self.cupy.cuda.runtime.ipcCloseMemHandle(pointer)


class NvshmemTransport:
    """Across GPUs: each process is a PE with one symmetric heap, carved like the CPU arena; a consumer
    reads a producer's block with a one-sided get."""

    def __init__(self, plane: DataPlane, rank: int, heap: Any, nvshmem: Any) -> None:
        self.plane = plane
        self.rank = rank
        self.heap = heap
        self.nvshmem = nvshmem
        self.cupy = importlib.import_module("cupy")
        self.allocator = ArenaAllocator(int(heap.nbytes))
        self._offsets: dict[str, int] = {}

    @classmethod
    async def bootstrap(
        cls,
        plane: DataPlane,
        store: ClusterStore,
        group: str,
        rank: int,
        nranks: int,
        heap_bytes: int,
        device_id: int = 0,
    ) -> NvshmemTransport:
        """Collective: every PE of `group` calls it; rank 0 publishes the unique id in the store."""
        nvshmem = importlib.import_module("nvshmem.core")
        device = importlib.import_module("cuda.core.experimental").Device(device_id)
        device.set_current()
        key = NVSHMEM_UID_KEY.format(group=group)
        uid = nvshmem.get_unique_id(empty=rank != 0)
        if rank == 0:
            await store.put(key, uid._data.view(np.int8).tobytes())
        else:
            raw = await store.get(key)
            while raw is None:
                await asyncio.sleep(0.05)
                raw = await store.get(key)
            uid._data.view(np.int8)[:] = np.frombuffer(raw, dtype=np.int8)
        nvshmem.init(device=device, uid=uid, rank=rank, nranks=nranks, initializer_method="uid")
        heap = nvshmem.interop.cupy.array((heap_bytes,), dtype="uint8")  # collective, same size on all PEs
        return cls(plane, rank, heap, nvshmem)

    async def put(self, tensor_id: str, array: Any, consumers: int = 0) -> common_pb2.TensorHandle:
        offset = self.allocator.allocate(int(array.nbytes))  # ArenaFull when the heap is full
        self.heap[offset : offset + array.nbytes] = self.cupy.ascontiguousarray(array).view("uint8").ravel()
        self._offsets[tensor_id] = offset
        where = np.array([self.rank, offset], dtype=np.int64)
        await self.plane.put(_descriptor_id(tensor_id, "nvshmem"), where, consumers)
        return _device_handle(tensor_id, array, self.plane.address)

    async def get(self, handle: common_pb2.TensorHandle) -> Any:
        descriptor = common_pb2.TensorHandle()
        descriptor.CopyFrom(handle)
        descriptor.tensor_id = _descriptor_id(handle.tensor_id, "nvshmem")
        descriptor.dtype, descriptor.nbytes = "int64", 16
        descriptor.shape[:] = [2]
        pe, offset = (int(v) for v in await self.plane.get(descriptor))
        target = self.cupy.empty(handle.nbytes, dtype="uint8")
        stream = self.cupy.cuda.get_current_stream()
        self.nvshmem.get(target, self.heap[offset : offset + handle.nbytes], remote_pe=pe, stream=stream)
        stream.synchronize()
        return target.view(handle.dtype).reshape(tuple(handle.shape))

    def free(self, tensor_ids: list[str]) -> None:
        """Give the heap blocks of released tensors back (call when the tensors are released)."""
        for tensor_id in tensor_ids:
            offset = self._offsets.pop(tensor_id, None)
            if offset is not None:
                self.allocator.free(offset)

    def close(self) -> None:
        """Collective: free the heap and leave NVSHMEM."""
        self.nvshmem.free_array(self.heap)
        self.nvshmem.finalize()
