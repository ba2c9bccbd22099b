"""Each request's progress events, replayable to any number of watchers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from lego.v1 import coordinator_pb2


class RequestLog:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.started = time.monotonic()
        self.events: list[coordinator_pb2.RequestEvent] = []
        self.terminal = False
        self._changed = asyncio.Event()

    def append(self, event: coordinator_pb2.RequestEvent) -> None:
        event.request_id = self.request_id
        event.time_s = time.monotonic() - self.started
        self.events.append(event)
        if event.WhichOneof("event") in ("done", "failed"):
            self.terminal = True
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self) -> AsyncIterator[coordinator_pb2.RequestEvent]:
        sent = 0
        while True:
            changed = self._changed
            while sent < len(self.events):
                yield self.events[sent]
                sent += 1
            if self.terminal:
                return
            await changed.wait()
