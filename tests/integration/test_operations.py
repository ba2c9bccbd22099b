"""Operations on a real process cluster: scaling workers up and down under load with no failed
request (graceful drain), Prometheus /metrics on every service, JSON logs carrying request_id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego.client import GatewayClient
from lego_cli.cluster import ProcessCluster

from tests.conftest import EtcdProcess, free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


class Load:
    """Clients sending requests back to back until stopped; every failure is kept."""

    def __init__(self, gateway: str, clients: int = 2, steps: int = 8) -> None:
        self.done = 0
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(gateway, steps, index), daemon=True)
            for index in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, gateway: str, steps: int, index: int) -> None:
        with GatewayClient(gateway, timeout_s=120) as client:
            seed = index * 1000
            while not self._stop.is_set():
                seed += 1
                try:
                    client.generate(TINY_SD15_TXT2IMG, {"prompt": "load", "steps": steps, "seed": seed})
                    with self._lock:
                        self.done += 1
                except BaseException as error:  # noqa: BLE001 - reported by the test
                    self.failures.append(error)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(180)


def scrape(address: str) -> dict[str, float]:
    """`name{labels}` → value, from a Prometheus text exposition."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k == prefix or k.startswith(prefix + "{"))


def test_metrics_on_every_service_and_request_id_in_every_log(etcd: EtcdProcess, tmp_path: Path) -> None:
    log_path = tmp_path / "cluster.log"
    with log_path.open("wb") as log:
        cluster = ProcessCluster(
            etcd.url, workers=1, log_file=log, metrics=True, worker_args=("--log-level", "debug")
        ).start()
        try:
            with GatewayClient(cluster.gateway_address) as client:
                reply = client.generate(TINY_SD15_TXT2IMG, {"prompt": "observe", "steps": 2})
                client.generate(TINY_SD15_TXT2IMG, {"prompt": "observe again", "steps": 2})
            by_name = {p.name: scrape(p.metrics) for p in cluster.processes}
        finally:
            cluster.stop()
    gateway, coordinator = by_name["gateway"], by_name["coordinator"]
    worker, engine, compiler = by_name["worker-0"], by_name["dataengine"], by_name["compiler"]
    for name, samples in by_name.items():  # the request rate of each service (a worker calls out)
        assert name == "worker-0" or total(samples, "lego_grpc_requests_total") > 0, name
    assert gateway['lego_requests_total{outcome="ok"}'] == 2
    assert gateway["lego_request_latency_seconds_count"] == 2
    assert coordinator["lego_admissions_total"] == 2
    assert coordinator["lego_admission_rejections_total"] == 0
    assert total(coordinator, "lego_slo_requests_total") == 2
    assert 0 <= coordinator["lego_slo_attainment"] <= 1
    assert coordinator["lego_queue_depth_total"] == 0  # all done
    assert any(name.startswith('lego_queue_depth{model="tiny-sd15:') for name in coordinator), coordinator
    assert total(coordinator, "lego_batch_size_count") > 0
    assert worker['lego_worker_batches_total{model="tiny-sd15:unet",worker_id="worker-0"}'] > 0
    assert worker['lego_model_events_total{kind="load",model="tiny-sd15:unet",worker_id="worker-0"}'] == 1
    assert engine['lego_tensor_bytes_total{direction="stored"}'] > 0
    assert compiler['lego_service_info{service="compiler"}'] == 1
    # JSON logs: the gateway, the coordinator and the worker each log the request's id
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == reply.request_id]
    events = {line["event"] for line in mine}
    assert {"request_answered", "request_admitted", "request_done", "batch_done"} <= events
    assert all("timestamp" in line and "level" in line for line in mine)


def test_scale_workers_up_and_down_under_load_fails_no_request(etcd: EtcdProcess, tmp_path: Path) -> None:
    """`lego up` as a process, `scripts/scale-workers local N` from outside: 1 → 3 → 1 workers while
    clients keep sending requests; the two drained workers leave and no request fails."""
    port = free_port()
    log_path = tmp_path / "up.log"
    lego = str(Path(sys.executable).parent / "lego")
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [
                lego,
                "--log-level",
                "info",
                "up",
                "--store",
                etcd.url,
                "--workers",
                "1",
                "--grpc-port",
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            assert up.stdout is not None
            announced = json.loads(up.stdout.readline())
            load = Load(announced["gateway"])
            try:
                scale = [str(ROOT / "scripts" / "scale-workers"), "local"]
                env = {**os.environ, "LEGO_STORE": etcd.url}
                grown = subprocess.run([*scale, "3"], env=env, capture_output=True, text=True, timeout=180)
                assert grown.returncode == 0, grown.stderr
                assert json.loads(grown.stdout.splitlines()[-1])["workers"] == 3
                time.sleep(2.0)  # all three take work
                shrunk = subprocess.run([*scale, "1"], env=env, capture_output=True, text=True, timeout=180)
                assert shrunk.returncode == 0, shrunk.stderr
                assert json.loads(shrunk.stdout.splitlines()[-1])["ids"] == ["worker-0"]
                time.sleep(1.0)
            finally:
                load.stop()
            assert load.failures == []
            assert load.done >= 4
            assert up.poll() is None, "lego up stopped"
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(60)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    drained = {line["worker_id"] for line in lines if line.get("event") == "worker_drained"}
    assert drained >= {"worker-1", "worker-2"}
