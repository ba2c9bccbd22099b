"""Bounded asynchronous LoRA loading: the worker's LoRA fetches on a side thread, the executor's
choice to run without a loading LoRA or wait for it, the graph's bound, the scheduler's costs."""

from __future__ import annotations

import asyncio
import statistics
import threading

import numpy as np
import pytest
from lego.builtin_workflows import sd15_txt2img
from lego.graph import instantiate
from lego.request_inputs import resolve_inputs
from lego.validation import validate_spec
from lego.workflow import LoRA
from lego_coordinator.scheduler import RequestDone, Scheduler
from lego_worker.emulated_backend import EmulatedBackend, lora_fetch_s
from lego_worker.executor import Executor
from lego_worker.lora_loads import LoRALoads

from tests.unit.test_emulated_backend import PROFILES, unet_items
from tests.unit.test_scheduler import costs, outputs_of

PATCH = (("style.safetensors", 1.0),)


class GatedFetch:
    """A LoRA store that answers when the test opens the gate (or fails when told to)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.fetched: list[str] = []
        self.dropped: list[str] = []
        self.fail = False

    def fetch(self, source: str) -> float:
        self.gate.wait(5)
        if self.fail:
            raise FileNotFoundError(f"LoRA {source} does not exist")
        self.fetched.append(source)
        return 1.0

    def drop(self, source: str) -> None:
        self.dropped.append(source)


def test_a_lora_is_missing_while_it_loads_then_ready_and_fetched_once() -> None:
    store = GatedFetch()
    loads = LoRALoads(store.fetch, store.drop)
    [(source, fetch)] = loads.request(PATCH)
    assert source == "style.safetensors" and not fetch.done()
    assert [s for s, _ in loads.request(PATCH)] == ["style.safetensors"]  # still loading
    store.gate.set()
    fetch.result(5)
    assert loads.request(PATCH) == [] and store.fetched == ["style.safetensors"]
    assert loads.held() == ["style.safetensors"] and loads.stats.fetches == 1


def test_a_failed_fetch_is_reported_to_the_waiter_and_retried_by_the_next_batch() -> None:
    store = GatedFetch()
    store.fail = True
    store.gate.set()
    loads = LoRALoads(store.fetch, store.drop)
    [(_, fetch)] = loads.request(PATCH)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fetch.result(5)
    store.fail = False
    [(_, again)] = loads.request(PATCH)
    again.result(5)
    assert loads.request(PATCH) == [] and loads.stats.fetches == 2


def test_beyond_its_capacity_the_least_recently_used_lora_is_dropped_never_one_in_use() -> None:
    store = GatedFetch()
    store.gate.set()
    loads = LoRALoads(store.fetch, store.drop, capacity=2)
    for name in ("a", "b"):
        for _, fetch in loads.request(((name, 1.0),)):
            fetch.result(5)
    loads.request((("a", 1.0),))  # a used again: b is now the least recent
    for _, fetch in loads.request((("c", 1.0),)):
        fetch.result(5)
    assert store.dropped == ["b"] and sorted(loads.held()) == ["a", "c"]
    loads.request((("a", 1.0), ("c", 1.0), ("d", 1.0)))  # all three in use: none dropped yet
    assert store.dropped == ["b"]


def executor(store: GatedFetch) -> Executor:
    backend = EmulatedBackend(PROFILES, time_scale=1000.0)
    backend.fetch_lora = store.fetch  # type: ignore[method-assign]
    return Executor(backend, memory_budget_bytes=80 * 10**9)


async def test_an_optional_batch_runs_at_once_without_a_loading_lora_and_others_wait() -> None:
    store = GatedFetch()
    running = executor(store)
    items = unet_items(1)
    await running.run_async("unet", "tiny-sd15:unet", "denoise", items, PATCH, patches_optional=True)
    assert running.last_unpatched and running.loras.stats.unpatched == 1
    waiting = asyncio.ensure_future(running.run_async("unet", "tiny-sd15:unet", "denoise", items, PATCH))
    await asyncio.sleep(0.1)
    assert not waiting.done()  # K steps are over: this one waits for the LoRA
    store.gate.set()
    await asyncio.wait_for(waiting, 5)
    assert not running.last_unpatched and running.loras.stats.waits == 1
    kinds = [event.kind for event in running.drain_events()]
    assert "lora_wait" in kinds and "lora_fetch" in kinds and store.fetched == ["style.safetensors"]
    # held now: an optional batch runs with it
    await running.run_async("unet", "tiny-sd15:unet", "denoise", items, PATCH, patches_optional=True)
    assert not running.last_unpatched


def test_a_synchronous_batch_on_a_thread_fails_with_the_lora_error() -> None:
    store = GatedFetch()
    store.fail = True
    store.gate.set()
    with pytest.raises(FileNotFoundError):
        executor(store).run("unet", "tiny-sd15:unet", "denoise", unet_items(1), PATCH)


def test_emulated_fetch_times_are_fixed_per_lora_around_the_configured_median() -> None:
    times = [lora_fetch_s(f"lora-{index}") for index in range(2000)]
    assert lora_fetch_s("lora-7") == times[7]
    assert statistics.median(times) == pytest.approx(4.4, rel=0.05)
    assert lora_fetch_s("lora-7", median_s=1.0) == pytest.approx(times[7] / 4.4)
    assert np.std(np.log(times)) == pytest.approx(0.5, rel=0.1)


def spec(async_steps: int, loras: bool = True):  # type: ignore[no-untyped-def]
    patches = [LoRA("style.safetensors")] if loras else []
    return sd15_txt2img("wf", "tiny-sd15", default_size=128, loras=patches, lora_async_steps=async_steps)


def graph(async_steps: int, loras: bool = True, steps: int = 4):  # type: ignore[no-untyped-def]
    chosen = spec(async_steps, loras)
    return instantiate(chosen, resolve_inputs(chosen, {"prompt": "p", "steps": steps}))


def optional_nodes(async_steps: int, loras: bool = True) -> list[str]:
    return sorted(n.id for n in graph(async_steps, loras).nodes.values() if n.patches_optional)


def test_the_bound_marks_exactly_the_first_k_iterations_of_each_branch() -> None:
    assert optional_nodes(2) == [
        "denoise_loop_2/step0/cond",
        "denoise_loop_2/step0/uncond",
        "denoise_loop_2/step1/cond",
        "denoise_loop_2/step1/uncond",
    ]
    assert optional_nodes(0) == [] and optional_nodes(2, loras=False) == []
    assert len(optional_nodes(100)) == 2 * 5  # every iteration (4 steps + PNDM's extra one)


def test_a_bound_that_is_not_a_small_integer_is_refused_by_name() -> None:
    bad = spec(2)
    loop = next(node for node in bad.nodes if node.patches)
    loop.attributes["lora_async_steps"] = "-1"
    assert any("lora_async_steps must be an integer from 0 to 1000" in e for e in validate_spec(bad))


def unet_workers(async_steps: int, holder_queue_s: float = 0.0) -> list[str]:
    """Where the first UNet calls of a request go, in order, when worker `holder` holds its LoRA
    (its queue `holder_queue_s` seconds long) and `w0` does not."""
    scheduler = Scheduler(costs())
    scheduler.add_worker("w0", host="h0")
    scheduler.add_worker("holder", host="h0")
    scheduler.set_loaded("holder", [], loras=["style.safetensors"])
    scheduler._workers["holder"].busy_until = holder_queue_s
    scheduler.admit("r", "wf", graph(async_steps), 0.0)
    placed = []
    for _ in range(3):  # text encoders and the scheduler's init, then the first UNet calls
        for dispatch in scheduler.schedule(0.0).dispatches:
            if dispatch.op == "unet":
                placed.append(dispatch.worker_id)
            scheduler.complete(dispatch.batch_id, outputs_of(dispatch), 0.0, 0.01)
    return placed


def test_a_patched_batch_goes_to_the_worker_holding_its_lora_and_starts_its_fetch_where_it_runs() -> None:
    # a step's two CFG branches: the second waits for the holder rather than fetch the LoRA on w0
    assert unet_workers(0) == ["holder", "holder"]
    # ... unless it may start without the LoRA: then it starts on w0 while w0 fetches it
    assert unet_workers(100) == ["holder", "w0"]
    # a holder busier than a fetch takes: the first branch fetches the LoRA on w0 instead
    assert unet_workers(0, holder_queue_s=60.0)[0] == "w0"


def test_the_request_reports_how_many_denoiser_calls_ran_unpatched() -> None:
    scheduler = Scheduler(costs())
    scheduler.add_worker("w0", host="h0")
    scheduler.admit("r", "wf", graph(2), 0.0)
    events = []
    for _ in range(100):
        dispatches = scheduler.schedule(0.0).dispatches
        if not dispatches:
            break
        for dispatch in dispatches:
            unpatched = frozenset(t.task_id for t in dispatch.tasks if t.node.patches_optional)
            events += scheduler.complete(dispatch.batch_id, outputs_of(dispatch), 0.0, 0.01, 0.0, unpatched)
    [done] = [event for event in events if isinstance(event, RequestDone)]
    assert done.unpatched_calls == 4


def test_the_benchmarks_lora_variants_are_valid_workflows_with_the_bound() -> None:
    from lego_cli.loras import with_loras
    from lego_cli.workloads import workload

    served = with_loras(workload("sd15"), "zipf:distinct=3,s=1", async_steps=8)
    assert sorted(served.workflows) == sorted(
        ["A", "B", "C"] + [f"{tenant}+lora{rank}" for tenant in "ABC" for rank in range(3)]
    )
    variant = served.workflows["B+lora2"]
    assert variant.name == "sd15-canny-lora2" and validate_spec(variant) == []
    nodes = instantiate(variant, resolve_inputs(variant, served.inputs["B+lora2"])).nodes.values()
    unets = [node for node in nodes if node.op == "unet"]
    assert {node.patches for node in unets} == {(("emulated-lora/style-2.safetensors", 1.0),)}
    assert sum(node.patches_optional for node in unets) == 8 * 2  # K iterations, both CFG branches
