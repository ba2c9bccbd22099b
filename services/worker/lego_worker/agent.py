"""The worker's shell: its gRPC server, its registration, and its stream to the coordinator.

Batches arrive over the stream into a queue; one runs at a time (a worker is one device): inputs
are fetched through the host's data engine, the batch runs in a thread, outputs are published to
the data engine, and their handles are reported back with any model loads and evictions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import structlog
from lego import dataplane, keys, metrics, operators, tensors
from lego.device_cache import CacheFull
from lego.grpc_server import RunningServer, channel, start_server
from lego.model_sources import SourcePolicy
from lego.profiles import ProfileSet, default_profile_dir
from lego.store import ClusterStore, Registration, cancel_task, wait_for_key
from lego.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from lego.values import from_value

from lego_worker.backend import Backend
from lego_worker.embedding_cache import EmbeddingCache, EmbeddingCacheStats
from lego_worker.emulated_backend import LORA_FETCH_MEDIAN_S, EmulatedBackend
from lego_worker.executor import Executor
from lego_worker.lora_loads import DEFAULT_CAPACITY, LoRAStats
from lego_worker.parts import ArrivingParts, PartPublisher, receive

log = structlog.get_logger("lego.worker")
REGISTRATION_TTL_S = 5.0
RECONNECT_S = 0.5
EMULATED_DEVICE_BYTES = 80 * 10**9
DRAIN_TIMEOUT_S = 120.0
PUBLISHED_KEPT = 256  # handles of the latest outputs kept for nodes chained behind their producer
RELEASED_KEPT = 1024
RELEASED = "request released before its batch could run"


def _output_ids(batch: coordinator_pb2.TaskBatch) -> list[str]:
    return [f"{task.request_id}/{task.node_id}/{name}" for task in batch.tasks for name in task.outputs]


class RequestReleased(Exception):
    """A batch's requests were released while it waited for inputs freed with them."""


class InputNotMade(RuntimeError):
    """The batch here that was to make a chained input ended without it (failed, or refused: its
    requests were released)."""


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@dataclass
class WorkerConfig:
    worker_id: str = ""
    device: str = "cpu"
    backend: str = "torch"  # torch | emulated
    profile_dir: Path | None = None  # emulated: default profiles/h800
    time_scale: float = 1.0
    memory_bytes: int = 0  # device memory budget; 0: 80 GB emulated, 90 % of RAM on the CPU
    model_roots: str | None = None  # lego.model_sources: None reads LEGO_MODEL_ROOTS; "" allows all
    embedding_cache_bytes: int = 0  # exact text-embedding cache (lego_worker.embedding_cache); 0: off
    # seconds a LoRA fetch takes: emulated, the median of its log-normal (None: 4.4 s, a production
    # trace's); torch, at least this long (a remote LoRA store; None: as fast as the disk)
    lora_fetch_s: float | None = None
    lora_capacity: int = DEFAULT_CAPACITY  # LoRAs held at once, least recently used dropped


def build_executor(config: WorkerConfig) -> Executor:
    backend: Backend
    if config.backend == "emulated":
        profiles = ProfileSet(config.profile_dir or default_profile_dir())
        fetch_s = LORA_FETCH_MEDIAN_S if config.lora_fetch_s is None else config.lora_fetch_s
        backend = EmulatedBackend(profiles, config.time_scale, lora_fetch_median_s=fetch_s)
        budget = config.memory_bytes or EMULATED_DEVICE_BYTES
    elif config.backend == "torch":
        # imported here: torch and diffusers take seconds to import, which every `lego` command
        # that builds no torch worker (sim, workflows, emulated clusters) would pay
        from lego_worker.torch_backend import TorchBackend

        policy = SourcePolicy.from_env(config.model_roots)
        backend = TorchBackend(config.device, policy, lora_fetch_min_s=config.lora_fetch_s or 0.0)
        budget = config.memory_bytes or int(psutil.virtual_memory().total * 0.9)
    else:
        raise ValueError(f"backend must be 'torch' or 'emulated', got {config.backend!r}")
    embeddings = EmbeddingCache(config.embedding_cache_bytes) if config.embedding_cache_bytes else None
    return Executor(backend, budget, embeddings, config.lora_capacity)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, config: WorkerConfig, executor: Executor, queue: asyncio.Queue[Any]) -> None:
        self.config = config
        self.executor = executor
        self.queue = queue

    async def _model_call(self, context: grpc.aio.ServicerContext, call: Any, model: str) -> float:
        try:
            seconds: float = await asyncio.to_thread(call, model)
        except (ValueError, KeyError, FileNotFoundError) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except CacheFull as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        return seconds

    async def PrefetchModel(
        self, request: worker_pb2.ModelRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ModelReply:
        seconds = await self._model_call(context, self.executor.prefetch, request.model)
        return worker_pb2.ModelReply(model=request.model, load_s=seconds)

    async def LoadModel(
        self, request: worker_pb2.ModelRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ModelReply:
        seconds = await self._model_call(context, self.executor.load, request.model)
        return worker_pb2.ModelReply(model=request.model, load_s=seconds)

    async def UnloadModel(
        self, request: worker_pb2.ModelRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ModelReply:
        if not await asyncio.to_thread(self.executor.unload, request.model):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model} is not loaded")
        return worker_pb2.ModelReply(model=request.model)

    async def GetStatus(
        self, request: common_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStatusReply:
        metrics = self.executor.metrics
        return worker_pb2.WorkerStatusReply(
            worker_id=self.config.worker_id,
            device=self.config.device,
            backend=self.executor.backend.name,
            loaded_models=self.executor.cache.resident(),
            host_models=self.executor.backend.host_models(),
            batches_executed=metrics.batches,
            busy_s=metrics.busy_s,
            queue_length=self.queue.qsize(),
            batch_sizes=dict(metrics.batch_sizes),
            loads=metrics.loads,
            evictions=metrics.evictions,
            load_s=metrics.load_s,
            memory_used_bytes=self.executor.cache.used_bytes,
            memory_budget_bytes=self.executor.cache.budget_bytes,
            peak_memory_bytes=metrics.peak_memory_bytes,
        )


class WorkerAgent:
    def __init__(
        self,
        config: WorkerConfig,
        store: ClusterStore,
        address: str,
        dataengine_address: str,
        executor: Executor,
    ) -> None:
        self.config = config
        self.store = store
        self.address = address
        self.dataengine_address = dataengine_address
        self.executor = executor
        self.data = dataplane.DataPlane(dataengine_address)
        self.queue: asyncio.Queue[coordinator_pb2.TaskBatch] = asyncio.Queue()
        self.epoch = 0  # the newest leader term seen; batches from older leaders are refused
        self._background: set[asyncio.Task[None]] = set()
        self.draining = False
        self.left = asyncio.Event()  # the coordinator let this draining worker go (or is gone)
        self._call: Any = None
        self._write_lock = asyncio.Lock()
        self._published: OrderedDict[str, common_pb2.TensorHandle] = OrderedDict()
        self._released: OrderedDict[str, None] = OrderedDict()  # requests over, newest last
        self._input_waits: dict[asyncio.Future[list[Any]], frozenset[str]] = {}  # → their requests
        self._side_lane: set[asyncio.Task[None]] = set()  # batches running beside the queue
        # outputs of batches received here and not answered yet: a batch chained behind one of them
        # (maybe running beside it, on the side lane) waits for its handle
        self._coming: dict[str, asyncio.Future[common_pb2.TensorHandle]] = {}

    async def run(self) -> None:
        """Serve the coordinator forever, reconnecting (to a new leader) when the stream breaks."""
        while not self.left.is_set():
            try:
                address = (await wait_for_key(self.store, keys.COORDINATOR_LEADER, 3600)).decode()
                await self._serve_stream(address)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any stream failure: reconnect
                log.warning("coordinator_stream_lost", worker_id=self.config.worker_id, error=str(error))
            if self.draining:  # the coordinator is gone (it re-runs what was here): nothing to wait for
                self.left.set()
            await asyncio.sleep(RECONNECT_S)

    async def _write(self, call: Any, message: coordinator_pb2.WorkerMessage) -> None:
        async with self._write_lock:
            await call.write(message)

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Scale-down: ask the coordinator for no new work, finish what is here, wait to be let go."""
        self.draining = True
        if self._call is None:  # not connected to any coordinator: no work is held here
            self.left.set()
        else:
            with contextlib.suppress(Exception):
                await self._write(
                    self._call, coordinator_pb2.WorkerMessage(drain=coordinator_pb2.DrainWorker())
                )
        try:
            await asyncio.wait_for(self.left.wait(), timeout_s)
        except TimeoutError:
            log.warning("drain_timed_out", worker_id=self.config.worker_id, timeout_s=timeout_s)
            return False
        return True

    async def _serve_stream(self, coordinator_address: str) -> None:
        async with channel(coordinator_address) as chan:
            call = coordinator_pb2_grpc.CoordinatorStub(chan).WorkerStream()
            hello = coordinator_pb2.WorkerHello(
                worker_id=self.config.worker_id,
                address=self.address,
                dataengine_address=self.dataengine_address,
                device=self.config.device,
                backend=self.executor.backend.name,
                memory_budget_bytes=self.executor.cache.budget_bytes,
                loaded_models=self.executor.cache.resident(),
                streaming_calls=sorted(f"{op}.{mode}" for op, mode in self.executor.backend.streaming_calls),
            )
            await call.write(coordinator_pb2.WorkerMessage(hello=hello))
            log.info("worker_connected", worker_id=self.config.worker_id, coordinator=coordinator_address)
            if self.draining:  # a new leader: it must know too
                await self._write(call, coordinator_pb2.WorkerMessage(drain=coordinator_pb2.DrainWorker()))
            self._call = call
            runner = asyncio.create_task(self._run_queue(call))
            try:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        return
                    kind = message.WhichOneof("message")
                    if kind == "batch":
                        for task in message.batch.tasks:  # sent after a release: a new submission
                            self._released.pop(task.request_id, None)
                        self.prefetch_inputs(message.batch)
                        self._expect_outputs(message.batch)
                        if message.batch.side_lane:
                            beside = asyncio.create_task(self._answer(call, message.batch))
                            self._side_lane.add(beside)
                            beside.add_done_callback(self._side_lane.discard)
                        else:
                            self.queue.put_nowait(message.batch)
                    elif kind == "release":
                        self._release(message.release.request_id)
                    elif kind == "preload":
                        task = asyncio.create_task(self._preload(message.preload.model))
                        self._background.add(task)
                        task.add_done_callback(self._background.discard)
                    elif kind == "leave":
                        log.info("worker_drained", worker_id=self.config.worker_id)
                        self.left.set()
                        await call.done_writing()
                        return
            finally:
                self._call = None
                await cancel_task(runner)
                for beside in list(self._side_lane):
                    await cancel_task(beside)
                self._drop_queued()
                for coming in self._coming.values():
                    coming.cancel()
                self._coming.clear()

    def prefetch_inputs(self, batch: coordinator_pb2.TaskBatch) -> None:
        """Start pulling the batch's remote inputs now, while earlier batches still run here."""
        for task in batch.tasks:
            for value in task.inputs.values():
                handle = value.tensor if value.WhichOneof("kind") == "tensor" else None
                if handle is not None and any(loc != self.dataengine_address for loc in handle.locations):
                    work = asyncio.create_task(self.data.prefetch(handle))
                    self._background.add(work)
                    work.add_done_callback(self._background.discard)

    async def _preload(self, model: str) -> None:
        try:
            await asyncio.to_thread(self.executor.load, model)
        except Exception as error:  # noqa: BLE001 - a preload is a hint; the batch will load it anyway
            log.warning("preload_failed", model=model, error=str(error))

    async def _run_queue(self, call: Any) -> None:
        while True:
            await self._answer(call, await self.queue.get())

    async def _answer(self, call: Any, batch: coordinator_pb2.TaskBatch) -> None:
        """Run a batch (from the queue, or beside it) and send its result."""
        try:
            if batch.epoch < self.epoch:
                error = f"stale leader: epoch {batch.epoch} < {self.epoch}"
                result = coordinator_pb2.BatchResult(batch_id=batch.batch_id, error=error)
            elif {task.request_id for task in batch.tasks} <= self._released.keys():
                self.epoch = batch.epoch
                result = coordinator_pb2.BatchResult(batch_id=batch.batch_id, error=RELEASED)
            else:
                self.epoch = batch.epoch
                result = await self._run_batch(batch)
        finally:
            for tensor_id in _output_ids(batch):  # not published (failed, refused): none will be
                coming = self._coming.pop(tensor_id, None)
                if coming is not None:
                    coming.cancel()
        await self._write(call, coordinator_pb2.WorkerMessage(result=result))

    def _expect_outputs(self, batch: coordinator_pb2.TaskBatch) -> None:
        loop = asyncio.get_running_loop()
        for tensor_id in _output_ids(batch):
            self._coming.setdefault(tensor_id, loop.create_future())

    def _drop_queued(self) -> None:
        """The stream broke: the coordinator re-runs whatever it had sent here (or is gone, and its
        successor does), so the batches still queued are dropped; one chained behind the batch
        the break interrupted would wait for outputs never published."""
        while not self.queue.empty():
            self.queue.get_nowait()

    def _release(self, request_id: str) -> None:
        """A request is over: its scheduler state goes, and batches of it still queued here, or
        waiting for inputs (freed with it), are answered at once instead of waiting for them."""
        self.executor.release(request_id)
        self._released[request_id] = None
        while len(self._released) > RELEASED_KEPT:
            self._released.popitem(last=False)
        for fetch, requests in list(self._input_waits.items()):
            if requests <= self._released.keys():
                fetch.cancel()

    async def _inputs(
        self,
        task: coordinator_pb2.Task,
        part_inputs: tuple[str, ...],
        receiving: list[asyncio.Task[None]],
        requests: frozenset[str],
    ) -> dict[str, Any]:
        """A task's inputs: values, inline scalars and tensors the mapped arena holds at once; a
        deferred input in `part_inputs` still being produced as parts arriving during the call (its
        receiver added to `receiving`); the rest (not mapped yet, not arrived, on another host)
        awaited together."""
        ready: dict[str, Any] = {}
        waiting: dict[str, common_pb2.TensorHandle] = {}
        for name, value in task.inputs.items():
            if value.WhichOneof("kind") != "tensor":
                ready[name] = from_value(value)
                continue
            handle = value.tensor
            if tensors.is_pending(handle):  # chained behind its producer here: maybe made already
                handle = self._published.get(handle.tensor_id, handle)
            if tensors.is_pending(handle) and handle.tensor_id in self._coming:  # being made here
                handle = await self._made_here(handle.tensor_id)
            if (array := self.data.local(handle)) is not None:
                ready[name] = array
            elif name in part_inputs and tensors.is_pending(handle):
                ready[name] = ArrivingParts(handle.tensor_id)
                receiving.append(asyncio.create_task(receive(self.data, handle, ready[name])))
            else:
                waiting[name] = handle
        if waiting:
            if requests <= self._released.keys():  # released while it waited for an input made here:
                raise RequestReleased(RELEASED)  # what it would fetch was freed with it
            fetch = asyncio.gather(*(self.data.get(handle) for handle in waiting.values()))
            self._input_waits[fetch] = requests
            try:
                arrays = await fetch
            except asyncio.CancelledError:
                # `_release` cancelled the fetch, or this batch is being cancelled. Test the release
                # itself: a cancelled gather ends with CancelledError as its exception and reports
                # `cancelled()` False, and re-raising ended the queue's runner without an answer.
                if _being_cancelled() or not requests <= self._released.keys():
                    raise
                raise RequestReleased(RELEASED) from None
            finally:
                del self._input_waits[fetch]
            ready.update(zip(waiting, arrays, strict=True))
        return {name: ready[name] for name in task.inputs}

    async def _made_here(self, tensor_id: str) -> common_pb2.TensorHandle:
        """The handle of an output a batch on this worker (queued or beside the queue) is making."""
        try:
            return await asyncio.shield(self._coming[tensor_id])
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            raise InputNotMade(f"input {tensor_id} was not made: its batch here failed") from None

    def _remember(self, handle: common_pb2.TensorHandle) -> None:
        """Handles of this worker's latest outputs: a node chained behind their producer here gets
        only their ids (lego_coordinator.scheduler `_chain`), and scalars are in no data engine."""
        self._published[handle.tensor_id] = handle
        coming = self._coming.pop(handle.tensor_id, None)
        if coming is not None and not coming.done():
            coming.set_result(handle)
        while len(self._published) > PUBLISHED_KEPT:
            self._published.popitem(last=False)

    def _part_inputs(self, batch: coordinator_pb2.TaskBatch) -> tuple[str, ...]:
        if not self.executor.backend.streams_parts:
            return ()
        return operators.signature(batch.op, batch.mode).parts

    def _part_publisher(
        self, batch: coordinator_pb2.TaskBatch, tasks: list[coordinator_pb2.Task]
    ) -> PartPublisher | None:
        """For a batch whose mode streams outputs on a backend that does: where its tasks' parts go."""
        if not self.executor.backend.streams_parts:
            return None
        streamed = operators.signature(batch.op, batch.mode).streamed
        if not streamed:
            return None
        return PartPublisher(
            self.data,
            [{name: f"{task.request_id}/{task.node_id}/{name}" for name in streamed} for task in tasks],
        )

    async def _run_batch(self, batch: coordinator_pb2.TaskBatch) -> coordinator_pb2.BatchResult:
        result = coordinator_pb2.BatchResult(batch_id=batch.batch_id)
        request_ids = sorted({task.request_id for task in batch.tasks})
        # request_id end to end: a batch of one request's nodes logs it; a shared batch lists them all
        bound = {"batch_id": batch.batch_id, "request_ids": request_ids}
        if len(request_ids) == 1:
            bound["request_id"] = request_ids[0]
        structlog.contextvars.bind_contextvars(**bound)
        receiving: list[asyncio.Task[None]] = []
        publisher: PartPublisher | None = None
        items: list[dict[str, Any]] = []
        try:
            tasks = await self._gather_inputs(batch, receiving, items)
            if batch.side_lane:
                outputs, result.execution_s = await self.executor.run_beside(
                    batch.op, batch.model, batch.mode, items
                )
                unpatched = False
            else:
                patches = tuple((p.source, p.scale) for p in batch.patches)
                optional = all(task.patches_optional for task in tasks)
                cached, loras = self._cache_stats(), dataclasses.replace(self.executor.loras.stats)
                publisher = self._part_publisher(batch, tasks)
                outputs = await self.executor.run_async(
                    batch.op, batch.model, batch.mode, items, patches, publisher, optional
                )
                self._count_cache(cached)
                self._count_loras(loras)
                result.execution_s = self.executor.last_execution_s
                unpatched = self.executor.last_unpatched
            named = [
                (task.task_id, name, f"{task.request_id}/{task.node_id}/{name}", produced[name])
                for task, produced in zip(tasks, outputs, strict=True)
                for name in task.outputs
            ]
            stored = [(tensor_id, array) for _, _, tensor_id, array in named if np.ndim(array) > 0]
            handles = iter(await self.data.put_many(stored))
            results = {
                task.task_id: result.results.add(task_id=task.task_id, unpatched=unpatched) for task in tasks
            }
            for task, item, produced in zip(tasks, items, outputs, strict=True):
                if task.signature_of:
                    signature = self.executor.backend.signature(item, produced[task.signature_of])
                    results[task.task_id].signature.extend(signature)
            for task_id, name, tensor_id, array in named:
                scalar = np.ndim(array) == 0
                handle = tensors.inline_handle(tensor_id, array) if scalar else next(handles)
                results[task_id].outputs[name].CopyFrom(handle)
                self._remember(handle)
            self._count_batch(batch, result.execution_s)
        except Exception as error:
            log.exception("batch_failed", op=batch.op, model=batch.model)
            del result.results[:]
            result.error = f"{type(error).__name__}: {error}"
        finally:
            await self._finish_parts(publisher, receiving, items)
            structlog.contextvars.unbind_contextvars(*bound)
        worker_id = self.config.worker_id
        # the device's model events go with the queue's batches: a side-lane batch ending during a
        # queued batch's load would carry that load away, and the coordinator would learn it as overhead
        for event in [] if batch.side_lane else self.executor.drain_events():
            result.model_events.add(model=event.model, kind=event.kind, seconds=event.seconds)
            metrics.MODEL_EVENTS.labels(worker_id=worker_id, model=event.model, kind=event.kind).inc()
        result.loaded_models.extend(self.executor.cache.resident())
        result.loras.extend(self.executor.loras.held())
        return result

    async def _gather_inputs(
        self,
        batch: coordinator_pb2.TaskBatch,
        receiving: list[asyncio.Task[None]],
        items: list[dict[str, Any]],
    ) -> list[coordinator_pb2.Task]:
        """The batch's tasks that still run, their inputs appended to `items`. A task whose request
        was released (before, or while it waited for inputs freed with it) is left out: a batch
        chained behind several requests' producers here still runs for the others. None left:
        RequestReleased."""
        part_inputs = self._part_inputs(batch)
        tasks = []
        for task in batch.tasks:
            if task.request_id in self._released:
                continue
            try:
                item = await self._inputs(task, part_inputs, receiving, frozenset({task.request_id}))
            except (RequestReleased, InputNotMade):
                if task.request_id in self._released:
                    continue
                raise
            item["state_key"] = f"{task.request_id}/{task.state_key}"
            items.append(item)
            tasks.append(task)
        if not tasks:
            raise RequestReleased(RELEASED)
        return tasks

    async def _finish_parts(
        self,
        publisher: PartPublisher | None,
        receiving: list[asyncio.Task[None]],
        items: list[dict[str, Any]],
    ) -> None:
        """After a batch: its last parts sent, its part receivers stopped, both counted."""
        counter = metrics.PARTIAL_OUTPUTS
        worker_id = self.config.worker_id
        if publisher is not None:
            await publisher.close()
            counter.labels(worker_id=worker_id, direction="published").inc(publisher.published)
        for receiver in receiving:
            await cancel_task(receiver)
        used = sum(v.parts_used for item in items for v in item.values() if isinstance(v, ArrivingParts))
        counter.labels(worker_id=worker_id, direction="consumed").inc(used)

    def _cache_stats(self) -> EmbeddingCacheStats | None:
        embeddings = self.executor.embeddings
        return None if embeddings is None else dataclasses.replace(embeddings.stats)

    def _count_cache(self, before: EmbeddingCacheStats | None) -> None:
        embeddings = self.executor.embeddings
        if embeddings is None or before is None:
            return
        worker_id, now = self.config.worker_id, embeddings.stats
        metrics.EMBEDDING_CACHE_HITS.labels(worker_id=worker_id).inc(now.hits - before.hits)
        metrics.EMBEDDING_CACHE_MISSES.labels(worker_id=worker_id).inc(now.misses - before.misses)
        metrics.EMBEDDING_CACHE_SAVED.labels(worker_id=worker_id).inc(now.saved_s - before.saved_s)
        metrics.EMBEDDING_CACHE_BYTES.labels(worker_id=worker_id).set(embeddings.used_bytes)

    def _count_loras(self, before: LoRAStats) -> None:
        worker_id, now = self.config.worker_id, self.executor.loras.stats
        metrics.LORA_FETCHES.labels(worker_id=worker_id).inc(now.fetches - before.fetches)
        metrics.LORA_WAITS.labels(worker_id=worker_id).inc(now.waits - before.waits)
        metrics.UNPATCHED_BATCHES.labels(worker_id=worker_id).inc(now.unpatched - before.unpatched)

    def _count_batch(self, batch: coordinator_pb2.TaskBatch, execution_s: float) -> None:
        worker_id = self.config.worker_id
        metrics.WORKER_BATCHES.labels(worker_id=worker_id, model=batch.model).inc()
        metrics.WORKER_BATCH_SIZE.labels(worker_id=worker_id).observe(len(batch.tasks))
        metrics.WORKER_BUSY.labels(worker_id=worker_id).inc(execution_s)
        log.debug("batch_done", op=batch.op, model=batch.model, mode=batch.mode, size=len(batch.tasks))


class WorkerService:
    def __init__(self, agent: WorkerAgent, server: RunningServer, registration: Registration) -> None:
        self.agent = agent
        self.server = server
        self.registration = registration
        self.address = server.address
        self._task = asyncio.create_task(agent.run())

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Graceful scale-down: no new work, finish the queue, unload every model, leave the store."""
        worker_id = self.agent.config.worker_id
        metrics.WORKER_DRAINING.labels(worker_id=worker_id).set(1)
        log.info("worker_draining", worker_id=worker_id)
        drained = await self.agent.drain(timeout_s)
        executor = self.agent.executor
        for model in executor.cache.resident():
            with contextlib.suppress(Exception):
                await asyncio.to_thread(executor.unload, model)
        with contextlib.suppress(Exception):
            await self.registration.close()
        log.info("worker_left", worker_id=worker_id, drained=drained)
        return drained

    async def stop(self) -> None:
        await cancel_task(self._task)
        self.agent.executor.loras.close()
        self.agent.data.close()
        with contextlib.suppress(Exception):
            await self.registration.close()
        await self.server.stop()


async def serve(
    store: ClusterStore,
    dataengine_address: str,
    host: str = "127.0.0.1",
    port: int = 0,
    config: WorkerConfig | None = None,
) -> WorkerService:
    config = config or WorkerConfig()
    config.worker_id = config.worker_id or f"worker-{uuid.uuid4().hex[:8]}"
    executor = build_executor(config)
    queue: asyncio.Queue[coordinator_pb2.TaskBatch] = asyncio.Queue()
    servicer = WorkerServicer(config, executor, queue)
    server = await start_server(
        lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, s),
        [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name],
        host,
        port,
    )
    info = worker_pb2.WorkerInfo(
        worker_id=config.worker_id,
        address=server.address,
        dataengine_address=dataengine_address,
        device=config.device,
        backend=config.backend,
    )
    registration = await store.register(
        keys.worker(config.worker_id), info.SerializeToString(), REGISTRATION_TTL_S
    )
    agent = WorkerAgent(config, store, server.address, dataengine_address, executor)
    agent.queue = queue
    log.info("worker_started", worker_id=config.worker_id, address=server.address, backend=config.backend)
    return WorkerService(agent, server, registration)
