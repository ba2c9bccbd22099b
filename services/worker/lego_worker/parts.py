"""Partial outputs between workers (a ControlNet's block samples feeding its denoiser).

A producer hands each part of a streamed output (stacked on dim 1) to a `PartPublisher` from its
compute thread as soon as it is computed; the publisher sends the parts to the data engine in
order. A consumer dispatched while its producer still runs gets an `ArrivingParts` in place of that
input: indexing it waits for that one part, so the denoiser's first blocks run while the ControlNet
computes its later ones. The whole tensor, published when the producer ends, answers too, so a
producer that does not stream (the emulated backend) or a stream that broke still feeds the consumer.

On the wire a stream starts with a header part (index 0, no data) whose `total` says how many
parts follow; parts 1..N carry the slices [:, 0..N-1]. The producer sends the header before it
computes anything: a consumer must know at once how many samples come (diffusers' FLUX transformer
takes None for none, and spaces the samples over its blocks by their number).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import structlog
from lego.dataplane import DataPlane
from lego.store import cancel_task
from lego.v1 import common_pb2

log = structlog.get_logger("lego.worker")

PART_WAIT_S = 60.0  # as long as the data engine waits for a lazy tensor


class ArrivingParts:
    """A deferred input (B, N, ...) whose N parts arrive while the consumer's call already runs.
    Filled from the event loop; `len` and indexing block the compute thread until the answer came."""

    def __init__(self, tensor_id: str, timeout_s: float = PART_WAIT_S) -> None:
        self.tensor_id = tensor_id
        self.timeout_s = timeout_s
        self._changed = threading.Condition()
        self._parts: dict[int, np.ndarray] = {}
        self._total: int | None = None
        self._whole: np.ndarray | None = None
        self._error: BaseException | None = None
        self.parts_used = 0  # parts a reader took from the stream rather than from the whole

    def announce(self, total: int) -> None:
        with self._changed:
            self._total = total
            self._changed.notify_all()

    def add(self, index: int, part: np.ndarray) -> None:
        with self._changed:
            self._parts[index] = part
            self._changed.notify_all()

    def complete(self, whole: np.ndarray) -> None:
        with self._changed:
            self._whole = whole
            self._total = int(whole.shape[1])
            self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._changed:
            self._error = error
            self._changed.notify_all()

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        with self._changed:
            answered = self._changed.wait_for(lambda: ready() or self._error is not None, self.timeout_s)
            if ready():
                return
            if not answered:
                raise TimeoutError(f"{self.tensor_id}: {what} did not arrive within {self.timeout_s:.0f} s")
            raise RuntimeError(f"{self.tensor_id}: {what} will not arrive: {self._error}") from self._error

    def __len__(self) -> int:
        self._wait(lambda: self._total is not None, "the number of parts")
        assert self._total is not None
        return self._total

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.tensor_id}: part {index} of {len(self)}")
        self._wait(lambda: index in self._parts or self._whole is not None, f"part {index}")
        with self._changed:
            if index in self._parts:
                self.parts_used += 1
                return self._parts[index]
            assert self._whole is not None
            return np.asarray(self._whole[:, index])


async def receive(data: DataPlane, handle: common_pb2.TensorHandle, into: ArrivingParts) -> None:
    """Fill `into` from the tensor's part stream and, when the producer ends, from the whole tensor."""

    async def read_parts() -> None:
        async for part in data.read_parts(handle.tensor_id):
            if part.index == 0:
                into.announce(part.total)
            else:
                into.add(part.index - 1, part.array)

    reader = asyncio.create_task(read_parts())
    try:
        into.complete(await data.get(handle))
    except Exception as error:  # noqa: BLE001 - handed to the compute thread, which raises it
        into.fail(error)
    finally:
        await cancel_task(reader)


class PartPublisher:
    """A `PartSink` for a compute thread: sends the parts to the data engine, in order, one at a
    time. A part that cannot be published is logged, not fatal: the consumer still gets the whole."""

    def __init__(self, data: DataPlane, stream_ids: list[dict[str, str]]) -> None:
        self._data = data
        self._stream_ids = stream_ids  # per batch item: output name → stream (tensor) id
        self._totals: dict[str, int] = {}
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, int, np.ndarray, bool] | None] = asyncio.Queue()
        self._sender = asyncio.create_task(self._send())
        self.published = 0  # parts with data that went out

    def announce(self, item: int, output: str, total: int) -> None:
        stream_id = self._stream_ids[item][output]
        self._totals[stream_id] = total
        self._queue_part(stream_id, 0, np.zeros(0, np.float32), total == 0)

    def part(self, item: int, output: str, index: int, part: np.ndarray) -> None:
        stream_id = self._stream_ids[item][output]
        last = index + 1 == self._totals[stream_id]
        self._queue_part(stream_id, index + 1, np.array(part, copy=True), last)  # copied: the thread goes on

    def _queue_part(self, stream_id: str, index: int, part: np.ndarray, last: bool) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (stream_id, index, part, last))

    async def _send(self) -> None:
        while (entry := await self._queue.get()) is not None:
            stream_id, index, part, last = entry
            try:
                await self._data.publish_part(stream_id, index, part, last, self._totals[stream_id])
                self.published += 1 if index else 0
            except Exception as error:  # noqa: BLE001 - see the class docstring
                log.warning("part_not_published", stream_id=stream_id, index=index, error=str(error))

    async def close(self) -> None:
        """Wait until every queued part went out."""
        self._queue.put_nowait(None)
        await self._sender
