"""The side lane: a request's noise-scheduler nodes (fractions of a millisecond each) run on the
worker holding its scheduler state at once, beside the batches queued there, not behind them.

The scheduler sends them whatever the worker's queue, the simulator starts them at once, and the
worker's executor runs them without the device lock a queued batch holds for its forward pass.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from lego import native
from lego.builtin_workflows import sd3_txt2img, sd15_txt2img
from lego.graph import instantiate
from lego.profiles import ProfileSet, default_profile_dir, load_batch_sizes
from lego.request_inputs import resolve_inputs
from lego_coordinator.costs import CostModel
from lego_coordinator.scheduler import Dispatch, Scheduler, Tensor
from lego_coordinator.simulator import Arrival, Simulator
from lego_worker.emulated_backend import EmulatedBackend
from lego_worker.executor import Executor
from lego_worker.torch_backend import TorchBackend

SPEC = sd15_txt2img("wf", "tiny-sd15", default_size=128)
SD3 = sd3_txt2img("sd3", "tiny-sd3", default_size=128)
DIRECTORY = default_profile_dir()


def graph(steps: int = 3):  # type: ignore[no-untyped-def]
    return instantiate(SPEC, resolve_inputs(SPEC, {"prompt": "p", "steps": steps, "guidance_scale": 7.5}))


def outputs_of(dispatch: Dispatch) -> dict[str, dict[str, Tensor]]:
    return {
        t.task_id: {o: Tensor(f"h:{t.task_id}/{o}", 1024, "h0") for o in t.node.outputs}
        for t in dispatch.tasks
    }


def test_a_scheduler_step_goes_to_its_state_worker_at_once_though_its_queue_is_full() -> None:
    # one worker taking one queued batch at a time, two workflows whose denoisers cannot batch
    scheduler = Scheduler(CostModel(ProfileSet(DIRECTORY), load_batch_sizes(DIRECTORY)), max_in_flight=1)
    scheduler.add_worker("w0", host="h0")
    scheduler.admit("sd15", "wf", graph(), 0.0)
    scheduler.admit("sd3", "sd3", instantiate(SD3, resolve_inputs(SD3, {"prompt": "p", "steps": 3})), 0.0)
    queued: list[Dispatch] = []
    steps_beside_a_full_queue = 0
    for _ in range(200):
        dispatches = scheduler.schedule(0.0).dispatches
        for dispatch in dispatches:
            if dispatch.side_lane:
                assert dispatch.op == "noise_scheduler"
                steps_beside_a_full_queue += dispatch.mode.endswith("step") and len(queued) == 1
                busy_until = scheduler._workers["w0"].busy_until
                scheduler.complete(dispatch.batch_id, outputs_of(dispatch), 0.0, 0.0001)
                assert scheduler._workers["w0"].busy_until == busy_until  # it took no time of the queue
            else:
                assert not queued, "a second batch was queued on a worker that takes one"
                queued.append(dispatch)
        if queued:
            head = queued.pop(0)
            scheduler.complete(head.batch_id, outputs_of(head), 0.0, 0.01)
        elif not dispatches:
            break
    assert scheduler.in_flight_requests() == 0
    assert steps_beside_a_full_queue > 0


def test_the_baselines_keep_a_request_s_nodes_in_one_line() -> None:
    scheduler = Scheduler(CostModel(ProfileSet(DIRECTORY)), policy="static")
    scheduler.add_worker("w0", host="h0")
    scheduler.admit("r", "wf", graph(), 0.0)
    sent: list[Dispatch] = []
    for _ in range(100):
        dispatches = scheduler.schedule(0.0).dispatches
        if not dispatches:
            break
        for dispatch in dispatches:
            sent.append(dispatch)
            scheduler.complete(dispatch.batch_id, outputs_of(dispatch), 0.0, 0.01)
    assert any(d.op == "noise_scheduler" for d in sent) and not any(d.side_lane for d in sent)


@pytest.mark.skipif(native.requested(), reason="replaces the simulator's methods: compiled classes forbid it")
def test_in_simulation_a_side_lane_batch_starts_at_once_and_others_once_their_inputs_are_made() -> None:
    simulator = Simulator({"wf": SPEC}, 1, ProfileSet(DIRECTORY), "lego", load_batch_sizes(DIRECTORY))
    ends: dict[str, float] = {}
    start = simulator._start

    def record(dispatch: Dispatch, now: float) -> None:
        start(dispatch, now)
        for task in dispatch.tasks:
            ends[task.task_id] = simulator._ends[task.task_id]

    simulator._start = record  # type: ignore[method-assign]
    result = simulator.run(
        [Arrival(0.0, "wf", {"prompt": "p", "steps": 3})], [Arrival(0.0, "wf", {"prompt": "p"})]
    )
    assert result.summary()["completed"] == 1
    graph_ = graph()
    truth = CostModel(ProfileSet(DIRECTORY))
    for node in graph_.nodes.values():
        end = ends[f"r0/{node.id}"]
        producers = {v.node for v in node.inputs.values() if hasattr(v, "node")}
        made = max((ends[f"r0/{p}"] for p in producers), default=0.0)
        assert end >= made + truth.exec_s(node) - 1e-9  # never before its inputs were made
    steps = [n for n in graph_.nodes.values() if n.op == "noise_scheduler" and n.mode != "init"]
    for node in steps:  # each step ends its own execution after its denoiser calls, queue or not
        producers = {v.node for v in node.inputs.values() if hasattr(v, "node")}
        made = max(ends[f"r0/{p}"] for p in producers)
        assert math.isclose(ends[f"r0/{node.id}"], made + truth.exec_s(node), abs_tol=1e-9)


@pytest.mark.parametrize("backend", ["emulated", "torch"])
async def test_the_executor_runs_a_side_lane_batch_while_the_device_is_held(backend: str) -> None:
    chosen = EmulatedBackend(ProfileSet(DIRECTORY)) if backend == "emulated" else TorchBackend()
    executor = Executor(chosen, memory_budget_bytes=10**11)
    item = {
        "seed": 1,
        "height": 64,
        "width": 64,
        "steps": 2,
        "iterations": 3,
        "latent_channels": 4,
        "vae_scale_factor": 8,
        "state_key": "r/loop",
    }
    await executor.run_beside("noise_scheduler", "tiny-sd15:scheduler", "init", [item])  # loaded now
    busy = executor.metrics.busy_s
    executor._lock.acquire()  # a queued batch's forward pass holds the device
    try:
        outputs, seconds = await asyncio.wait_for(
            executor.run_beside(
                "noise_scheduler", "tiny-sd15:scheduler", "init", [{**item, "state_key": "r2/l"}]
            ),
            timeout=30,
        )
    finally:
        executor._lock.release()
    assert seconds >= 0 and isinstance(outputs[0]["latents"], np.ndarray)
    assert executor.metrics.busy_s == busy + seconds  # counted busy, as the simulator counts it


def test_a_step_queued_while_its_state_is_replayed_goes_beside_the_new_holder() -> None:
    scheduler = Scheduler(CostModel(ProfileSet(DIRECTORY), load_batch_sizes(DIRECTORY)), max_in_flight=1)
    for worker in ("w0", "w1"):
        scheduler.add_worker(worker, host="h0")
    no_cfg = instantiate(SPEC, resolve_inputs(SPEC, {"prompt": "p", "steps": 3, "guidance_scale": 1.0}))
    scheduler.admit("r", "wf", no_cfg, 0.0)  # one UNet call a step
    request = scheduler._requests["r"]
    unet = None
    for _ in range(50):  # run until the first step is done and the next UNet call is running
        for dispatch in scheduler.schedule(0.0).dispatches:
            if dispatch.op == "unet" and any("step0" not in t.node.id for t in dispatch.tasks):
                unet = dispatch
            else:
                scheduler.complete(dispatch.batch_id, outputs_of(dispatch), 0.0, 0.01)
        if unet is not None:
            break
    assert unet is not None
    holder = next(iter(request.state_workers.values()))
    assert unet.worker_id != holder, "the scenario needs the UNet call away from the state's worker"
    scheduler.remove_worker(holder)  # the state goes: its init and the step taken are replayed
    assert scheduler.schedule(0.0).dispatches == []  # the replay waits: the only worker has no room
    scheduler.complete(unet.batch_id, outputs_of(unet), 0.0, 0.01)  # the next step is ready, held
    step = next(e for e in scheduler._ready if request.graph.nodes[e[1]].mode.endswith("step"))
    assert step not in scheduler._ready.ordered(lane_only=True)  # no worker holds its state yet
    replayed = scheduler.schedule(0.0).dispatches
    assert [d.mode for d in replayed] == ["init"] and replayed[0].worker_id == unet.worker_id
    assert step in scheduler._ready.ordered(lane_only=True)  # bound to the new holder at once


def test_the_placement_index_stays_small_under_the_baselines() -> None:
    simulator = Simulator({"wf": SPEC}, 2, ProfileSet(DIRECTORY), "static", load_batch_sizes(DIRECTORY))
    arrivals = [Arrival(i * 0.5, "wf", {"prompt": "p", "steps": 3}) for i in range(40)]
    assert simulator.run(arrivals).summary()["completed"] > 30
    assert len(simulator.scheduler._pools._wakes) <= 2  # woken workers leave the heap
