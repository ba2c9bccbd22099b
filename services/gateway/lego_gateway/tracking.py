"""The gateway's record of each request it accepted: state, progress events, result, retention."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from lego.v1 import gateway_pb2

TERMINAL_STATES = frozenset({"done", "failed", "cancelled"})
TERMINAL_EVENTS = frozenset({"done", "failed", "cancelled", "rejected"})
NODE_EVENTS = frozenset({"node_started", "node_finished"})


class GatewayError(Exception):
    """An answer the client gets instead of an image; `field` names the input at fault, if any."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass
class GenerateResult:
    request_id: str
    png: bytes
    width: int
    height: int
    latency_s: float
    nodes_executed: int
    execution_s: float
    slo_s: float = 0.0
    unpatched_calls: int = 0  # denoiser calls that ran before their LoRA had loaded
    skipped_steps: int = 0  # denoise iterations an approximate-cache hit skipped


@dataclass
class TrackedRequest:
    request_id: str
    workflow: str
    accepted_at: float = field(default_factory=time.monotonic)
    state: str = "queued"
    step: int = 0
    total_steps: int = 0
    slo_s: float = 0.0
    estimate_s: float = 0.0
    events: list[gateway_pb2.ProgressEvent] = field(default_factory=list)
    result: GenerateResult | None = None
    error: GatewayError | None = None
    finished_at: float | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    def latency_s(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return end - self.accepted_at

    async def record(
        self,
        kind: str,
        *,
        node_id: str = "",
        worker_id: str = "",
        step: int = 0,
        total: int = 0,
        code: int = 0,
        message: str = "",
    ) -> None:
        """Append one progress event (and, for the ending ones, the final state) and wake followers."""
        event = gateway_pb2.ProgressEvent(
            request_id=self.request_id,
            kind=kind,
            time_s=time.monotonic() - self.accepted_at,
            node_id=node_id,
            worker_id=worker_id,
            step=step,
            total=total,
            code=code,
            message=message,
        )
        async with self.changed:
            if self.finished:
                return  # e.g. the coordinator's failure report of a request the client cancelled
            self.events.append(event)
            if kind == "step":
                self.step, self.total_steps = event.step, event.total
            elif kind == "admitted":
                self.state = "running"
            elif kind in TERMINAL_EVENTS:
                self.state = "failed" if kind == "rejected" else kind
                self.finished_at = time.monotonic()
            self.changed.notify_all()

    async def follow(self, node_events: bool = False) -> AsyncIterator[gateway_pb2.ProgressEvent]:
        """Every event from the first, then new ones as they happen, until the request ends."""
        index = 0

        def moved() -> bool:
            return index < len(self.events) or self.finished

        while True:
            async with self.changed:
                await self.changed.wait_for(moved)
                fresh = self.events[index:]
                ended = self.finished
            index += len(fresh)
            for event in fresh:
                if node_events or event.kind not in NODE_EVENTS:
                    yield event
            if ended and index >= len(self.events):
                return

    async def wait(self) -> GenerateResult:
        async with self.changed:
            await self.changed.wait_for(lambda: self.finished)
        if self.result is None:
            raise self.error or GatewayError(
                grpc.StatusCode.CANCELLED, f"request {self.request_id} cancelled"
            )
        return self.result

    def status(self) -> gateway_pb2.RequestStatus:
        error = self.error
        return gateway_pb2.RequestStatus(
            request_id=self.request_id,
            workflow=self.workflow,
            state=self.state,
            step=self.step,
            total_steps=self.total_steps,
            latency_s=self.latency_s(),
            slo_s=self.slo_s,
            estimate_s=self.estimate_s,
            error_code=error.code.value[0] if error else 0,
            error_message=error.message if error else "",
        )


class RequestRegistry:
    """Requests by id (and idempotency key). Finished ones are kept `retention_s` seconds for their
    clients to fetch, and at most `max_finished` of them, oldest dropped first; unfinished ones are
    kept until they end, at most `max_in_flight`."""

    def __init__(
        self, retention_s: float = 600.0, max_finished: int = 256, max_in_flight: int = 4096
    ) -> None:
        self.retention_s = retention_s
        self.max_finished = max_finished
        self.max_in_flight = max_in_flight
        self._requests: OrderedDict[str, TrackedRequest] = OrderedDict()
        self._by_key: dict[str, str] = {}
        self._answered: deque[tuple[float, bool]] = deque()  # (when, met its SLO)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def get(self, request_id: str) -> TrackedRequest:
        self.expire()
        tracked = self._requests.get(request_id)
        if tracked is None:
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"unknown request {request_id!r}", "request_id")
        return tracked

    def by_idempotency_key(self, key: str) -> TrackedRequest | None:
        request_id = self._by_key.get(key)
        return self._requests.get(request_id) if request_id else None

    def add(self, tracked: TrackedRequest, idempotency_key: str = "") -> None:
        self.expire()
        in_flight = sum(1 for r in self._requests.values() if not r.finished)
        if in_flight >= self.max_in_flight:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the gateway holds {in_flight} unfinished requests (limit {self.max_in_flight})",
            )
        self._requests[tracked.request_id] = tracked
        if idempotency_key:
            self._by_key[idempotency_key] = tracked.request_id
        self.expire()

    def discard(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._by_key = {k: v for k, v in self._by_key.items() if v != request_id}

    def answered(self, tracked: TrackedRequest) -> None:
        met = tracked.slo_s <= 0 or tracked.latency_s() <= tracked.slo_s
        self._answered.append((time.monotonic(), met))

    def slo_window(self, window_s: float = 300.0) -> gateway_pb2.SloWindow:
        horizon = time.monotonic() - window_s
        while self._answered and self._answered[0][0] < horizon:
            self._answered.popleft()
        met = sum(1 for _, ok in self._answered if ok)
        answered = len(self._answered)
        return gateway_pb2.SloWindow(
            window_s=window_s, answered=answered, met=met, attainment=met / answered if answered else 1.0
        )

    def expire(self) -> None:
        now = time.monotonic()
        finished = [r for r in self._requests.values() if r.finished_at is not None]
        excess = len(finished) - self.max_finished
        for index, tracked in enumerate(finished):
            assert tracked.finished_at is not None
            if index < excess or now - tracked.finished_at > self.retention_s:
                self.discard(tracked.request_id)
