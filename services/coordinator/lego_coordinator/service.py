"""The Coordinator gRPC servicer: a thin shell around the pure Scheduler.

It campaigns for leadership in the cluster store (a standby answers UNAVAILABLE until it wins),
turns RPCs and worker reports into scheduler calls, and carries out the scheduler's decisions:
batches down worker streams (stamped with the leader's epoch), progress to watchers, tensors freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from lego import keys
from lego.errors import InvalidRequest, field_metadata
from lego.graph import instantiate
from lego.grpc_server import RunningServer, channel, start_server
from lego.profiles import ProfileSet, default_profile_dir, load_batch_sizes
from lego.request_inputs import resolve_inputs
from lego.store import ClusterStore, Leadership, cancel_task
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
from lego_coordinator.approx_cache import DEFAULT_CAPACITY_BYTES, ApproxCache
from lego_coordinator.costs import CostModel
from lego_coordinator.request_log import RequestLog
from lego_coordinator.telemetry import Telemetry

log = structlog.get_logger("lego.coordinator")
LEADER_TTL_S = 5.0
TICK_S = 0.05  # how often deadlines are checked when SLOs are enforced
FAILURE_CODES = {
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "cancelled": grpc.StatusCode.CANCELLED,
    "internal": grpc.StatusCode.INTERNAL,
}


@dataclass
class CoordinatorConfig:
    policy: str = "lego"
    enforce_slo: bool = False  # admission control and deadline drops
    slo_factor: float = 2.0  # default SLO = slo_factor x standalone latency
    profile_dir: Path | None = None
    max_in_flight: int = 2  # batches queued on one worker (lego policy), chained steps included
    ready_depth: int = 1  # ... of which taken from the ready queue (Scheduler: why)
    time_scale: float = 1.0  # the emulated workers' --time-scale: the profiles' priors are divided by it
    approx_cache_mb: float = DEFAULT_CAPACITY_BYTES / 2**20  # cached latents of approximate caching


# a worker's model events that a batch waited for beyond its execution (not control-plane overhead)
WAITS_BEYOND_EXECUTION = ("prefetch", "load", "lora_wait")


def build_scheduler(config: CoordinatorConfig) -> core.Scheduler:
    directory = config.profile_dir or default_profile_dir()
    costs = CostModel(ProfileSet(directory), load_batch_sizes(directory), time_scale=config.time_scale)
    approx = ApproxCache(int(config.approx_cache_mb * 2**20))
    return core.Scheduler(
        costs,
        config.policy,
        config.enforce_slo,
        config.slo_factor,
        config.max_in_flight,
        approx,
        config.ready_depth,
    )


def _value(value: object) -> common_pb2.Value:
    if isinstance(value, common_pb2.TensorHandle):
        return common_pb2.Value(tensor=value)
    if isinstance(value, core.Pending):  # no dtype yet: the worker's data engine waits for it
        return common_pb2.Value(tensor=common_pb2.TensorHandle(tensor_id=value.tensor_id))
    assert isinstance(value, str | int | float | bool)
    return to_value(value)


def _batch_message(dispatch: core.Dispatch, epoch: int) -> coordinator_pb2.CoordinatorMessage:
    batch = coordinator_pb2.TaskBatch(
        batch_id=dispatch.batch_id,
        op=dispatch.op,
        model=dispatch.model,
        mode=dispatch.mode,
        epoch=epoch,
        side_lane=dispatch.side_lane,
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
            patches_optional=task.node.patches_optional,
            signature_of=task.node.signature_of,
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
        done = coordinator_pb2.RequestDone(
            nodes_executed=event.nodes_executed,
            execution_s=event.execution_s,
            unpatched_calls=event.unpatched_calls,
            skipped_steps=event.skipped_steps,
        )
        for name, handle in event.outputs.items():
            done.outputs[name].CopyFrom(_value(handle))
        return coordinator_pb2.RequestEvent(done=done)
    code = FAILURE_CODES[event.code]
    return coordinator_pb2.RequestEvent(
        failed=coordinator_pb2.RequestFailed(code=code.value[0], message=event.message)
    )


def _tensor(handle: common_pb2.TensorHandle) -> core.Tensor:
    return core.Tensor(handle, handle.nbytes, handle.locations[0] if handle.locations else "")


class _FreeStream:
    """Dead tensors to free on one data engine, one message per batch on a long-lived FreeStream (a
    one-way message costs a fraction of a `Free` call). Frees written into a stream that broke are
    lost, which leaks nothing: the engine went away with its tensors, and whatever a request still
    holds is freed when it is released (`Free`, waiting for the engine to come back)."""

    def __init__(self, stub: dataengine_pb2_grpc.DataEngineStub) -> None:
        self._stub = stub
        self._queue: asyncio.Queue[list[str]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._call: grpc.aio.StreamUnaryCall[dataengine_pb2.FreeRequest, dataengine_pb2.FreeReply] | None
        self._call = None

    def send(self, tensor_ids: list[str]) -> None:
        self._queue.put_nowait(tensor_ids)
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            request = dataengine_pb2.FreeRequest(tensor_ids=await self._queue.get())
            for _ in range(2):  # a broken stream is replaced once
                if self._call is None:
                    self._call = self._stub.FreeStream()
                try:
                    await self._call.write(request)
                    break
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    self._call = None

    async def close(self) -> None:
        if self._task is not None:
            await cancel_task(self._task)
        if self._call is not None:
            self._call.cancel()


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, store: ClusterStore, config: CoordinatorConfig) -> None:
        self.store = store
        self.config = config
        self.scheduler = build_scheduler(config)
        self.logs: dict[str, RequestLog] = {}
        self.epoch = 0  # 0 while standby
        self._outboxes: dict[str, asyncio.Queue[coordinator_pb2.CoordinatorMessage]] = {}
        self._worker_addresses: dict[str, str] = {}
        self._dataengines: dict[str, dataengine_pb2_grpc.DataEngineStub] = {}
        self._free_streams: dict[str, _FreeStream] = {}
        self._streams: dict[str, asyncio.Task[object]] = {}
        self.telemetry = Telemetry()
        self._leaving: set[str] = set()  # drained workers told to leave

    @property
    def leading(self) -> bool:
        return self.epoch > 0

    async def _require_leader(self, context: grpc.aio.ServicerContext) -> None:
        if not self.leading:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this coordinator is a standby, not the leader")

    # ---- scheduling loop ----

    def _publish(self, events: list[core.Event]) -> None:
        self.telemetry.events(events, time.monotonic())
        for event in events:
            request_log = self.logs.get(event.request_id)
            if request_log is not None:
                request_log.append(_event_message(event))

    def pump(self) -> None:
        if not self.leading:
            return
        decisions = self.scheduler.schedule(time.monotonic())
        self._publish(decisions.events)
        for dispatch in decisions.dispatches:
            self._outboxes[dispatch.worker_id].put_nowait(_batch_message(dispatch, self.epoch))
        for preload in decisions.preloads:
            message = coordinator_pb2.CoordinatorMessage(
                preload=coordinator_pb2.PreloadModel(model=preload.model)
            )
            self._outboxes[preload.worker_id].put_nowait(message)
        self.telemetry.scheduled(self.scheduler, decisions.dispatches)
        self._dismiss_drained()

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
        await self._require_leader(context)
        request_id = request.request_id
        if not request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id must not be empty")
        if request_id in self.logs:  # a resubmission (gateway retry): already accepted
            return coordinator_pb2.SubmitReply(request_id=request_id)
        if request.slo_ms < 0 or request.slo_ms != request.slo_ms:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"slo_ms must be ≥ 0, got {request.slo_ms}")
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
            unknown = error.field == "workflow"
            await context.abort(
                grpc.StatusCode.NOT_FOUND if unknown else grpc.StatusCode.INVALID_ARGUMENT,
                error.message,
                trailing_metadata=field_metadata(error.field),
            )
        now = time.monotonic()
        admission = self.scheduler.admit(
            request_id, request.workflow, graph, now, request.slo_ms / 1000 if request.slo_ms else None
        )
        if admission.unmeetable:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{admission.reason}, got {request.slo_ms:g}",
                trailing_metadata=field_metadata("slo_ms"),
            )
        if not admission.accepted:
            self.telemetry.rejected()
            log.info("request_rejected", request_id=request_id, reason=admission.reason)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request rejected: {admission.reason}")
        self.logs[request_id] = RequestLog(request_id)
        deadline = admission.deadline - now if admission.deadline != float("inf") else 0.0
        self.telemetry.admitted(request_id, now, deadline or self.config.slo_factor * admission.standalone_s)
        log.info("request_admitted", request_id=request_id, workflow=request.workflow, nodes=len(graph.nodes))
        self.pump()
        return coordinator_pb2.SubmitReply(
            request_id=request_id,
            node_count=len(graph.nodes),
            deadline_s=deadline,
            estimate_s=admission.estimate_s,
            standalone_s=admission.standalone_s,
        )

    async def Watch(
        self, request: coordinator_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.RequestEvent]:
        request_log = self.logs.get(request.request_id)
        if request_log is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown request {request.request_id!r}")
            return
        async for event in request_log.follow():
            if request.node_events or event.WhichOneof("event") not in ("node_started", "node_finished"):
                yield event

    async def Release(
        self, request: coordinator_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Empty:
        await self.release(request.request_id)
        return common_pb2.Empty()

    async def Cancel(
        self, request: coordinator_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Empty:
        if request.request_id not in self.logs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown request {request.request_id!r}")
        self._publish(self.scheduler.cancel(request.request_id))
        await self._free(request.request_id)
        self.pump()
        return common_pb2.Empty()

    async def release(self, request_id: str) -> None:
        self._publish(self.scheduler.cancel(request_id))
        self.scheduler.release(request_id)
        self.logs.pop(request_id, None)
        await self._free(request_id)
        self.pump()

    async def _free(self, request_id: str) -> None:
        message = coordinator_pb2.CoordinatorMessage(
            release=coordinator_pb2.ReleaseRequest(request_id=request_id)
        )
        kept = [  # latents the approximate cache keeps
            h.tensor_id
            for h in self.scheduler.retained_tensors(request_id)
            if isinstance(h, common_pb2.TensorHandle)
        ]
        for outbox in self._outboxes.values():
            outbox.put_nowait(message)
        for stub in list(self._dataengines.values()):
            with contextlib.suppress(grpc.aio.AioRpcError):
                # wait_for_ready: an engine that was restarted a moment ago is reached once its
                # channel reconnects, instead of failing fast (and leaking the request's tensors)
                await stub.Free(
                    dataengine_pb2.FreeRequest(request_id=request_id, keep=kept),
                    timeout=5,
                    wait_for_ready=True,
                )

    async def ClusterStatus(
        self, request: common_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ClusterStatusReply:
        reply = coordinator_pb2.ClusterStatusReply(
            requests_in_flight=self.scheduler.in_flight_requests(),
            ready_tasks=self.scheduler.ready_count(),
            policy=self.config.policy,
            epoch=self.epoch,
        )
        for worker_id, (busy, loaded) in sorted(self.scheduler.workers().items()):
            reply.workers.add(
                worker_id=worker_id,
                address=self._worker_addresses.get(worker_id, ""),
                busy=busy,
                loaded_models=loaded,
                draining=worker_id in self.scheduler.draining_workers(),
            )
        return reply

    # ---- the worker stream ----

    async def WorkerStream(  # type: ignore[override]  # reads and writes through the context
        self, request_iterator: object, context: grpc.aio.ServicerContext
    ) -> None:
        await self._require_leader(context)
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("message") != "hello":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message must be a hello")
        hello = first.hello
        worker_id = hello.worker_id
        outbox: asyncio.Queue[coordinator_pb2.CoordinatorMessage] = asyncio.Queue()
        self._outboxes[worker_id] = outbox
        current = asyncio.current_task()
        if current is not None:
            self._streams[worker_id] = current
        self._worker_addresses[worker_id] = hello.address
        if hello.dataengine_address not in self._dataengines:
            stub = dataengine_pb2_grpc.DataEngineStub(channel(hello.dataengine_address))
            self._dataengines[hello.dataengine_address] = stub
            self._free_streams[hello.dataengine_address] = _FreeStream(stub)
        self.scheduler.add_worker(
            worker_id, hello.dataengine_address, list(hello.loaded_models), frozenset(hello.streaming_calls)
        )
        log.info("worker_joined", worker_id=worker_id, address=hello.address, backend=hello.backend)
        self.pump()
        writer = asyncio.create_task(self._write_outbox(outbox, context))
        stepped_down = False
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    break
                if message.WhichOneof("message") == "result":
                    self._on_result(worker_id, message.result)
                elif message.WhichOneof("message") == "drain":
                    self._on_drain(worker_id)
        except asyncio.CancelledError:
            if self.leading:
                raise
            stepped_down = True  # dropped by `lead` (below), not by the worker
        finally:
            await cancel_task(writer)
            if self._outboxes.get(worker_id) is outbox:
                del self._outboxes[worker_id]
                self._streams.pop(worker_id, None)
                self._worker_addresses.pop(worker_id, None)
                self._leaving.discard(worker_id)
                self._publish(self.scheduler.remove_worker(worker_id))
                log.info("worker_left", worker_id=worker_id)
                self.pump()
        if stepped_down:
            # End the call with a status: a cancelled handler alone leaves it open on the worker's
            # side, and the worker would never reconnect to the new leader.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this coordinator stepped down")

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
        self.scheduler.set_loaded(worker_id, list(result.loaded_models), list(result.loras))
        for event in result.model_events:
            if event.kind == "lora_fetch":
                self.scheduler.costs.observe_lora_fetch(event.seconds)
        if result.error:
            log.warning("batch_failed", batch_id=result.batch_id, error=result.error)
            events = self.scheduler.fail_batch(result.batch_id, result.error)
        else:
            outputs = {r.task_id: {n: _tensor(h) for n, h in r.outputs.items()} for r in result.results}
            loading_s = sum(e.seconds for e in result.model_events if e.kind in WAITS_BEYOND_EXECUTION)
            unpatched = frozenset(r.task_id for r in result.results if r.unpatched)
            signatures = {r.task_id: tuple(r.signature) for r in result.results if r.signature}
            events = self.scheduler.complete(
                result.batch_id, outputs, now, result.execution_s, loading_s, unpatched, signatures
            )
        self._publish(events)
        self.pump()
        dead = [  # inline scalars (with their data) are held by no data engine
            h.tensor_id
            for h in self.scheduler.take_dead_tensors()
            if isinstance(h, common_pb2.TensorHandle) and not h.data
        ]
        if dead:  # with every replica: each engine drops its own
            for stream in self._free_streams.values():
                stream.send(dead)

    # ---- draining (scale-down) ----

    def _on_drain(self, worker_id: str) -> None:
        log.info("worker_draining", worker_id=worker_id)
        self.scheduler.drain_worker(worker_id)
        self.pump()

    def _dismiss_drained(self) -> None:
        """A draining worker with nothing in flight and no request state is told it may leave."""
        for worker_id in self.scheduler.draining_workers() - self._leaving:
            outbox = self._outboxes.get(worker_id)
            if outbox is not None and self.scheduler.drained(worker_id):
                self._leaving.add(worker_id)
                log.info("worker_drained", worker_id=worker_id)
                outbox.put_nowait(coordinator_pb2.CoordinatorMessage(leave=coordinator_pb2.LeaveCluster()))

    async def close(self) -> None:
        for stream in self._free_streams.values():
            await stream.close()

    # ---- leadership ----

    async def lead(self, address: str) -> None:
        """Campaign, lead until the lease is lost, then step down (fencing) and campaign again."""
        while True:
            leadership: Leadership = await self.store.campaign(
                keys.COORDINATOR_LEADER, address.encode(), LEADER_TTL_S
            )
            self.scheduler = build_scheduler(self.config)
            self._leaving.clear()
            self.epoch = leadership.epoch
            log.info("leader_elected", address=address, epoch=self.epoch)
            ticker = asyncio.create_task(self._tick())
            try:
                await leadership.lost.wait()
            finally:
                await cancel_task(ticker)
                self.epoch = 0
                with contextlib.suppress(Exception):
                    await leadership.resign()
            log.warning("leadership_lost_stepping_down", address=address)
            for stream in list(self._streams.values()):
                stream.cancel()  # workers reconnect to whoever leads now
            stepped_down = coordinator_pb2.RequestFailed(
                code=grpc.StatusCode.UNAVAILABLE.value[0], message="the coordinator stepped down"
            )
            for request_log in self.logs.values():  # their gateways resubmit them to the new leader
                if not request_log.terminal:
                    request_log.append(coordinator_pb2.RequestEvent(failed=stepped_down))
            self.logs.clear()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if self.config.enforce_slo:
                self.pump()


class CoordinatorService:
    def __init__(self, servicer: CoordinatorServicer, server: RunningServer) -> None:
        self.servicer = servicer
        self.server = server
        self.address = server.address
        self._leading = asyncio.create_task(servicer.lead(server.address))

    async def wait_until_leading(self, timeout_s: float = 30.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not self.servicer.leading:
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await cancel_task(self._leading)  # resigns: a standby can take over at once
        await self.servicer.close()
        await self.server.stop()


async def serve(
    store: ClusterStore, host: str = "127.0.0.1", port: int = 0, config: CoordinatorConfig | None = None
) -> CoordinatorService:
    servicer = CoordinatorServicer(store, config or CoordinatorConfig())
    server = await start_server(
        lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, s),
        [coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name],
        host,
        port,
    )
    log.info("coordinator_started", address=server.address, policy=servicer.config.policy)
    return CoordinatorService(servicer, server)
