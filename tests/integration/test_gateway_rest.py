"""The gateway's native REST API on a real embedded cluster: submit and come back, progress as
Server-Sent Events, cancel, idempotency, the errors clients see (field, limit, value), API keys."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego.data_uri import encode_data_uri
from lego.grpc_server import channel
from lego.v1 import gateway_pb2, gateway_pb2_grpc
from lego.values import to_values
from lego_cli.cluster import EmbeddedCluster
from lego_coordinator.service import CoordinatorConfig
from lego_gateway.auth import ApiKeys
from lego_gateway.service import GatewayOptions

from tests.pipeline_reference import decode_png

SMALL = {"prompt": "a red circle", "steps": 4, "height": 64, "width": 64, "seed": 3}


def rest(cluster: EmbeddedCluster, key: str = "") -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=f"http://{cluster.http_address}", timeout=60, headers=headers)


async def sse_events(http: httpx.AsyncClient, url: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    async with http.stream("GET", url) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                yield kind, json.loads(line.removeprefix("data: "))


async def test_sse_shows_every_denoise_step_and_the_image_matches_a_direct_generate() -> None:
    async with EmbeddedCluster(workers=1, http_port=0) as cluster, rest(cluster) as http:
        submitted = await http.post("/v1/requests", json={"workflow": TINY_SD15_TXT2IMG, "inputs": SMALL})
        assert submitted.status_code == 202, submitted.text
        state = submitted.json()
        events = [item async for item in sse_events(http, state["events_url"])]
        image = await http.get(state["image_url"])
        status = (await http.get(f"/v1/requests/{state['request_id']}")).json()
        direct = await http.post(
            "/v1/generate",
            json={"workflow": TINY_SD15_TXT2IMG, "inputs": SMALL, "response_format": "b64_json"},
        )
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["queued", "admitted"] and kinds[-1] == "done"
    assert "node_started" in kinds and "node_finished" in kinds
    steps = [data for kind, data in events if kind == "step"]
    total = steps[0]["total"]
    assert total >= SMALL["steps"]  # PNDM runs one extra iteration
    assert [s["step"] for s in steps] == list(range(1, total + 1))
    assert all(data["request_id"] == state["request_id"] for _, data in events)
    assert events[-1][1]["image_url"] == state["image_url"]
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert status["state"] == "done" and status["step"] == total
    assert np.array_equal(decode_png(image.content), decode_png(base64.b64decode(direct.json()["b64_json"])))
    assert decode_png(image.content).shape == (64, 64, 3)


async def test_cancel_stops_a_running_request_and_its_stream_ends() -> None:
    async with EmbeddedCluster(workers=1, http_port=0) as cluster, rest(cluster) as http:
        long = {**SMALL, "steps": 200}
        state = (await http.post("/v1/requests", json={"workflow": TINY_SD15_TXT2IMG, "inputs": long})).json()
        early = await http.get(state["image_url"])
        kinds = []
        async for kind, data in sse_events(http, state["events_url"]):
            kinds.append(kind)
            if kind == "step" and data["step"] == 2:
                cancelled = await http.post(f"/v1/requests/{state['request_id']}/cancel")
        image = await http.get(state["image_url"])
        after = await http.post("/v1/generate", json={"workflow": TINY_SD15_TXT2IMG, "inputs": SMALL})
    assert early.status_code == 409 and "retry later or pass wait=true" in early.json()["error"]["message"]
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert kinds[-1] == "cancelled" and kinds.count("step") < 200
    assert image.status_code == 499 and image.json()["error"]["code"] == "CANCELLED"
    assert after.status_code == 200  # the cluster carries on


async def test_an_idempotency_key_returns_the_first_request() -> None:
    async with EmbeddedCluster(workers=1, http_port=0) as cluster, rest(cluster) as http:
        body = {"workflow": TINY_SD15_TXT2IMG, "inputs": SMALL}
        first = await http.post("/v1/requests", json=body, headers={"Idempotency-Key": "order-17"})
        again = await http.post("/v1/requests", json=body, headers={"Idempotency-Key": "order-17"})
        other = await http.post("/v1/requests", json=body, headers={"Idempotency-Key": "order-18"})
        await http.get(first.json()["image_url"], params={"wait": True})
    assert first.json()["request_id"] == again.json()["request_id"] != other.json()["request_id"]


async def test_errors_name_the_field_the_limit_and_the_value() -> None:
    png = encode_data_uri(np.zeros((8, 8, 3), dtype=np.uint8))
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"workflow": "nope", "inputs": {}}, 404, "workflow", "unknown workflow 'nope'"),
        ({"workflow": TINY_SD15_TXT2IMG, "inputs": {"steps": 9999}}, 400, "steps", "got 9999"),
        (
            {"workflow": TINY_SD15_TXT2IMG, "inputs": {"prompt": "x", "height": 100}},
            400,
            "height",
            "multiple of 8",
        ),
        ({"workflow": TINY_SD15_TXT2IMG, "inputs": {"prompt": "x" * 5000}}, 400, "prompt", "got 5000"),
        (
            {"workflow": TINY_SD15_TXT2IMG, "inputs": {"image": "data:image/png;base64,@@"}},
            400,
            "image",
            "base64",
        ),
        ({"workflow": TINY_SD15_TXT2IMG, "inputs": {"image": "/etc/passwd"}}, 400, "image", "data URI"),
        ({"workflow": TINY_SD15_TXT2IMG, "inputs": {"image": png[:60]}}, 400, "image", "not"),
        ({"workflow": TINY_SD15_TXT2IMG, "inputs": {"steps": [1]}}, 400, "inputs.steps", ""),
        ({"workflow": TINY_SD15_TXT2IMG, "slo_ms": -1}, 400, "slo_ms", "greater than or equal to 0"),
    ]
    async with EmbeddedCluster(workers=1, http_port=0) as cluster, rest(cluster) as http:
        answers = [await http.post("/v1/requests", json=body) for body, *_ in cases]
        unknown = await http.get("/v1/requests/never-submitted")
        too_big = await http.post("/v1/requests", content=b"{" + b" " * (33 * 1024 * 1024) + b"}")
        listed = await http.get("/v1/workflows")
    for (body, status, field, words), answer in zip(cases, answers, strict=True):
        error = answer.json()["error"]
        assert (answer.status_code, error["field"]) == (status, field), (body, answer.text)
        assert words in error["message"], (body, error)
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "request_id"
    assert too_big.status_code == 413 and too_big.json()["error"]["field"] == "body"
    assert TINY_SD15_TXT2IMG in [w["name"] for w in listed.json()["workflows"]]


async def test_overload_is_429_with_retry_after_and_an_unmeetable_slo_is_400() -> None:
    config = CoordinatorConfig(enforce_slo=True)
    async with (
        EmbeddedCluster(workers=1, http_port=0, coordinator_config=config) as cluster,
        rest(cluster) as http,
    ):
        body = {"workflow": TINY_SD15_TXT2IMG, "inputs": {**SMALL, "steps": 20}}
        answers = [await http.post("/v1/requests", json=body) for _ in range(12)]  # at once, one worker
        for admitted in (a for a in answers if a.status_code == 202):
            await http.post(f"/v1/requests/{admitted.json()['request_id']}/cancel")
        unmeetable = await http.post(
            "/v1/requests", json={"workflow": TINY_SD15_TXT2IMG, "inputs": SMALL, "slo_ms": 0.001}
        )
    statuses = [a.status_code for a in answers]
    assert statuses[0] == 202 and 429 in statuses, statuses
    overload = answers[statuses.index(429)]
    assert overload.headers["Retry-After"] == "1"
    assert overload.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert "cannot meet its SLO" in overload.json()["error"]["message"]
    assert unmeetable.status_code == 400 and unmeetable.json()["error"]["field"] == "slo_ms"
    assert "execution time on an idle worker" in unmeetable.json()["error"]["message"]


async def test_cluster_view_lists_workers_models_queues_and_slo_attainment() -> None:
    async with EmbeddedCluster(workers=2, http_port=0) as cluster, rest(cluster) as http:
        await http.post("/v1/generate", json={"workflow": TINY_SD15_TXT2IMG, "inputs": SMALL})
        view = (await http.get("/v1/cluster")).json()
    assert sorted(w["worker_id"] for w in view["workers"]) == ["worker-0", "worker-1"]
    loaded = {model for w in view["workers"] for model in w["loaded_models"]}
    assert "tiny-sd15:unet" in loaded
    assert view["ready_tasks"] == 0 and view["policy"] == "lego"
    assert view["slo"]["answered"] == 1 and view["slo"]["attainment"] == 1.0


async def test_api_keys_guard_rest_and_grpc_but_not_health() -> None:
    options = GatewayOptions(api_keys=ApiKeys(frozenset({"k-123"})))
    async with EmbeddedCluster(workers=1, http_port=0, gateway=options) as cluster:
        async with (
            rest(cluster) as anonymous,
            rest(cluster, "wrong") as wrong,
            rest(cluster, "k-123") as good,
        ):
            refused = await anonymous.get("/v1/workflows")
            wrong_key = await wrong.post("/v1/requests", json={"workflow": TINY_SD15_TXT2IMG})
            allowed = await good.get("/v1/workflows")
            health = await anonymous.get("/healthz")
        async with channel(cluster.gateway_address) as chan:
            stub = gateway_pb2_grpc.GatewayStub(chan)
            request = gateway_pb2.GenerateRequest(workflow=TINY_SD15_TXT2IMG, inputs=to_values(SMALL))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Generate(request)
            reply = await stub.Generate(request, metadata=(("authorization", "Bearer k-123"),))
            checked = await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest())
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert refused.json()["error"]["code"] == "UNAUTHENTICATED"
    assert wrong_key.status_code == 401
    assert allowed.status_code == 200 and health.status_code == 200
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(reply.png) > 0
    assert checked.status == health_pb2.HealthCheckResponse.SERVING


async def test_grpc_watch_streams_the_same_progress() -> None:
    async with EmbeddedCluster(workers=1) as cluster, channel(cluster.gateway_address) as chan:
        stub = gateway_pb2_grpc.GatewayStub(chan)
        status = await stub.Submit(
            gateway_pb2.GenerateRequest(workflow=TINY_SD15_TXT2IMG, inputs=to_values(SMALL))
        )
        events = [e async for e in stub.Watch(gateway_pb2.RequestRef(request_id=status.request_id))]
        result = await stub.GetResult(gateway_pb2.RequestRef(request_id=status.request_id))
        again = await asyncio.wait_for(
            stub.GetStatus(gateway_pb2.RequestRef(request_id=status.request_id)), 5
        )
    kinds = [e.kind for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and "node_started" not in kinds
    assert [e.step for e in events if e.kind == "step"] == list(range(1, events[-2].total + 1))
    assert result.request_id == status.request_id and result.width == 64
    assert again.state == "done"
