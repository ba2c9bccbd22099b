"""Coordinator RPCs on a live embedded cluster: cancellation, fencing of a stale leader, standby."""

from __future__ import annotations

import grpc
import pytest
from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego.grpc_server import channel
from lego.store import MemoryStore
from lego.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from lego.values import to_values
from lego_cli.cluster import EmbeddedCluster
from lego_coordinator import service as coordinator


async def test_cancel_stops_a_request_with_a_clear_status() -> None:
    async with EmbeddedCluster(workers=1) as cluster, channel(cluster.coordinator_address) as chan:
        stub = coordinator_pb2_grpc.CoordinatorStub(chan)
        submit = coordinator_pb2.SubmitRequest(
            request_id="to-cancel",
            workflow=TINY_SD15_TXT2IMG,
            inputs=to_values({"prompt": "x", "steps": 200}),
        )
        await stub.Submit(submit)
        await stub.Cancel(coordinator_pb2.CancelRequest(request_id="to-cancel"))
        events = [e async for e in stub.Watch(coordinator_pb2.WatchRequest(request_id="to-cancel"))]
        assert events[-1].WhichOneof("event") == "failed"
        assert events[-1].failed.code == grpc.StatusCode.CANCELLED.value[0]
        status = await stub.ClusterStatus(common_pb2.Empty())
        assert status.requests_in_flight == 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Cancel(coordinator_pb2.CancelRequest(request_id="never-submitted"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_worker_refuses_batches_from_an_older_leader() -> None:
    async with EmbeddedCluster(workers=1) as cluster, channel(cluster.gateway_address) as chan:
        worker = next(s for s in cluster.services if type(s).__name__ == "WorkerService")
        worker.agent.epoch = 10**6  # as if it had already served a newer leader
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway_pb2_grpc.GatewayStub(chan).Generate(
                gateway_pb2.GenerateRequest(workflow=TINY_SD15_TXT2IMG, inputs=to_values({"prompt": "x"}))
            )
        assert "stale leader: epoch 1 < 1000000" in (caught.value.details() or "")


async def test_a_standby_answers_unavailable_until_it_leads() -> None:
    store = MemoryStore()
    leader = await coordinator.serve(store)
    await leader.wait_until_leading()
    standby = await coordinator.serve(store)
    try:
        async with channel(standby.address) as chan:
            stub = coordinator_pb2_grpc.CoordinatorStub(chan)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Submit(coordinator_pb2.SubmitRequest(request_id="r", workflow="w"))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "standby" in (caught.value.details() or "")
            await leader.stop()  # resigns: the standby takes over at once
            await standby.wait_until_leading(timeout_s=5)
            assert (await stub.ClusterStatus(common_pb2.Empty())).epoch == 2
    finally:
        await standby.stop()
