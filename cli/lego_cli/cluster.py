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
    gateway: gateway.GatewayOptions = field(default_factory=gateway.GatewayOptions)
    store: ClusterStore = field(default_factory=MemoryStore)
    services: list[Stoppable] = field(default_factory=list)
    gateway_address: str = ""
    http_address: str = ""
    coordinator_address: str = ""
    compiler_address: str = ""

    async def start(self) -> EmbeddedCluster:
        try:
            return await self._start()
        except BaseException:
            await self.stop()  # what did start, stops: nothing is left bound or running
            raise

    async def _start(self) -> EmbeddedCluster:
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
        options = dataclasses.replace(self.gateway, port=self.grpc_port, http_port=self.http_port)
        front = await gateway.serve(self.store, options)
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
    metrics: str = ""  # host:port of its Prometheus /metrics, when served


def _read_address(process: subprocess.Popen[bytes], name: str, timeout_s: float) -> dict[str, str]:
    """Services print one JSON line with their address (and metrics address) once they serve."""
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
                return {str(k): str(v) for k, v in json.loads(line).items()}
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
        metrics: bool = False,
        gateway_args: tuple[str, ...] = (),
    ) -> None:
        self.gateway_args = gateway_args  # e.g. ("--api-keys-file", "keys.txt")
        self.metrics = metrics  # every service serves Prometheus /metrics on a free port
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
        self.dataengine_address = ""
        self.draining: list[ServiceProcess] = []  # workers sent SIGTERM: they drain, then exit
        self._next_worker = 0

    def _spawn(self, name: str, module: str, *args: str) -> ServiceProcess:
        command = [sys.executable, "-m", module, "--store", self.store_url, *args]
        if self.metrics:
            command += ["--metrics-port", "0"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log_file or sys.stderr)
        entry = ServiceProcess(name, process, "")
        self.processes.append(entry)
        line = _read_address(process, name, STARTUP_TIMEOUT_S)
        entry.address, entry.metrics = line["address"], line.get("metrics", "")
        return entry

    def start(self) -> ProcessCluster:
        try:
            engine = self._spawn("dataengine", "lego_dataengine")
            self.dataengine_address = engine.address
            compiler_process = self._spawn("compiler", "lego_compiler")
            coordinator_process = self._spawn("coordinator", "lego_coordinator", *self.coordinator_args)
            for index in range(1, self.coordinators):
                self._spawn(f"coordinator-{index}", "lego_coordinator", *self.coordinator_args)
            for _ in range(self.workers):
                self._spawn_worker()
            gateway_args = ["--port", str(self.grpc_port), *self.gateway_args]
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

    def _spawn_worker(self) -> ServiceProcess:
        name = f"worker-{self._next_worker}"
        self._next_worker += 1
        args = ("--dataengine", self.dataengine_address, "--worker-id", name, *self.worker_args)
        return self._spawn(name, "lego_worker", *args)

    def worker_processes(self) -> list[ServiceProcess]:
        """Serving workers, oldest first (draining ones excluded)."""
        return [p for p in self.processes if p.name.startswith("worker-") and p not in self.draining]

    def scale_workers(self, count: int) -> None:
        """Start workers up to `count`, or drain the newest ones down to it (SIGTERM: each takes no
        new work, finishes what it holds, unloads its models, leaves the store, then exits)."""
        workers = self.worker_processes()
        for _ in range(count - len(workers)):
            self._spawn_worker()
        for entry in workers[max(0, count) :]:
            entry.process.send_signal(signal.SIGTERM)
            self.draining.append(entry)
        self.workers = max(0, count)

    def reap(self) -> list[str]:
        """Forget drained workers that have exited; the names of those that exited with an error."""
        failed = []
        for entry in [e for e in self.draining if e.process.poll() is not None]:
            self.draining.remove(entry)
            self.processes.remove(entry)
            if entry.process.returncode != 0:
                failed.append(entry.name)
        return failed

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
