"""The coordinator with real processes and a real etcd: a worker killed mid-request, the leader killed,
and a burst far above capacity."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego.client import GatewayClient
from lego.grpc_server import channel
from lego.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from lego.values import to_values
from lego_cli.cluster import ProcessCluster

from tests.conftest import EtcdProcess
from tests.pipeline_reference import decode_png

pytestmark = pytest.mark.slow


def start_cluster(etcd: EtcdProcess, tmp_path: Path, **kwargs) -> ProcessCluster:  # type: ignore[no-untyped-def]
    log = (tmp_path / "cluster.log").open("wb")
    return ProcessCluster(etcd.url, log_file=log, **kwargs).start()


def pid_of(cluster: ProcessCluster, name: str) -> int:
    return next(p.process.pid for p in cluster.processes if p.name == name)


class Background:
    """A blocking generate call on a thread, so the test can inject a fault meanwhile."""

    def __init__(self, gateway: str, **inputs: object) -> None:
        self.reply: gateway_pb2.GenerateReply | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(gateway, inputs), daemon=True)
        self._thread.start()

    def _run(self, gateway: str, inputs: dict) -> None:  # type: ignore[type-arg]
        try:
            with GatewayClient(gateway, timeout_s=120) as client:
                self.reply = client.generate(TINY_SD15_TXT2IMG, inputs)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error

    def wait(self, timeout_s: float) -> gateway_pb2.GenerateReply:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the request hung"
        assert self.error is None, self.error
        assert self.reply is not None
        return self.reply


def test_a_worker_killed_mid_request_does_not_lose_the_request(etcd: EtcdProcess, tmp_path: Path) -> None:
    cluster = start_cluster(etcd, tmp_path, workers=2)
    try:
        # two idle workers: each step's CFG branches run on both, so the victim is in the request's path
        request = Background(cluster.gateway_address, prompt="survive", steps=150, seed=3)
        time.sleep(1.5)
        assert request.reply is None, "the request finished before the fault; make it longer"
        os.kill(pid_of(cluster, "worker-1"), signal.SIGKILL)
        reply = request.wait(120)
        assert decode_png(reply.png).shape == (128, 128, 3)
        assert reply.nodes_executed == 3 * 151 + 4
        with GatewayClient(cluster.gateway_address) as client:  # and the cluster keeps serving
            assert client.generate(TINY_SD15_TXT2IMG, {"prompt": "after", "steps": 2}).png
    finally:
        cluster.stop()


def test_the_standby_takes_over_when_the_leader_is_killed(etcd: EtcdProcess, tmp_path: Path) -> None:
    cluster = start_cluster(etcd, tmp_path, workers=1, coordinators=2)
    try:
        request = Background(cluster.gateway_address, prompt="in flight", steps=120, seed=5)
        time.sleep(1.0)
        assert request.reply is None
        killed_at = time.monotonic()
        os.kill(pid_of(cluster, "coordinator"), signal.SIGKILL)
        with GatewayClient(cluster.gateway_address, timeout_s=60) as client:
            fresh = client.generate(TINY_SD15_TXT2IMG, {"prompt": "new leader", "steps": 2})
        served_after = time.monotonic() - killed_at
        assert fresh.png and served_after < 10.0  # the lease (5 s) expires, the standby wins, serves
        reply = request.wait(120)  # the gateway resubmitted it to the new leader
        assert reply.nodes_executed == 3 * 121 + 4
    finally:
        cluster.stop()


async def _burst(gateway: str, count: int) -> list[tuple[str, float, float]]:
    async with channel(gateway) as chan:
        stub = gateway_pb2_grpc.GatewayStub(chan)

        async def one(index: int) -> tuple[str, float, float]:
            started = time.perf_counter()
            request = gateway_pb2.GenerateRequest(
                workflow=TINY_SD15_TXT2IMG, inputs=to_values({"prompt": f"burst {index}", "steps": 4})
            )
            try:
                reply = await stub.Generate(request, timeout=60)
                return "ok", reply.latency_s, reply.slo_s
            except grpc.aio.AioRpcError as error:
                return error.code().name, time.perf_counter() - started, 0.0

        return await asyncio.gather(*(one(i) for i in range(count)))


async def _warm(cluster: ProcessCluster) -> None:
    workers = [p.address for p in cluster.processes if p.name.startswith("worker")]
    for address in workers:
        async with channel(address) as chan:
            stub = worker_pb2_grpc.WorkerStub(chan)
            for component in ("text_encoder", "unet", "vae", "scheduler"):
                await stub.LoadModel(worker_pb2.ModelRequest(model=f"tiny-sd15:{component}"))


def test_a_burst_far_above_capacity_gets_fast_429s_and_the_admitted_keep_their_slo(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    cluster = start_cluster(
        etcd,
        tmp_path,
        workers=2,
        worker_args=(
            "--backend",
            "emulated",
            "--time-scale",
            "0.1",
        ),  # slow GPUs, so the control plane's overhead is small beside them: at 0.25 a request
        # was ~12 batches of 40 ms GPU time, and on a CPU-starved 2-core machine the overhead
        # the coordinator had learned from three requests fell behind (1 of 8 admitted in time)
        coordinator_args=("--enforce-slo",),
    )
    try:
        asyncio.run(_warm(cluster))
        # calibrate the cost model's overhead: the first three requests' SLOs come from the profiles'
        # priors and all miss; with only those learned, a third admitted request of the burst
        # sometimes missed its SLO by a few ms (a near tie on a loaded 2-core machine)
        for _ in range(2):
            asyncio.run(_burst(cluster.gateway_address, 3))
        outcomes = asyncio.run(_burst(cluster.gateway_address, 40))
        rejected = [latency for outcome, latency, _ in outcomes if outcome == "RESOURCE_EXHAUSTED"]
        served = [(latency, slo) for outcome, latency, slo in outcomes if outcome == "ok"]
        assert rejected and served, outcomes
        assert max(rejected) < 0.5  # rejected at admission, not after queueing
        assert not [o for o in outcomes if o[0] not in ("ok", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")]
        admitted = len(outcomes) - len(rejected)
        within = sum(latency <= slo for latency, slo in served) / admitted  # drops count as misses
        assert within >= 0.9, outcomes
        # after the burst the cluster serves normally
        again = asyncio.run(_burst(cluster.gateway_address, 1))
        assert again[0][0] == "ok"
    finally:
        cluster.stop()
