"""What both front ends (gRPC, REST) do: submit, follow progress, fetch the image, release."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import grpc
import numpy as np
import structlog
from lego import dataplane, keys, metrics
from lego.errors import field_from_metadata
from lego.grpc_server import channel
from lego.store import ClusterStore, cancel_task, wait_for_key, wait_for_prefix
from lego.v1 import (
    common_pb2,
    compiler_pb2,
    compiler_pb2_grpc,
    coordinator_pb2,
    coordinator_pb2_grpc,
    gateway_pb2,
)
from PIL import Image

from lego_gateway.tracking import GatewayError, GenerateResult, RequestRegistry, TrackedRequest

log = structlog.get_logger("lego.gateway")
DISCOVERY_TIMEOUT_S = 30.0
RESUBMIT_WINDOW_S = 60.0  # how long a request is kept and resubmitted while no coordinator leads


def encode_png(image: np.ndarray) -> bytes:
    pixels = image[0] if image.ndim == 4 else image
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def _rpc_error(error: grpc.aio.AioRpcError) -> GatewayError:
    return GatewayError(error.code(), error.details() or "", field_from_metadata(error.trailing_metadata()))


def _status_code(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


class GatewayCore:
    def __init__(self, store: ClusterStore, registry: RequestRegistry | None = None) -> None:
        self.store = store
        self.requests = registry or RequestRegistry()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._data_planes: dict[str, dataplane.DataPlane] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            await cancel_task(task)
        for chan in self._channels.values():
            await chan.close()
        self._channels.clear()

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
            raise _rpc_error(error) from None
        return reply

    async def import_comfyui(self, workflow_json: str) -> compiler_pb2.ImportComfyUIReply:
        request = compiler_pb2.ImportComfyUIRequest(workflow_json=workflow_json)
        try:
            reply: compiler_pb2.ImportComfyUIReply = await (await self._compiler()).ImportComfyUI(request)
        except grpc.aio.AioRpcError as error:
            raise _rpc_error(error) from None
        return reply

    async def cluster_view(self) -> gateway_pb2.ClusterView:
        try:
            status = await (await self._coordinator()).ClusterStatus(common_pb2.Empty(), timeout=10)
        except grpc.aio.AioRpcError as error:
            raise _rpc_error(error) from None
        return gateway_pb2.ClusterView(cluster=status, slo=self.requests.slo_window())

    # ---- requests ----

    async def submit(
        self,
        workflow: str,
        inputs: dict[str, common_pb2.Value],
        request_id: str = "",
        slo_ms: float = 0.0,
        idempotency_key: str = "",
    ) -> TrackedRequest:
        """Admit a request (errors and rejections are raised here) and follow it in the background."""
        if idempotency_key:
            earlier = self.requests.by_idempotency_key(idempotency_key)
            if earlier is not None:
                return earlier
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            return self.requests.get(request_id)
        tracked = TrackedRequest(request_id, workflow)
        self.requests.add(tracked, idempotency_key)
        await tracked.record("queued")
        submit = coordinator_pb2.SubmitRequest(
            request_id=request_id, workflow=workflow, inputs=inputs, slo_ms=slo_ms
        )
        try:
            admitted = await self._admit(submit)
        except grpc.aio.AioRpcError as error:
            failure = _rpc_error(error)
            self.requests.discard(request_id)
            await tracked.record("rejected", code=failure.code.value[0], message=failure.message)
            metrics.REQUESTS.labels(outcome=failure.code.name.lower()).inc()
            raise failure from None
        except GatewayError:
            self.requests.discard(request_id)
            raise
        tracked.slo_s, tracked.estimate_s = admitted.deadline_s, admitted.estimate_s
        await tracked.record("admitted")
        self._background(self._follow(tracked, submit))
        return tracked

    async def _admit(self, submit: coordinator_pb2.SubmitRequest) -> coordinator_pb2.SubmitReply:
        """Submit to the leader; while there is none (a failover), retry for RESUBMIT_WINDOW_S."""
        give_up = time.monotonic() + RESUBMIT_WINDOW_S
        while True:
            try:
                reply: coordinator_pb2.SubmitReply = await (await self._coordinator()).Submit(submit)
                return reply
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:
                    raise
                log.warning("submit_retry", reason=error.details())
            await asyncio.sleep(0.5)

    async def generate(
        self,
        workflow: str,
        inputs: dict[str, common_pb2.Value],
        request_id: str = "",
        slo_ms: float = 0.0,
        idempotency_key: str = "",
    ) -> GenerateResult:
        tracked = await self.submit(workflow, inputs, request_id, slo_ms, idempotency_key)
        return await tracked.wait()

    async def cancel(self, request_id: str) -> TrackedRequest:
        tracked = self.requests.get(request_id)
        if tracked.finished:
            return tracked
        tracked.error = GatewayError(
            grpc.StatusCode.CANCELLED, f"request {request_id} cancelled by the client"
        )
        await tracked.record(
            "cancelled", code=grpc.StatusCode.CANCELLED.value[0], message=tracked.error.message
        )
        try:
            await (await self._coordinator()).Cancel(
                coordinator_pb2.CancelRequest(request_id=request_id), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            log.warning("cancel_failed", request_id=request_id, error=error.details())
        self._background(self._release(request_id))
        metrics.REQUESTS.labels(outcome="cancelled").inc()
        return tracked

    async def _follow(self, tracked: TrackedRequest, submit: coordinator_pb2.SubmitRequest) -> None:
        structlog.contextvars.bind_contextvars(request_id=tracked.request_id)
        try:
            done = await self._run_until_answered(tracked, submit)
            if done is not None and not tracked.finished:
                tracked.result = await self._fetch_image(tracked, done)
                self.requests.answered(tracked)
                await tracked.record("done")
                metrics.REQUESTS.labels(outcome="ok").inc()
                metrics.REQUEST_LATENCY.observe(tracked.latency_s())
                log.info(
                    "request_answered", latency_s=round(tracked.latency_s(), 4), nodes=done.nodes_executed
                )
        except GatewayError as error:
            tracked.error = error
            await tracked.record("failed", code=error.code.value[0], message=error.message)
            metrics.REQUESTS.labels(outcome=error.code.name.lower()).inc()
        except Exception as error:  # whatever breaks, the client gets an answer
            log.exception("request_follow_failed")
            tracked.error = GatewayError(grpc.StatusCode.INTERNAL, f"gateway error: {error}")
            await tracked.record(
                "failed", code=grpc.StatusCode.INTERNAL.value[0], message=tracked.error.message
            )
        finally:
            if tracked.state != "cancelled":  # cancel() releases it itself
                await self._release(tracked.request_id)

    async def _fetch_image(
        self, tracked: TrackedRequest, done: coordinator_pb2.RequestDone
    ) -> GenerateResult:
        image_value = done.outputs.get("image")
        if image_value is None or image_value.WhichOneof("kind") != "tensor":
            raise GatewayError(grpc.StatusCode.INTERNAL, "workflow produced no image output")
        handle = image_value.tensor
        image = await self._data(handle.locations[0]).get(handle)
        png = await asyncio.to_thread(encode_png, image)
        return GenerateResult(
            tracked.request_id,
            png,
            int(image.shape[-2]),
            int(image.shape[-3]),
            tracked.latency_s(),
            done.nodes_executed,
            done.execution_s,
            tracked.slo_s,
            done.unpatched_calls,
            done.skipped_steps,
        )

    async def _release(self, request_id: str) -> None:
        try:
            await (await self._coordinator()).Release(
                coordinator_pb2.ReleaseRequest(request_id=request_id), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            log.warning("release_failed", error=error.details())

    async def _run_until_answered(
        self, tracked: TrackedRequest, submit: coordinator_pb2.SubmitRequest
    ) -> coordinator_pb2.RequestDone | None:
        """Follow the admitted request; if its coordinator goes away, resubmit it (same id) to the
        next leader. None when the client cancelled it meanwhile."""
        last_error = ""
        give_up = time.monotonic() + RESUBMIT_WINDOW_S
        resubmit = False
        while time.monotonic() < give_up and not tracked.finished:
            coordinator = await self._coordinator()
            try:
                if resubmit:
                    await coordinator.Submit(submit)
                watch = coordinator_pb2.WatchRequest(request_id=tracked.request_id, node_events=True)
                async for event in coordinator.Watch(watch):
                    kind = event.WhichOneof("event")
                    if kind == "done":
                        return event.done
                    if kind == "step":
                        await tracked.record("step", step=event.step.step, total=event.step.total)
                    elif kind == "node_started":
                        started = event.node_started
                        await tracked.record(
                            "node_started", node_id=started.node_id, worker_id=started.worker_id
                        )
                    elif kind == "node_finished":
                        await tracked.record("node_finished", node_id=event.node_finished.node_id)
                    elif kind == "failed":
                        code = _status_code(event.failed.code)
                        if code != grpc.StatusCode.UNAVAILABLE:
                            raise GatewayError(code, event.failed.message)
                        last_error = event.failed.message
                        break
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                    raise _rpc_error(error) from None
                last_error = error.details() or str(error.code())
            if tracked.finished:
                return None
            await self._release(tracked.request_id)
            log.warning("resubmitting", reason=last_error)
            resubmit = True
            await asyncio.sleep(0.5)
        if tracked.finished:
            return None
        raise GatewayError(grpc.StatusCode.UNAVAILABLE, f"request could not complete: {last_error}")
