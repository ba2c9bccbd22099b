"""Running a whole cluster: embedded (every service in this process, in-memory store) or as local
processes (one per service) sharing an etcd store."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

from lego.builtin_workflows import builtin_workflows
from lego.grpc_server import channel
from lego.service_main import Stoppable
from lego.store import ClusterStore, MemoryStore
from lego.v1 import common_pb2, compiler_pb2, compiler_pb2_grpc, coordinator_pb2_grpc
from lego_compiler import service as compiler
from lego_coordinator import service as coordinator
from lego_coordinator.service import CoordinatorConfig
from lego_dataengine import service as dataengine
from lego_gateway import service as gateway
from lego_worker import agent as worker

STARTUP_TIMEOUT_S = 120.0


async def register_builtin_workflows(compiler_address: str) -> list[str]:
    async with channel(compiler_address) as chan:
        stub = compiler_pb2_grpc.CompilerStub(chan)
        names = []
        for spec in builtin_workflows():
            reply: compiler_pb2.RegisterWorkflowReply = await stub.RegisterWorkflow(spec)
            names.append(reply.name)
        return names


async def wait_for_workers(
    coordinator_address: str, count: int, timeout_s: float = STARTUP_TIMEOUT_S
) -> None:
    async with channel(coordinator_address) as chan:
        stub = coordinator_pb2_grpc.CoordinatorStub(chan)
        deadline = time.monotonic() + timeout_s
        while True:
            status = await stub.ClusterStatus(common_pb2.Empty())
            if len(status.workers) >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(status.workers)} of {count} workers joined in {timeout_s:.0f}s"
                )
            await asyncio.sleep(0.05)


@dataclass
class EmbeddedCluster:
    """All five services in this process on loopback ports, sharing an in-memory store."""

    workers: int = 1
    grpc_port: int = 0
    http_port: int | None = None
    coordinator_config: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    worker: worker.WorkerConfig = field(default_factory=worker.WorkerConfig)
    store: ClusterStore = field(default_factory=MemoryStore)
    services: list[Stoppable] = field(default_factory=list)
    gateway_address: str = ""
    http_address: str = ""
    coordinator_address: str = ""
    compiler_address: str = ""

    async def start(self) -> EmbeddedCluster:
        engine = await dataengine.serve(self.store)
        self.services.append(engine)
        compiler_service = await compiler.serve(self.store)
        self.services.append(compiler_service)
        self.compiler_address = compiler_service.address
        coordinator_service = await coordinator.serve(self.store, config=self.coordinator_config)
        await coordinator_service.wait_until_leading()
        self.services.append(coordinator_service)
        self.coordinator_address = coordinator_service.address
        for index in range(self.workers):
            config = dataclasses.replace(self.worker, worker_id=f"worker-{index}")
            self.services.append(await worker.serve(self.store, engine.address, config=config))
        front = await gateway.serve(self.store, port=self.grpc_port, http_port=self.http_port)
        self.services.append(front)
        self.gateway_address, self.http_address = front.address, front.http_address
        await register_builtin_workflows(self.compiler_address)
        await wait_for_workers(self.coordinator_address, self.workers)
        return self

    async def stop(self) -> None:
        for service in reversed(self.services):
            await service.stop()
        self.services.clear()
        await self.store.close()

    async def __aenter__(self) -> EmbeddedCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    address: str


def _read_address(process: subprocess.Popen[bytes], name: str, timeout_s: float) -> str:
    """Services print one JSON line with their address once they serve."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    os.set_blocking(process.stdout.fileno(), False)
    buffer = b""
    while time.monotonic() < deadline:
        chunk = process.stdout.read()
        if chunk:
            buffer += chunk
            if b"\n" in buffer:
                line = buffer.split(b"\n", 1)[0]
                return str(json.loads(line)["address"])
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode} before serving")
        time.sleep(0.05)
    raise TimeoutError(f"{name} did not start within {timeout_s:.0f}s")


class ProcessCluster:
    """Each service a separate OS process, coordinated through etcd."""

    def __init__(
        self,
        store_url: str,
        workers: int = 1,
        grpc_port: int = 0,
        http_port: int | None = None,
        log_file: IO[Any] | None = None,
        worker_args: tuple[str, ...] = (),
        coordinator_args: tuple[str, ...] = (),
        coordinators: int = 1,
    ) -> None:
        self.coordinator_args = coordinator_args  # e.g. ("--policy", "static")
        self.coordinators = coordinators  # more than one: standbys take over when the leader dies
        self.worker_args = worker_args  # e.g. ("--backend", "emulated", "--time-scale", "10")
        self.store_url = store_url
        self.workers = workers
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.log_file = log_file
        self.processes: list[ServiceProcess] = []
        self.gateway_address = ""

    def _spawn(self, name: str, module: str, *args: str) -> ServiceProcess:
        command = [sys.executable, "-m", module, "--store", self.store_url, *args]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log_file or sys.stderr)
        entry = ServiceProcess(name, process, "")
        self.processes.append(entry)
        entry.address = _read_address(process, name, STARTUP_TIMEOUT_S)
        return entry

    def start(self) -> ProcessCluster:
        try:
            engine = self._spawn("dataengine", "lego_dataengine")
            compiler_process = self._spawn("compiler", "lego_compiler")
            coordinator_process = self._spawn("coordinator", "lego_coordinator", *self.coordinator_args)
            for index in range(1, self.coordinators):
                self._spawn(f"coordinator-{index}", "lego_coordinator", *self.coordinator_args)
            for index in range(self.workers):
                self._spawn(
                    f"worker-{index}",
                    "lego_worker",
                    "--dataengine",
                    engine.address,
                    "--worker-id",
                    f"worker-{index}",
                    *self.worker_args,
                )
            gateway_args = ["--port", str(self.grpc_port)]
            if self.http_port is not None:
                gateway_args += ["--http-port", str(self.http_port)]
            self.gateway_address = self._spawn("gateway", "lego_gateway", *gateway_args).address
            asyncio.run(self._prepare(compiler_process.address, coordinator_process.address))
        except BaseException:
            self.stop()
            raise
        return self

    async def _prepare(self, compiler_address: str, coordinator_address: str) -> None:
        await register_builtin_workflows(compiler_address)
        await wait_for_workers(coordinator_address, self.workers)

    def stop(self, timeout_s: float = 10.0) -> None:
        for entry in reversed(self.processes):
            if entry.process.poll() is None:
                entry.process.send_signal(signal.SIGTERM)
        for entry in reversed(self.processes):
            try:
                entry.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                entry.process.kill()
                entry.process.wait()
        self.processes.clear()

    def pids(self) -> dict[str, int]:
        return {entry.name: entry.process.pid for entry in self.processes}
