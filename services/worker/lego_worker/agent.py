"""The worker's shell: its gRPC server, its registration, and its stream to the coordinator.

Batches arrive over the stream; inputs are fetched from the local data engine (which pulls remote
replicas), the batch runs in a thread, outputs are published to the data engine and their handles
reported back. One batch runs at a time: a worker is one device.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import grpc
import structlog
from lego import dataplane, keys
from lego.grpc_server import RunningServer, channel, start_server
from lego.store import ClusterStore, Registration, cancel_task, wait_for_key
from lego.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from lego.values import from_value

from lego_worker.executor import Executor

log = structlog.get_logger("lego.worker")
REGISTRATION_TTL_S = 5.0
RECONNECT_S = 0.5


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker_id: str, executor: Executor, device: str) -> None:
        self.worker_id = worker_id
        self.executor = executor
        self.device = device

    async def LoadModel(
        self, request: worker_pb2.ModelRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ModelReply:
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self.executor.pool.get, request.model)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return worker_pb2.ModelReply(model=request.model, load_s=time.perf_counter() - started)

    async def UnloadModel(
        self, request: worker_pb2.ModelRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ModelReply:
        if not self.executor.pool.unload(request.model):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model} is not loaded")
        return worker_pb2.ModelReply(model=request.model)

    async def GetStatus(
        self, request: common_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStatusReply:
        return worker_pb2.WorkerStatusReply(
            worker_id=self.worker_id,
            device=self.device,
            loaded_models=self.executor.pool.loaded(),
            batches_executed=self.executor.stats.batches,
            busy_s=self.executor.stats.busy_s,
        )


class WorkerAgent:
    def __init__(
        self,
        worker_id: str,
        store: ClusterStore,
        address: str,
        dataengine_address: str,
        executor: Executor,
        device: str,
    ) -> None:
        self.worker_id = worker_id
        self.store = store
        self.address = address
        self.dataengine_address = dataengine_address
        self.executor = executor
        self.device = device
        self.data = dataplane.DataPlane(dataengine_address)

    async def run(self) -> None:
        """Serve the coordinator forever, reconnecting (to a new leader) when the stream breaks."""
        while True:
            try:
                address = (await wait_for_key(self.store, keys.COORDINATOR_LEADER, 3600)).decode()
                await self._serve_stream(address)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any stream failure: reconnect
                log.warning("coordinator_stream_lost", worker_id=self.worker_id, error=str(error))
            await asyncio.sleep(RECONNECT_S)

    async def _serve_stream(self, coordinator_address: str) -> None:
        async with channel(coordinator_address) as chan:
            stub = coordinator_pb2_grpc.CoordinatorStub(chan)
            call = stub.WorkerStream()
            hello = coordinator_pb2.WorkerHello(
                worker_id=self.worker_id,
                address=self.address,
                dataengine_address=self.dataengine_address,
                device=self.device,
                backend="torch",
            )
            await call.write(coordinator_pb2.WorkerMessage(hello=hello))
            log.info("worker_connected", worker_id=self.worker_id, coordinator=coordinator_address)
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    return
                kind = message.WhichOneof("message")
                if kind == "batch":
                    result = await self._run_batch(message.batch)
                    await call.write(coordinator_pb2.WorkerMessage(result=result))
                elif kind == "release":
                    self.executor.states.release(message.release.request_id)

    async def _fetch(self, value: common_pb2.Value) -> Any:
        if value.WhichOneof("kind") == "tensor":
            return await self.data.get(value.tensor)
        return from_value(value)

    async def _run_batch(self, batch: coordinator_pb2.TaskBatch) -> coordinator_pb2.BatchResult:
        result = coordinator_pb2.BatchResult(batch_id=batch.batch_id)
        structlog.contextvars.bind_contextvars(batch_id=batch.batch_id)
        try:
            items = []
            for task in batch.tasks:
                names = list(task.inputs)
                values = await asyncio.gather(*(self._fetch(task.inputs[n]) for n in names))
                item = dict(zip(names, values, strict=True))
                item["state_key"] = f"{task.request_id}/{task.state_key}"
                items.append(item)
            started = time.perf_counter()
            outputs = await asyncio.to_thread(self.executor.run, batch.op, batch.model, batch.mode, items)
            result.execution_s = time.perf_counter() - started
            for task, produced in zip(batch.tasks, outputs, strict=True):
                task_result = result.results.add(task_id=task.task_id)
                for name in task.outputs:
                    tensor_id = f"{task.request_id}/{task.node_id}/{name}"
                    handle = await self.data.put(tensor_id, produced[name])
                    task_result.outputs[name].CopyFrom(handle)
        except Exception as error:
            log.exception("batch_failed", op=batch.op, model=batch.model)
            del result.results[:]
            result.error = f"{type(error).__name__}: {error}"
        finally:
            structlog.contextvars.unbind_contextvars("batch_id")
        result.loaded_models.extend(self.executor.pool.loaded())
        return result


class WorkerService:
    def __init__(self, agent: WorkerAgent, server: RunningServer, registration: Registration) -> None:
        self.agent = agent
        self.server = server
        self.registration = registration
        self.address = server.address
        self._task = asyncio.create_task(agent.run())

    async def stop(self) -> None:
        await cancel_task(self._task)
        with contextlib.suppress(Exception):
            await self.registration.close()
        await self.server.stop()


async def serve(
    store: ClusterStore,
    dataengine_address: str,
    host: str = "127.0.0.1",
    port: int = 0,
    worker_id: str = "",
    device: str = "cpu",
) -> WorkerService:
    worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
    executor = Executor(device)
    servicer = WorkerServicer(worker_id, executor, device)
    server = await start_server(
        lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, s),
        [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name],
        host,
        port,
    )
    info = worker_pb2.WorkerInfo(
        worker_id=worker_id,
        address=server.address,
        dataengine_address=dataengine_address,
        device=device,
        backend="torch",
    )
    registration = await store.register(keys.worker(worker_id), info.SerializeToString(), REGISTRATION_TTL_S)
    agent = WorkerAgent(worker_id, store, server.address, dataengine_address, executor, device)
    log.info("worker_started", worker_id=worker_id, address=server.address)
    return WorkerService(agent, server, registration)
