"""The data engine's core: tensors by id, with waiting for tensors that have not arrived yet."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from lego.v1 import common_pb2


@dataclass
class StoredTensor:
    handle: common_pb2.TensorHandle
    data: bytes


class TensorStore:
    def __init__(self) -> None:
        self._tensors: dict[str, StoredTensor] = {}
        self._arrivals: dict[str, asyncio.Event] = {}
        self.bytes_pulled = 0

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def bytes_stored(self) -> int:
        return sum(len(t.data) for t in self._tensors.values())

    def put(self, handle: common_pb2.TensorHandle, data: bytes) -> None:
        if len(data) != handle.nbytes:
            raise ValueError(f"tensor {handle.tensor_id}: header says {handle.nbytes} bytes, got {len(data)}")
        self._tensors[handle.tensor_id] = StoredTensor(handle, data)
        arrival = self._arrivals.pop(handle.tensor_id, None)
        if arrival is not None:
            arrival.set()

    def get(self, tensor_id: str) -> StoredTensor | None:
        return self._tensors.get(tensor_id)

    async def wait_for(self, tensor_id: str, timeout_s: float) -> StoredTensor:
        """The tensor, waiting for it to be put (lazy arrival); TimeoutError after `timeout_s`."""
        stored = self._tensors.get(tensor_id)
        if stored is not None:
            return stored
        arrival = self._arrivals.setdefault(tensor_id, asyncio.Event())
        async with asyncio.timeout(timeout_s):
            await arrival.wait()
        return self._tensors[tensor_id]

    def free(self, tensor_ids: list[str], request_id: str = "") -> int:
        doomed = set(tensor_ids)
        if request_id:
            prefix = request_id + "/"
            doomed |= {tid for tid in self._tensors if tid.startswith(prefix)}
        freed = 0
        for tensor_id in doomed:
            if self._tensors.pop(tensor_id, None) is not None:
                freed += 1
        return freed
