"""A worker SIGSTOPped in the middle of its batches, for longer than its registration lease, then
SIGCONTed (`lego chaos` fault `worker_stop`): a hung worker rather than a dead one. Its stream to the
coordinator stays open, so what it holds waits for it (the coordinator does not act on the lease);
nothing is lost, run twice or answered twice, its registration comes back, and it serves again.
One worker keeps the test short; `lego chaos` stops one of two, the other serving meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from lego import keys
from lego.client import GatewayClient
from lego.store import open_store
from lego_cli.chaos import STOP_PAST_LEASE_S, answer_counts, busy_workers, engine_tensors
from lego_worker.agent import REGISTRATION_TTL_S

from tests.chaos.fault_tools import InFlight, serve_again, start_cluster, wait_until
from tests.conftest import EtcdProcess

pytestmark = pytest.mark.slow
ANSWER_WITHIN_S = 60.0


def _registered(etcd: EtcdProcess, worker_id: str) -> bool:
    async def read() -> bool:
        store = await open_store(etcd.url)
        try:
            return await store.get(keys.worker(worker_id)) is not None
        finally:
            await store.close()

    return asyncio.run(read())


def test_a_worker_stopped_past_its_lease_resumes_and_nothing_is_lost_or_answered_twice(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    log_path = tmp_path / "cluster.log"
    with log_path.open("wb") as log:
        cluster = start_cluster(etcd, log, workers=1)
        try:
            gateway = cluster.gateway_address
            in_flight = [InFlight(gateway, f"stop-{i}", steps=200) for i in range(4)]
            wait_until(lambda: len(busy_workers(cluster)) > 0, 10.0, "a worker runs a batch")
            victim_id = sorted(busy_workers(cluster))[0]
            victim = next(p for p in cluster.processes if p.name == victim_id)
            assert _registered(etcd, victim_id)
            os.kill(victim.process.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                # its lease runs out: the store no longer lists it (the coordinator keeps its stream)
                wait_until(lambda: not _registered(etcd, victim_id), REGISTRATION_TTL_S + 5.0, "lease expiry")
                time.sleep(STOP_PAST_LEASE_S)
                held = [r.request_id for r in in_flight if r.running]  # its batch's requests wait
                assert held, "nothing waited on the stopped worker"
            finally:
                os.kill(victim.process.pid, signal.SIGCONT)
            stopped_s = time.monotonic() - stopped_at

            for request in in_flight:  # every one completes: nothing lost, nothing run twice
                assert request.wait(ANSWER_WITHIN_S).image is not None
            wait_until(lambda: _registered(etcd, victim_id), 10.0, "the worker registers again")
            with GatewayClient(gateway) as client:
                workers = {w.worker_id for w in client.cluster().workers}
            assert workers == {victim_id}
            recovery_s, errors = serve_again(gateway, within_s=30.0)
            assert errors == 0
            after = [InFlight(gateway, f"after-{i}", steps=50) for i in range(4)]
            assert all(r.wait(ANSWER_WITHIN_S).image is not None for r in after)
            assert engine_tensors(cluster) == 0
            print(f"stopped {stopped_s:.1f}s, {len(held)} of 4 held, served again in {recovery_s:.2f}s")
        finally:
            cluster.stop()
    answered, done = answer_counts(log_path)
    ids = [r.request_id for r in in_flight + after]
    assert all(answered[i] == 1 for i in ids), answered
    assert all(done[i] == 1 for i in ids), done  # no request was finished twice by the coordinator
