"""The gateway's request registry: bounded memory, idempotency, and progress followers."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from lego_gateway.tracking import GatewayError, GenerateResult, RequestRegistry, TrackedRequest


async def finished(request_id: str) -> TrackedRequest:
    tracked = TrackedRequest(request_id, "wf")
    tracked.result = GenerateResult(request_id, b"png", 8, 8, 0.1, 3, 0.05)
    await tracked.record("done")
    return tracked


async def test_finished_requests_are_bounded_in_number_and_age() -> None:
    registry = RequestRegistry(retention_s=60, max_finished=3)
    for index in range(5):
        registry.add(await finished(f"r{index}"))
    running = TrackedRequest("running", "wf")
    registry.add(running)
    assert [r for r in ("r0", "r1", "r2", "r3", "r4", "running") if r in registry] == [
        "r2",
        "r3",
        "r4",
        "running",
    ]
    registry.retention_s = 0.0
    await asyncio.sleep(0.01)
    registry.expire()
    assert "running" in registry and "r4" not in registry  # unfinished requests are never dropped


async def test_unfinished_requests_are_bounded_too() -> None:
    registry = RequestRegistry(max_in_flight=2)
    registry.add(TrackedRequest("a", "wf"))
    registry.add(TrackedRequest("b", "wf"))
    with pytest.raises(GatewayError) as caught:
        registry.add(TrackedRequest("c", "wf"))
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(GatewayError) as unknown:
        registry.get("c")
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND and unknown.value.field == "request_id"


async def test_an_idempotency_key_finds_its_request_until_it_is_dropped() -> None:
    registry = RequestRegistry(max_finished=1)
    registry.add(await finished("first"), idempotency_key="k")
    assert registry.by_idempotency_key("k") is registry.get("first")
    registry.add(await finished("second"))
    assert registry.by_idempotency_key("k") is None


async def test_followers_see_every_event_once_from_the_start_and_stop_at_the_end() -> None:
    tracked = TrackedRequest("r", "wf")
    await tracked.record("queued")
    late_and_early = [asyncio.create_task(collect(tracked)) for _ in range(2)]
    await tracked.record("admitted")
    for step in (1, 2, 3):
        await tracked.record("node_started", node_id=f"n{step}")
        await tracked.record("step", step=step, total=3)
    tracked.result = GenerateResult("r", b"png", 8, 8, 0.1, 3, 0.05)
    await tracked.record("done")
    await tracked.record("failed")  # after the end: ignored
    seen = await asyncio.wait_for(asyncio.gather(*late_and_early), 5)
    assert seen[0] == seen[1] == ["queued", "admitted", "step", "step", "step", "done"]
    assert tracked.state == "done" and tracked.step == 3 and (await tracked.wait()).png == b"png"


async def collect(tracked: TrackedRequest) -> list[str]:
    return [event.kind async for event in tracked.follow()]


async def test_slo_window_counts_answers_that_met_their_slo() -> None:
    registry = RequestRegistry()
    fast, slow, unbounded = TrackedRequest("f", "wf"), TrackedRequest("s", "wf"), TrackedRequest("u", "wf")
    fast.slo_s, slow.slo_s = 10.0, 1e-9
    for tracked in (fast, slow, unbounded):
        await tracked.record("done")
        registry.answered(tracked)
    window = registry.slo_window()
    assert (window.answered, window.met) == (3, 2)
    assert window.attainment == pytest.approx(2 / 3)
