"""The Python SDK (`lego.client`) on a real embedded cluster: the four clients (gRPC and REST, blocking
and asyncio) give the same results, progress events and errors; and `lego watch` / `lego status`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego.client import (
    AsyncGatewayClient,
    AsyncRestClient,
    GatewayClient,
    InvalidInput,
    LegoError,
    Progress,
    RequestInfo,
    RestClient,
)
from lego.errors import InvalidRequest
from lego_cli.cluster import EmbeddedCluster
from lego_cli.main import main
from lego_gateway.auth import ApiKeys
from lego_gateway.service import GatewayOptions

from tests.pipeline_reference import decode_png

pytestmark = pytest.mark.asyncio(loop_scope="module")

SMALL = {"prompt": "a red circle", "steps": 2, "height": 64, "width": 64, "seed": 7}
LONG = {**SMALL, "steps": 200}
KINDS = ["grpc", "grpc-async", "rest", "rest-async"]
Client = GatewayClient | AsyncGatewayClient | RestClient | AsyncRestClient


def make_client(kind: str, cluster: EmbeddedCluster, api_key: str | None = None) -> Client:
    clients: dict[str, Any] = {
        "grpc": lambda: GatewayClient(cluster.gateway_address, 60, api_key=api_key),
        "grpc-async": lambda: AsyncGatewayClient(cluster.gateway_address, 60, api_key=api_key),
        "rest": lambda: RestClient(cluster.http_address, 60, api_key=api_key),
        "rest-async": lambda: AsyncRestClient(cluster.http_address, 60, api_key=api_key),
    }
    client: Client = clients[kind]()
    return client


def json_lines(text: str) -> list[dict[str, Any]]:
    """What the CLI printed, without the embedded services' log lines."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


class Driver:
    """Any of the four clients, driven from the test's event loop (blocking ones in a thread)."""

    def __init__(self, client: Client) -> None:
        self.client: Any = client
        self.is_async = isinstance(client, AsyncGatewayClient | AsyncRestClient)

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        bound = getattr(self.client, method)
        if self.is_async:
            return await bound(*args, **kwargs)
        return await asyncio.to_thread(bound, *args, **kwargs)

    async def progress(self, request_id: str, **kwargs: Any) -> list[Progress]:
        if self.is_async:
            return [event async for event in self.client.progress(request_id, **kwargs)]
        return await asyncio.to_thread(lambda: list(self.client.progress(request_id, **kwargs)))

    async def close(self) -> None:
        await self("close")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[EmbeddedCluster]:
    async with EmbeddedCluster(workers=1, http_port=0) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module", params=KINDS)
async def sdk(request: pytest.FixtureRequest, cluster: EmbeddedCluster) -> AsyncIterator[Driver]:
    driver = Driver(make_client(request.param, cluster))
    yield driver
    await driver.close()


async def test_generate_returns_the_png_with_its_size(sdk: Driver) -> None:
    image = await sdk("generate", TINY_SD15_TXT2IMG, SMALL, request_id=f"gen-{id(sdk)}")
    assert image.request_id == f"gen-{id(sdk)}"
    assert (image.width, image.height) == (64, 64)
    assert decode_png(image.png).shape == (64, 64, 3)
    assert image.latency_s > 0


async def test_submit_then_progress_then_result(sdk: Driver) -> None:
    info: RequestInfo = await sdk("submit", TINY_SD15_TXT2IMG, SMALL)
    assert info.workflow == TINY_SD15_TXT2IMG and info.state in ("queued", "running")
    events = await sdk.progress(info.request_id)
    kinds = [event.kind for event in events]
    assert kinds[0] == "queued" and kinds[-1] == "done", kinds
    steps = [(event.step, event.total) for event in events if event.kind == "step"]
    total = steps[-1][1]  # PNDM: steps + 1 denoise iterations
    assert total >= 2 and steps == [(step, total) for step in range(1, total + 1)]
    assert all(event.request_id == info.request_id for event in events)
    assert [e.time_s for e in events] == sorted(e.time_s for e in events)
    image = await sdk("result", info.request_id)
    assert image.request_id == info.request_id and decode_png(image.png).shape == (64, 64, 3)
    status: RequestInfo = await sdk("status", info.request_id)
    assert status.state == "done" and status.finished and (status.step, status.total_steps) == (total, total)
    with_nodes = await sdk.progress(info.request_id, node_events=True)  # a finished request replays
    assert {"node_started", "node_finished"} <= {event.kind for event in with_nodes}


async def test_cancel_a_running_request(sdk: Driver) -> None:
    info: RequestInfo = await sdk("submit", TINY_SD15_TXT2IMG, LONG)
    deadline = time.monotonic() + 60
    while info.step < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        info = await sdk("status", info.request_id)
    assert info.state == "running", info
    cancelled: RequestInfo = await sdk("cancel", info.request_id)
    assert cancelled.state == "cancelled" and cancelled.error_code == grpc.StatusCode.CANCELLED
    assert (await sdk("status", info.request_id)).state == "cancelled"
    events = await sdk.progress(info.request_id)
    assert events[-1].kind == "cancelled" and events[-1].code == grpc.StatusCode.CANCELLED
    with pytest.raises(LegoError) as caught:
        await sdk("result", info.request_id)
    assert caught.value.code == grpc.StatusCode.CANCELLED


async def test_errors_carry_the_code_and_the_field(sdk: Driver) -> None:
    with pytest.raises(LegoError) as unknown:
        await sdk("generate", "no-such-workflow", SMALL)
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND, unknown.value
    with pytest.raises(InvalidInput) as invalid:
        await sdk("submit", TINY_SD15_TXT2IMG, {**SMALL, "steps": 9999})
    assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.value.field == "steps" and "9999" in invalid.value.message
    assert isinstance(invalid.value, InvalidRequest)  # what callers of the first client caught
    with pytest.raises(LegoError) as missing:
        await sdk("status", "no-such-request")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND and missing.value.field == "request_id"
    with pytest.raises(LegoError) as not_watchable:
        await sdk.progress("no-such-request")
    assert not_watchable.value.code == grpc.StatusCode.NOT_FOUND


async def test_workflows_and_cluster(sdk: Driver) -> None:
    workflows = {w.name: w for w in await sdk("workflows")}
    assert "prompt" in workflows[TINY_SD15_TXT2IMG].inputs
    assert workflows[TINY_SD15_TXT2IMG].node_count > 0
    view = await sdk("cluster")
    assert [w.worker_id for w in view.workers] == ["worker-0"]
    assert view.slo.window_s > 0 and view.policy
    json.dumps(view.as_dict())


async def test_the_four_clients_see_the_same_request(cluster: EmbeddedCluster) -> None:
    drivers = [Driver(make_client(kind, cluster)) for kind in KINDS]
    try:
        image = await drivers[0]("generate", TINY_SD15_TXT2IMG, SMALL)
        seen = [await driver("status", image.request_id) for driver in drivers]
        assert len({(s.request_id, s.state, s.step, s.total_steps) for s in seen}) == 1
        assert seen[0].request_id == image.request_id and seen[0].state == "done"
        results = [await driver("result", image.request_id) for driver in drivers]
        assert {(r.png, r.width, r.height) for r in results} == {(image.png, 64, 64)}
        replays = [await driver.progress(image.request_id) for driver in drivers]
        assert len({tuple((e.kind, e.step) for e in events) for events in replays}) == 1
    finally:
        for driver in drivers:
            await driver.close()


async def test_lego_watch_prints_json_lines_and_exits_by_outcome(
    cluster: EmbeddedCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    async with AsyncGatewayClient(cluster.gateway_address) as client:
        done = await client.submit(TINY_SD15_TXT2IMG, SMALL)
        code = await asyncio.to_thread(main, ["watch", done.request_id, "--gateway", cluster.gateway_address])
        lines = json_lines(capsys.readouterr().out)
        assert code == 0
        steps = [line["step"] for line in lines if line["kind"] == "step"]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
        assert lines[0]["kind"] == "queued" and lines[-1]["kind"] == "done"

        cancelled = await client.submit(TINY_SD15_TXT2IMG, LONG)
        await client.cancel(cancelled.request_id)
        code = await asyncio.to_thread(
            main, ["watch", cancelled.request_id, "--gateway", cluster.gateway_address]
        )
        lines = json_lines(capsys.readouterr().out)
        assert code == 1 and lines[-1]["kind"] == "cancelled" and lines[-1]["code"] == "CANCELLED"

    code = await asyncio.to_thread(main, ["watch", "no-such-request", "--gateway", cluster.gateway_address])
    assert code == 1 and "NOT_FOUND" in capsys.readouterr().err


async def test_lego_status_prints_the_cluster_view(
    cluster: EmbeddedCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await asyncio.to_thread(main, ["status", "--gateway", cluster.gateway_address])
    assert code == 0
    [view] = json_lines(capsys.readouterr().out)
    assert view["workers"][0]["worker_id"] == "worker-0"
    assert isinstance(view["workers"][0]["loaded_models"], list)
    assert {"requests_in_flight", "ready_tasks", "policy", "epoch"} <= view.keys()
    assert {"window_s", "answered", "met", "attainment"} <= view["slo"].keys()


async def test_lego_generate_progress_keeps_one_summary_line_on_stdout(
    cluster: EmbeddedCluster, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "x.png"
    argv = ["generate", "--prompt", "x", "--steps", "2", "--height", "64", "--width", "64"]
    argv += ["--seed", "1", "--out", str(out), "--gateway", cluster.gateway_address, "--progress"]
    assert await asyncio.to_thread(main, argv) == 0
    captured = capsys.readouterr()
    [summary] = json_lines(captured.out)
    assert summary["size"] == [64, 64] and summary["out"] == str(out) and out.read_bytes()[:4] == b"\x89PNG"
    steps = json_lines(captured.err)
    assert [(s["kind"], s["step"]) for s in steps] == [("step", n) for n in range(1, len(steps) + 1)]
    assert steps and steps[-1]["step"] == steps[-1]["total"]


async def test_api_keys_on_both_apis() -> None:
    options = GatewayOptions(api_keys=ApiKeys(frozenset({"sesame"})))
    async with EmbeddedCluster(workers=1, http_port=0, gateway=options) as keyed:
        for kind in KINDS:
            refused = Driver(make_client(kind, keyed))
            with pytest.raises(LegoError) as caught:
                await refused("workflows")
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED, kind
            await refused.close()
            allowed = Driver(make_client(kind, keyed, api_key="sesame"))
            assert TINY_SD15_TXT2IMG in {w.name for w in await allowed("workflows")}, kind
            await allowed.close()
        watch = ["watch", "no-such-request", "--gateway", keyed.gateway_address, "--api-key", "sesame"]
        assert await asyncio.to_thread(main, watch) == 1  # NOT_FOUND, not UNAUTHENTICATED
