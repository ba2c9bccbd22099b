"""Partial outputs: a producer publishes the parts of a stream one by one while it runs; readers
iterate them as they arrive, from any index, and stop after the part marked last."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from lego.v1 import dataengine_pb2

from lego_dataengine.tensor_store import request_of


@dataclass
class PartStream:
    parts: list[dataengine_pb2.TensorPart] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def finished(self) -> bool:
        return bool(self.parts) and self.parts[-1].last

    @property
    def nbytes(self) -> int:
        return sum(len(part.data) for part in self.parts)


class PartStreams:
    def __init__(self) -> None:
        self._streams: dict[str, PartStream] = {}

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def nbytes(self) -> int:
        return sum(stream.nbytes for stream in self._streams.values())

    async def publish(self, part: dataengine_pb2.TensorPart) -> None:
        """Append a part; parts must come in order (index = parts so far) and none after the last.
        A part the stream already holds is ignored: a producer re-run after a failure publishes
        its (deterministic) parts again, and readers already have them."""
        stream = self._streams.setdefault(part.stream_id, PartStream())
        if part.index < len(stream.parts):
            return
        if stream.finished:
            raise ValueError(f"stream {part.stream_id} is finished; part {part.index} refused")
        if part.index != len(stream.parts):
            raise ValueError(f"stream {part.stream_id}: expected part {len(stream.parts)}, got {part.index}")
        async with stream.changed:
            stream.parts.append(part)
            stream.changed.notify_all()

    async def read(
        self, stream_id: str, start: int, timeout_s: float
    ) -> AsyncIterator[dataengine_pb2.TensorPart]:
        """Parts from `start` on, each as soon as it is published; TimeoutError if one takes too long.
        A reader may come before the first part (the stream is made for it); a stream that got no
        part before the reader gave up is dropped again, so unknown ids leave nothing behind."""
        if start < 0:
            raise ValueError(f"start must be ≥ 0, got {start}")
        stream = self._streams.setdefault(stream_id, PartStream())
        index = start
        while True:
            async with stream.changed:
                try:
                    async with asyncio.timeout(timeout_s):
                        await stream.changed.wait_for(lambda: len(stream.parts) > index)  # noqa: B023
                except TimeoutError:
                    if not stream.parts and self._streams.get(stream_id) is stream:
                        del self._streams[stream_id]
                    raise
                part = stream.parts[index]
            yield part
            if part.last:
                return
            index += 1

    def free(self, stream_ids: list[str], request_id: str = "") -> int:
        doomed = set(stream_ids)
        if request_id:
            doomed |= {sid for sid in self._streams if request_of(sid) == request_id}
        return sum(self._streams.pop(sid, None) is not None for sid in doomed)
