"""The data engine SIGKILLed (`lego chaos` fault `dataengine_kill`). Its tensors die with it, so the
requests in flight fail with an explicit error and so does any request sent while it is down; nothing
restarts it on its own (`lego up` stops the cluster when a service exits), so it is restarted on its
port, as a supervisor would. Then the cluster serves again, reading and writing the new engine's
arena (not the dead one's, which clients still have mapped), and no tensor is left behind."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego.client import GatewayClient
from lego.dataplane import DataPlane
from lego_cli.chaos import answer_counts, engine_tensors, restart_dataengine, sigkill
from lego_dataengine import service as dataengine

from tests.chaos.fault_tools import InFlight, serve_again, start_cluster
from tests.conftest import EtcdProcess, free_port

ANSWER_WITHIN_S = 60.0


async def test_a_client_of_a_restarted_engine_uses_the_new_arena() -> None:
    """A client maps the engine's arena once; an engine brought back on the same address serves a new
    one, and the client must notice (before the fix it wrote into and read from the old mapping)."""
    port = free_port()
    first = await dataengine.serve(None, port=port, arena_mib=16)
    plane = DataPlane(first.address)
    before = np.arange(100_000, dtype=np.float32)  # 400 KB: through the arena, not inside the call
    assert np.array_equal(await plane.get(await plane.put("r/a/out", before)), before)
    await first.stop()  # the client keeps its mapping of the old arena (a SIGKILLed engine's stays too)
    second = await dataengine.serve(None, port=port, arena_mib=16)
    try:
        after = np.random.default_rng(1).random(100_000).astype(np.float32)
        written = await plane.put("r/b/out", after)
        assert np.array_equal(await DataPlane(second.address).get(written), after)
        other = await DataPlane(second.address).put("r/c/out", after * 2)
        assert np.array_equal(await plane.get(other), after * 2)
        assert np.array_equal(await plane.get(written), after)  # and the index of the new arena serves
    finally:
        await second.stop()


@pytest.mark.slow
def test_a_killed_data_engine_fails_requests_explicitly_and_serves_again_once_restarted(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    log_path = tmp_path / "cluster.log"
    with log_path.open("wb") as log:
        cluster = start_cluster(etcd, log, workers=1)
        try:
            gateway = cluster.gateway_address
            with GatewayClient(gateway) as client:  # warm: the models are loaded
                client.generate(TINY_SD15_TXT2IMG, {"prompt": "warm", "steps": 2})
            in_flight = [InFlight(gateway, f"engine-{i}", steps=200) for i in range(3)]
            time.sleep(1.0)
            assert all(r.running for r in in_flight), "they finished before the fault; make them longer"
            engine = next(p for p in cluster.processes if p.name == "dataengine")
            port = engine.address.rsplit(":", 1)[1]
            sigkill(cluster, engine)
            killed_at = time.monotonic()

            # while it is down: a new request gets an explicit error at once, it does not hang
            down = InFlight(gateway, "while-down", steps=2).wait(ANSWER_WITHIN_S).error
            assert down is not None and down.code != grpc.StatusCode.DEADLINE_EXCEEDED
            for request in in_flight:  # each in-flight request ends with an explicit error
                assert request.wait(ANSWER_WITHIN_S).error is not None
            assert max(r.answered_at or 0 for r in in_flight) - killed_at < 10.0

            restart_dataengine(cluster, port)
            recovery_s, errors = serve_again(gateway, within_s=30.0)
            after = [InFlight(gateway, f"after-{i}", steps=20) for i in range(3)]
            assert all(r.wait(ANSWER_WITHIN_S).image is not None for r in after)
            assert engine_tensors(cluster) == 0  # nothing of the answered or failed requests is left
            print(f"data engine restarted: served again after {recovery_s:.2f}s ({errors} errors first)")
        finally:
            cluster.stop()
    answered, _ = answer_counts(log_path)
    assert answered and max(answered.values()) == 1  # no request answered twice
    assert not any(answered[r.request_id] for r in in_flight)  # the failed ones were never answered
