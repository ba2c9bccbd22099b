"""The data engine's core: which tensor owns which arena block, lazy arrival, reference counts.

No memory is touched here: the store hands out offsets from its allocator and the servicer copies
bytes. A tensor is *pending* from `reserve` until `commit` (its bytes are being written), then
*committed* (readable). A pending tensor that is freed keeps its block until its writer commits or
aborts, so a late writer can never scribble over a block that was given to another tensor; likewise a
tensor freed while the engine streams it out (pinned) keeps its block until the stream ends.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from lego.allocator import ArenaAllocator
from lego.v1 import common_pb2


@dataclass
class Entry:
    handle: common_pb2.TensorHandle
    offset: int  # in the data region
    consumers: int  # reads still to come before the tensor dies; 0 = freed only explicitly
    doomed: bool = False  # freed while pending or pinned: the block goes back when that ends
    pins: int = 0  # engine-side readers streaming the bytes out right now
    replicas: set[str] = field(default_factory=set)  # data engines that pulled a copy


FREED_REQUESTS_KEPT = 4096  # requests remembered as freed, so a late wait for their tensors fails at once


class FreedBeforeArrival(LookupError):
    """A waited-for tensor's request was freed (dropped, failed, cancelled): it will never arrive."""


def request_of(tensor_id: str) -> str:
    return tensor_id.split("/", 1)[0]


class TensorStore:
    def __init__(self, capacity: int) -> None:
        self.allocator = ArenaAllocator(capacity)
        self._pending: dict[str, Entry] = {}
        self._tensors: dict[str, Entry] = {}
        self._by_request: dict[str, set[str]] = {}
        self._arrivals: dict[str, asyncio.Event] = {}
        self._freed_requests: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def bytes_stored(self) -> int:
        return sum(entry.handle.nbytes for entry in self._tensors.values())

    def reserve(self, handle: common_pb2.TensorHandle, consumers: int = 0) -> Entry:
        """A block for a tensor about to be written; ArenaFull when none is large enough."""
        if handle.tensor_id in self._pending:
            raise ValueError(f"tensor {handle.tensor_id} is already being written")
        if handle.nbytes < 0 or consumers < 0:
            raise ValueError(f"tensor {handle.tensor_id}: nbytes and consumers must be ≥ 0")
        entry = Entry(handle, self.allocator.allocate(handle.nbytes), consumers)
        self._freed_requests.pop(request_of(handle.tensor_id), None)  # the request is writing again
        self._pending[handle.tensor_id] = entry
        self._by_request.setdefault(request_of(handle.tensor_id), set()).add(handle.tensor_id)
        return entry

    def commit(self, tensor_id: str) -> tuple[Entry, Entry | None]:
        """Make a pending tensor readable: (it, the replica it replaced). KeyError if it was freed."""
        entry = self._pending.pop(tensor_id, None)
        if entry is None:
            raise KeyError(f"tensor {tensor_id} is not being written")
        if entry.doomed:
            self.allocator.free(entry.offset)
            self._forget_request(tensor_id)
            raise KeyError(f"tensor {tensor_id} was freed while being written")
        replaced = self._tensors.pop(tensor_id, None)
        if replaced is not None:
            if replaced.pins:
                replaced.doomed = True
            else:
                self.allocator.free(replaced.offset)
        self._tensors[tensor_id] = entry
        arrival = self._arrivals.pop(tensor_id, None)
        if arrival is not None:
            arrival.set()
        return entry, replaced

    def abort(self, tensor_id: str) -> None:
        """Give back the block of a pending tensor whose write failed."""
        entry = self._pending.pop(tensor_id, None)
        if entry is not None:
            self.allocator.free(entry.offset)
            if tensor_id not in self._tensors:
                self._forget_request(tensor_id)

    def pin(self, entry: Entry) -> None:
        entry.pins += 1

    def unpin(self, entry: Entry) -> None:
        entry.pins -= 1
        if entry.pins == 0 and entry.doomed:
            self.allocator.free(entry.offset)

    def get(self, tensor_id: str) -> Entry | None:
        return self._tensors.get(tensor_id)

    async def wait_for(self, tensor_id: str, timeout_s: float) -> Entry:
        """The committed tensor, waiting for it (lazy arrival); TimeoutError after `timeout_s`,
        FreedBeforeArrival when its request is freed first (a consumer must not wait for a
        producer whose request was dropped: it held its worker for the whole timeout)."""
        entry = self._tensors.get(tensor_id)
        if entry is not None:
            return entry
        if request_of(tensor_id) not in self._freed_requests:
            arrival = self._arrivals.setdefault(tensor_id, asyncio.Event())
            async with asyncio.timeout(timeout_s):
                await arrival.wait()
        if tensor_id not in self._tensors:
            raise FreedBeforeArrival(f"tensor {tensor_id} will not arrive: its request was freed")
        return self._tensors[tensor_id]

    def release(self, tensor_ids: list[str]) -> list[Entry]:
        """One consumer of each tensor is done; returns the tensors whose last consumer that was."""
        dead = []
        for tensor_id in tensor_ids:
            entry = self._tensors.get(tensor_id)
            if entry is None or entry.consumers <= 0:
                continue
            entry.consumers -= 1
            if entry.consumers == 0:
                dead.append(tensor_id)
        return self.free(dead)

    def free(
        self, tensor_ids: list[str], request_id: str = "", keep: frozenset[str] = frozenset()
    ) -> list[Entry]:
        """Drop tensors (and every tensor of `request_id` but those in `keep`); returns the
        committed ones freed."""
        of_request = self._by_request.get(request_id, set()) - keep if request_id else set()
        doomed = set(tensor_ids) | of_request
        if request_id:
            self._freed_requests[request_id] = None
            while len(self._freed_requests) > FREED_REQUESTS_KEPT:
                self._freed_requests.popitem(last=False)
            for waited in [t for t in self._arrivals if request_of(t) == request_id]:
                self._arrivals.pop(waited).set()  # the waiter finds no tensor: FreedBeforeArrival
        freed = []
        for tensor_id in doomed:
            pending = self._pending.get(tensor_id)
            if pending is not None:
                pending.doomed = True
            entry = self._tensors.pop(tensor_id, None)
            if entry is not None:
                if entry.pins:
                    entry.doomed = True
                else:
                    self.allocator.free(entry.offset)
                freed.append(entry)
            if pending is None:
                self._forget_request(tensor_id)
        return freed

    def _forget_request(self, tensor_id: str) -> None:
        request = request_of(tensor_id)
        members = self._by_request.get(request)
        if members is not None:
            members.discard(tensor_id)
            if not members:
                del self._by_request[request]
