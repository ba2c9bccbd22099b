"""What both front ends (gRPC, REST) do: submit, follow progress, fetch the image, release."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import structlog
from lego import dataplane, keys, metrics
from lego.grpc_server import channel
from lego.store import ClusterStore, wait_for_key, wait_for_prefix
from lego.v1 import (
    common_pb2,
    compiler_pb2,
    compiler_pb2_grpc,
    coordinator_pb2,
    coordinator_pb2_grpc,
)
from PIL import Image

log = structlog.get_logger("lego.gateway")
DISCOVERY_TIMEOUT_S = 30.0
RESUBMIT_WINDOW_S = 60.0  # how long a request is kept and resubmitted while no coordinator leads


class GatewayError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


def encode_png(image: np.ndarray) -> bytes:
    pixels = image[0] if image.ndim == 4 else image
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


class GatewayCore:
    def __init__(self, store: ClusterStore) -> None:
        self.store = store
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._data_planes: dict[str, dataplane.DataPlane] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _data(self, address: str) -> dataplane.DataPlane:
        if address not in self._data_planes:
            self._data_planes[address] = dataplane.DataPlane(address)
        return self._data_planes[address]

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = channel(address)
        return self._channels[address]

    async def _coordinator(self) -> coordinator_pb2_grpc.CoordinatorStub:
        address = (await wait_for_key(self.store, keys.COORDINATOR_LEADER, DISCOVERY_TIMEOUT_S)).decode()
        return coordinator_pb2_grpc.CoordinatorStub(self._channel(address))

    async def _compiler(self) -> compiler_pb2_grpc.CompilerStub:
        found = await wait_for_prefix(self.store, keys.service("compiler", ""), DISCOVERY_TIMEOUT_S)
        return compiler_pb2_grpc.CompilerStub(self._channel(next(iter(found.values())).decode()))

    async def list_workflows(self) -> compiler_pb2.ListWorkflowsReply:
        reply: compiler_pb2.ListWorkflowsReply = await (await self._compiler()).ListWorkflows(
            common_pb2.Empty()
        )
        return reply

    async def register_workflow(self, spec: compiler_pb2.WorkflowSpec) -> compiler_pb2.RegisterWorkflowReply:
        try:
            reply: compiler_pb2.RegisterWorkflowReply = await (await self._compiler()).RegisterWorkflow(spec)
        except grpc.aio.AioRpcError as error:
            raise GatewayError(error.code(), error.details() or "") from None
        return reply

    async def generate(
        self, workflow: str, inputs: dict[str, common_pb2.Value], request_id: str = "", slo_ms: float = 0.0
    ) -> GenerateResult:
        request_id = request_id or uuid.uuid4().hex
        started = time.perf_counter()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            done, slo_s = await self._run_until_answered(workflow, inputs, request_id, slo_ms)
            image_value = done.outputs.get("image")
            if image_value is None or image_value.WhichOneof("kind") != "tensor":
                raise GatewayError(grpc.StatusCode.INTERNAL, "workflow produced no image output")
            handle = image_value.tensor
            image = await self._data(handle.locations[0]).get(handle)
            png = await asyncio.to_thread(encode_png, image)
            latency = time.perf_counter() - started
            self._background(self._release(request_id))  # off the answer's path
            log.info("request_answered", latency_s=round(latency, 4), nodes=done.nodes_executed)
            metrics.REQUESTS.labels(outcome="ok").inc()
            metrics.REQUEST_LATENCY.observe(latency)
            return GenerateResult(
                request_id,
                png,
                int(image.shape[-2]),
                int(image.shape[-3]),
                latency,
                done.nodes_executed,
                done.execution_s,
                slo_s,
            )
        except GatewayError as error:
            metrics.REQUESTS.labels(outcome=error.code.name.lower()).inc()
            raise
        finally:
            structlog.contextvars.unbind_contextvars("request_id")

    async def _release(self, request_id: str) -> None:
        try:
            await (await self._coordinator()).Release(
                coordinator_pb2.ReleaseRequest(request_id=request_id), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            log.warning("release_failed", error=error.details())

    async def _run_until_answered(
        self, workflow: str, inputs: dict[str, common_pb2.Value], request_id: str, slo_ms: float
    ) -> tuple[coordinator_pb2.RequestDone, float]:
        """Submit and follow the request; if the coordinator goes away, resubmit it (same id).
        Returns the outcome and the SLO (seconds) the coordinator admitted it with."""
        submit = coordinator_pb2.SubmitRequest(
            request_id=request_id, workflow=workflow, inputs=inputs, slo_ms=slo_ms
        )
        last_error = ""
        give_up = time.monotonic() + RESUBMIT_WINDOW_S
        while time.monotonic() < give_up:
            coordinator = await self._coordinator()
            try:
                admitted = await coordinator.Submit(submit)
                async for event in coordinator.Watch(coordinator_pb2.WatchRequest(request_id=request_id)):
                    kind = event.WhichOneof("event")
                    if kind == "done":
                        return event.done, admitted.deadline_s
                    if kind == "failed":
                        code = grpc.StatusCode.INTERNAL
                        for candidate in grpc.StatusCode:
                            if candidate.value[0] == event.failed.code:
                                code = candidate
                        if code != grpc.StatusCode.UNAVAILABLE:
                            raise GatewayError(code, event.failed.message)
                        last_error = event.failed.message
                        break
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                    raise GatewayError(error.code(), error.details() or "") from None
                last_error = error.details() or str(error.code())
            await self._release(request_id)
            log.warning("resubmitting", reason=last_error)
            await asyncio.sleep(0.5)
        raise GatewayError(grpc.StatusCode.UNAVAILABLE, f"request could not complete: {last_error}")
