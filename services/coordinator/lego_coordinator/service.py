"""The Coordinator gRPC servicer: a thin shell that feeds the pure Scheduler and carries out its
decisions (dispatch batches down worker streams, publish progress, free tensors)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import grpc
import structlog
from lego import keys
from lego.errors import InvalidRequest
from lego.graph import instantiate
from lego.grpc_server import RunningServer, channel, start_server
from lego.request_inputs import resolve_inputs
from lego.store import ClusterStore, Registration, cancel_task
from lego.v1 import (
    common_pb2,
    compiler_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    dataengine_pb2,
    dataengine_pb2_grpc,
)
from lego.values import Scalar, from_value, to_value

from lego_coordinator import scheduler as core
from lego_coordinator.request_log import RequestLog

log = structlog.get_logger("lego.coordinator")
LEADER_TTL_S = 5.0


def _value(value: object) -> common_pb2.Value:
    if isinstance(value, common_pb2.TensorHandle):
        return common_pb2.Value(tensor=value)
    assert isinstance(value, str | int | float | bool)
    return to_value(value)


def _batch_message(dispatch: core.Dispatch) -> coordinator_pb2.CoordinatorMessage:
    batch = coordinator_pb2.TaskBatch(
        batch_id=dispatch.batch_id, op=dispatch.op, model=dispatch.model, mode=dispatch.mode
    )
    for source, scale in dispatch.patches:
        batch.patches.add(source=source, scale=scale)
    for task in dispatch.tasks:
        message = batch.tasks.add(
            task_id=task.task_id,
            request_id=task.request_id,
            node_id=task.node.id,
            outputs=list(task.node.outputs),
            state_key=task.node.state_key,
        )
        for name, value in task.inputs.items():
            message.inputs[name].CopyFrom(_value(value))
    return coordinator_pb2.CoordinatorMessage(batch=batch)


def _event_message(event: core.Event) -> coordinator_pb2.RequestEvent:
    if isinstance(event, core.NodeStarted):
        return coordinator_pb2.RequestEvent(
            node_started=coordinator_pb2.NodeStarted(node_id=event.node_id, worker_id=event.worker_id)
        )
    if isinstance(event, core.NodeFinished):
        return coordinator_pb2.RequestEvent(node_finished=coordinator_pb2.NodeFinished(node_id=event.node_id))
    if isinstance(event, core.StepProgress):
        return coordinator_pb2.RequestEvent(
            step=coordinator_pb2.StepProgress(step=event.step, total=event.total)
        )
    if isinstance(event, core.RequestDone):
        done = coordinator_pb2.RequestDone(nodes_executed=event.nodes_executed)
        for name, handle in event.outputs.items():
            done.outputs[name].CopyFrom(_value(handle))
        return coordinator_pb2.RequestEvent(done=done)
    code = grpc.StatusCode.UNAVAILABLE if event.retryable else grpc.StatusCode.INTERNAL
    if event.message == "cancelled":
        code = grpc.StatusCode.CANCELLED
    return coordinator_pb2.RequestEvent(
        failed=coordinator_pb2.RequestFailed(code=code.value[0], message=event.message)
    )


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self, store: ClusterStore, max_batch: Callable[[str, str, str], int] = core.default_max_batch
    ) -> None:
        self.store = store
        self.scheduler = core.Scheduler(max_batch)
        self.logs: dict[str, RequestLog] = {}
        self._outboxes: dict[str, asyncio.Queue[coordinator_pb2.CoordinatorMessage]] = {}
        self._worker_addresses: dict[str, str] = {}
        self._dataengines: dict[str, dataengine_pb2_grpc.DataEngineStub] = {}

    # ---- scheduling loop ----

    def _publish(self, events: list[core.Event]) -> None:
        for event in events:
            request_log = self.logs.get(event.request_id)
            if request_log is not None:
                request_log.append(_event_message(event))

    def _pump(self) -> None:
        dispatches, events = self.scheduler.schedule(time.monotonic())
        self._publish(events)
        for dispatch in dispatches:
            self._outboxes[dispatch.worker_id].put_nowait(_batch_message(dispatch))

    async def _workflow(self, name: str) -> compiler_pb2.WorkflowSpec:
        raw = await self.store.get(keys.workflow(name))
        if raw is None:
            known = sorted(
                k.removeprefix(keys.WORKFLOWS) for k in await self.store.get_prefix(keys.WORKFLOWS)
            )
            raise InvalidRequest("workflow", f"unknown workflow {name!r} (registered: {known})")
        return compiler_pb2.WorkflowSpec.FromString(raw)

    # ---- client-facing RPCs ----

    async def Submit(
        self, request: coordinator_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.SubmitReply:
        request_id = request.request_id
        if not request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id must not be empty")
        if request_id in self.logs:  # a resubmission (gateway retry): already accepted
            return coordinator_pb2.SubmitReply(request_id=request_id)
        try:
            workflow = await self._workflow(request.workflow)
            given: dict[str, Scalar] = {}
            for name, value in request.inputs.items():
                scalar = from_value(value)
                if not isinstance(scalar, str | int | float | bool):
                    raise InvalidRequest(name, f"{name} must be a scalar value")
                given[name] = scalar
            graph = instantiate(workflow, resolve_inputs(workflow, given))
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
        self.logs[request_id] = RequestLog(request_id)
        self.scheduler.submit(request_id, graph, time.monotonic())
        log.info("request_admitted", request_id=request_id, workflow=request.workflow, nodes=len(graph.nodes))
        self._pump()
        return coordinator_pb2.SubmitReply(request_id=request_id, node_count=len(graph.nodes))

    async def Watch(
        self, request: coordinator_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.RequestEvent]:
        request_log = self.logs.get(request.request_id)
        if request_log is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown request {request.request_id!r}")
            return
        async for event in request_log.follow():
            yield event

    async def Release(
        self, request: coordinator_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Empty:
        await self.release(request.request_id)
        return common_pb2.Empty()

    async def release(self, request_id: str) -> None:
        self._publish(self.scheduler.cancel(request_id))
        self.scheduler.release(request_id)
        self.logs.pop(request_id, None)
        message = coordinator_pb2.CoordinatorMessage(
            release=coordinator_pb2.ReleaseRequest(request_id=request_id)
        )
        for outbox in self._outboxes.values():
            outbox.put_nowait(message)
        for stub in self._dataengines.values():
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Free(dataengine_pb2.FreeRequest(request_id=request_id), timeout=5)

    async def ClusterStatus(
        self, request: common_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ClusterStatusReply:
        reply = coordinator_pb2.ClusterStatusReply(
            requests_in_flight=self.scheduler.in_flight_requests(), ready_tasks=self.scheduler.ready_count()
        )
        for worker_id, (busy, loaded) in sorted(self.scheduler.workers().items()):
            reply.workers.add(
                worker_id=worker_id,
                address=self._worker_addresses.get(worker_id, ""),
                busy=busy,
                loaded_models=loaded,
            )
        return reply

    # ---- the worker stream ----

    async def WorkerStream(  # type: ignore[override]  # reads and writes through the context
        self, request_iterator: object, context: grpc.aio.ServicerContext
    ) -> None:
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("message") != "hello":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message must be a hello")
        hello = first.hello
        worker_id = hello.worker_id
        outbox: asyncio.Queue[coordinator_pb2.CoordinatorMessage] = asyncio.Queue()
        self._outboxes[worker_id] = outbox
        self._worker_addresses[worker_id] = hello.address
        if hello.dataengine_address not in self._dataengines:
            self._dataengines[hello.dataengine_address] = dataengine_pb2_grpc.DataEngineStub(
                channel(hello.dataengine_address)
            )
        self.scheduler.add_worker(worker_id, list(hello.loaded_models))
        log.info("worker_joined", worker_id=worker_id, address=hello.address)
        self._pump()
        writer = asyncio.create_task(self._write_outbox(outbox, context))
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    break
                if message.WhichOneof("message") == "result":
                    self._on_result(worker_id, message.result)
        finally:
            await cancel_task(writer)
            self._outboxes.pop(worker_id, None)
            self._worker_addresses.pop(worker_id, None)
            self._publish(self.scheduler.remove_worker(worker_id))
            log.info("worker_left", worker_id=worker_id)
            self._pump()

    async def _write_outbox(
        self, outbox: asyncio.Queue[coordinator_pb2.CoordinatorMessage], context: grpc.aio.ServicerContext
    ) -> None:
        while True:
            await context.write(await outbox.get())

    def _on_result(self, worker_id: str, result: coordinator_pb2.BatchResult) -> None:
        now = time.monotonic()
        for event in result.model_events:
            log.info(
                "model_" + event.kind, worker_id=worker_id, model=event.model, seconds=round(event.seconds, 4)
            )
        self.scheduler.set_loaded(worker_id, list(result.loaded_models))
        if result.error:
            log.warning("batch_failed", batch_id=result.batch_id, error=result.error)
            events = self.scheduler.fail_batch(result.batch_id, result.error)
        else:
            outputs = {r.task_id: dict(r.outputs.items()) for r in result.results}
            events = self.scheduler.complete(result.batch_id, outputs, now)  # type: ignore[arg-type]
        self._publish(events)
        self._pump()


class CoordinatorService:
    def __init__(
        self, servicer: CoordinatorServicer, server: RunningServer, leadership: Registration
    ) -> None:
        self.servicer = servicer
        self.server = server
        self.address = server.address
        self._leadership = leadership

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._leadership.close()
        await self.server.stop()


async def serve(
    store: ClusterStore,
    host: str = "127.0.0.1",
    port: int = 0,
    max_batch: Callable[[str, str, str], int] = core.default_max_batch,
) -> CoordinatorService:
    servicer = CoordinatorServicer(store, max_batch)
    server = await start_server(
        lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, s),
        [coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name],
        host,
        port,
    )
    leadership = await store.register(keys.COORDINATOR_LEADER, server.address.encode(), LEADER_TTL_S)
    log.info("coordinator_started", address=server.address)
    return CoordinatorService(servicer, server, leadership)
