"""The scheduler core, driven directly with explicit time and fake tensor handles."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import pytest
from lego.builtin_workflows import flux_txt2img, sd15_txt2img
from lego.graph import TaskNode, instantiate
from lego.profiles import ProfileSet, default_profile_dir, load_batch_sizes
from lego.request_inputs import resolve_inputs
from lego_coordinator.costs import DEFAULT_BATCH, CostModel
from lego_coordinator.scheduler import (
    PRELOAD_BACKLOG_S,
    BatchTask,
    Decisions,
    Dispatch,
    NodeStarted,
    Pending,
    RequestDone,
    RequestFailed,
    Scheduler,
    StepProgress,
    Tensor,
    apportion,
)

SPEC = sd15_txt2img("wf", "tiny-sd15", default_size=128)
OTHER = sd15_txt2img("other", "tiny-sd15", default_size=128)


def costs() -> CostModel:
    directory = default_profile_dir()
    return CostModel(ProfileSet(directory), load_batch_sizes(directory))


def graph(steps: int = 2, guidance: float = 7.5, spec=SPEC):  # type: ignore[no-untyped-def]
    return instantiate(
        spec, resolve_inputs(spec, {"prompt": "p", "steps": steps, "guidance_scale": guidance})
    )


def outputs_of(dispatch: Dispatch, host: str = "h0") -> dict[str, dict[str, Tensor]]:
    return {
        t.task_id: {o: Tensor(f"h:{t.task_id}/{o}", 1024, host) for o in t.node.outputs}
        for t in dispatch.tasks
    }


def drain(scheduler: Scheduler, now: float = 0.0, limit: int = 2000) -> tuple[list, list[Dispatch]]:
    """Complete every dispatched batch at once (instantly fast workers); all events and dispatches."""
    events: list = []
    dispatched: list[Dispatch] = []
    for _ in range(limit):
        decisions = scheduler.schedule(now)
        events += decisions.events
        if not decisions.dispatches:
            break
        for dispatch in decisions.dispatches:
            dispatched.append(dispatch)
            events += scheduler.complete(dispatch.batch_id, outputs_of(dispatch), now, 0.01)
    return events, dispatched


def step(scheduler: Scheduler, now: float = 0.0, host: str = "h0") -> list[Dispatch]:
    """One scheduling round whose batches all complete at once."""
    dispatches = scheduler.schedule(now).dispatches
    for dispatch in dispatches:
        scheduler.complete(dispatch.batch_id, outputs_of(dispatch, host), now, 0.01)
    return dispatches


def make(workers: int = 1, **kwargs) -> Scheduler:  # type: ignore[no-untyped-def]
    scheduler = Scheduler(costs(), **kwargs)
    for index in range(workers):
        scheduler.add_worker(f"w{index}", host="h0")
    return scheduler


# ---- the request lifecycle ----


def test_one_request_runs_to_done_with_progress_and_execution_time() -> None:
    scheduler = make()
    assert scheduler.admit("r1", "wf", graph(steps=3), 0.0).accepted
    events, _ = drain(scheduler)
    done = [e for e in events if isinstance(e, RequestDone)]
    assert len(done) == 1
    assert done[0].outputs == {"image": "h:r1/vae_3/image"}
    assert done[0].nodes_executed == 16
    assert done[0].execution_s > 0
    assert [(e.step, e.total) for e in events if isinstance(e, StepProgress)] == [
        (1, 4),
        (2, 4),
        (3, 4),
        (4, 4),
    ]


def test_on_one_worker_cfg_branches_and_both_prompts_are_batched_uncond_first() -> None:
    scheduler = make(workers=1)
    scheduler.admit("r1", "wf", graph(steps=1), 0.0)
    _, dispatched = drain(scheduler)
    groups = [(d.op, [t.node.id for t in d.tasks]) for d in dispatched]
    assert groups[0] == ("text_encoder", ["text_encoder_0", "text_encoder_1"])
    assert ("unet", ["denoise_loop_2/step0/uncond", "denoise_loop_2/step0/cond"]) in groups


def test_idle_workers_run_the_cfg_branches_side_by_side() -> None:
    scheduler = make(workers=2)
    scheduler.admit("r1", "wf", graph(steps=1), 0.0)
    assert sorted(d.op for d in step(scheduler)) == ["noise_scheduler", "text_encoder"]  # both ready at once
    branches = scheduler.schedule(0.0).dispatches
    assert [len(d.tasks) for d in branches] == [1, 1]
    assert {d.worker_id for d in branches} == {"w0", "w1"}


def test_under_load_requests_share_batches_across_workflows() -> None:
    scheduler = make(workers=1)
    scheduler.admit("a", "wf", graph(), 0.0)
    scheduler.admit("b", "other", graph(spec=OTHER), 0.0)
    first = scheduler.schedule(0.0).dispatches[0]
    assert first.op == "text_encoder"
    assert sorted({t.request_id for t in first.tasks}) == ["a", "b"]


def test_throughput_mode_batches_grow_when_ready_work_outnumbers_workers() -> None:
    scheduler = make(workers=1)
    for index in range(12):
        scheduler.admit(f"r{index}", "wf", graph(), 0.0)
    # 24 ready text encodes, one worker: CLIP_SD15 throughput mode (32) instead of latency mode (16)
    first = scheduler.schedule(0.0).dispatches[0]
    assert len(first.tasks) == 24


def test_a_model_that_gains_nothing_from_batching_is_never_batched() -> None:
    # FLUX.1-schnell's transformer is not in model_batch.json: its sizes come from its profile,
    # (1, 1), not a default that made eight requests' steps wait on one call eight times as long.
    spec = flux_txt2img("flux", "black-forest-labs/FLUX.1-schnell")
    scheduler = make(workers=1)
    for index in range(12):
        scheduler.admit(f"r{index}", "flux", instantiate(spec, resolve_inputs(spec, {"prompt": "p"})), 0.0)
    denoiser_batches = [len(d.tasks) for d in drain(scheduler)[1] if d.tasks[0].node.op == "transformer"]
    assert denoiser_batches and set(denoiser_batches) == {1}


def test_batch_sizes_come_from_the_table_then_the_profile_curve_then_a_default() -> None:
    def node(model: str, op: str = "transformer", mode: str = "denoise_flux") -> TaskNode:
        return TaskNode("n", op, model, mode, {}, ("out",))

    model = costs()
    table = load_batch_sizes(default_profile_dir())
    dev = table["Flux1Dev"]
    assert model.batch_limits(node("black-forest-labs/FLUX.1-dev:transformer")) == dev
    # a stack whose members are all listed: the smallest of their sizes
    stack = node("black-forest-labs/FLUX.1-dev:text_encoders", "text_encoder", "encode_pooled")
    clip, t5 = table["CLIP_Flux"], table["T5_Flux"]
    assert model.batch_limits(stack) == (min(clip[0], t5[0]), min(clip[1], t5[1]))
    # not listed: read off its profile, per mode
    assert model.batch_limits(node("black-forest-labs/FLUX.1-schnell:transformer")) == (1, 1)
    vae = "black-forest-labs/FLUX.1-schnell:vae"
    assert model.batch_limits(node(vae, "vae", "decode_packed")) == (2, 2)
    assert model.batch_limits(node("profile:NoSuchModel", "unet", "denoise")) == DEFAULT_BATCH


def test_earlier_requests_go_first() -> None:
    scheduler = make(workers=1)
    scheduler.admit("early", "wf", graph(), 0.0)
    scheduler.admit("late", "wf", graph(guidance=1.0), 1.0)  # guidance 1: no negative prompt, one encode
    dispatches = scheduler.schedule(2.0).dispatches
    assert dispatches[0].tasks[0].request_id == "early"


# ---- placement by cost ----


def test_a_batch_goes_where_its_model_is_already_loaded() -> None:
    scheduler = Scheduler(costs())
    scheduler.add_worker("cold", host="h0")
    scheduler.add_worker("warm", host="h0", loaded=["tiny-sd15:text_encoder"])
    scheduler.admit("r", "wf", graph(), 0.0)
    assert scheduler.schedule(0.0).dispatches[0].worker_id == "warm"


def test_inputs_on_another_host_cost_a_transfer() -> None:
    scheduler = Scheduler(costs())
    scheduler.add_worker("far", host="h1", loaded=["tiny-sd15:scheduler", "tiny-sd15:text_encoder"])
    scheduler.add_worker("near", host="h0", loaded=["tiny-sd15:scheduler", "tiny-sd15:text_encoder"])
    scheduler.admit("r", "wf", graph(guidance=1.0), 0.0)  # no CFG: one denoiser call a step
    for dispatch in scheduler.schedule(0.0).dispatches:  # text encode and scheduler init
        held_on = "h0" if dispatch.op == "text_encoder" else ("h0" if dispatch.worker_id == "near" else "h1")
        big = {t.task_id: {o: Tensor("x", 10**9, held_on) for o in t.node.outputs} for t in dispatch.tasks}
        scheduler.complete(dispatch.batch_id, big, 0.0, 0.01)
    denoiser = scheduler.schedule(0.0).dispatches  # its 1 GB inputs live on h0
    assert [(d.op, d.worker_id) for d in denoiser if not d.side_lane] == [("unet", "near")]


def test_queued_work_counts_and_a_worker_takes_at_most_two_batches() -> None:
    scheduler = make(workers=1)
    for index in range(3):
        scheduler.admit(f"r{index}", "wf", graph(), 0.0)
    first = scheduler.schedule(0.0).dispatches
    # all six text encodes in one batch; the scheduler inits wait for the worker to free (an init
    # binds its request's noise-scheduler state to a worker with room), then run beside its queue
    assert [(d.op, len(d.tasks), d.side_lane) for d in first] == [("text_encoder", 6, False)]
    # from then on the worker's queue never holds more than two batches, whatever runs beside it
    queued, side = {first[0].batch_id}, {d.batch_id for d in first[1:]}
    waiting = list(first)
    while waiting:
        done = waiting.pop(0)
        (side if done.side_lane else queued).discard(done.batch_id)
        scheduler.complete(done.batch_id, outputs_of(done), 0.0, 0.001)
        for dispatch in scheduler.schedule(0.0).dispatches:
            (side if dispatch.side_lane else queued).add(dispatch.batch_id)
            assert dispatch.side_lane == (dispatch.op == "noise_scheduler")
            waiting.append(dispatch)
        assert len(queued) <= 2
    assert scheduler.in_flight_requests() == 0


def test_a_busy_worker_takes_ready_work_only_when_it_frees() -> None:
    # Bound when a worker frees, the highest-priority work ready then takes it; queued behind a busy
    # worker's batch (ready depth 2), a later request's step took the place of the earlier
    # request's next step, not yet ready when the worker was filled.
    for depth, queued_early in ((1, False), (2, True)):
        scheduler = make(workers=1, ready_depth=depth)
        scheduler.admit("first", "wf", graph(), 0.0)
        running = scheduler.schedule(0.0).dispatches
        assert [d.op for d in running if not d.side_lane] == ["text_encoder"]
        scheduler.admit("second", "other", graph(spec=OTHER), 0.1)
        queued = [d for d in scheduler.schedule(0.1).dispatches if not d.side_lane]
        assert bool(queued) == queued_early
        if depth == 1:
            for dispatch in running:
                scheduler.complete(dispatch.batch_id, outputs_of(dispatch), 0.2, 0.1)
            taken = [d for d in scheduler.schedule(0.2).dispatches if not d.side_lane]
            assert [d.op for d in taken] == ["text_encoder"] and taken[0].tasks[0].request_id == "second"


def test_a_worker_takes_its_next_batch_once_its_queue_ends_within_the_bind_ahead_time() -> None:
    # on a live cluster a batch reaches its worker a control-plane round trip after it is sent:
    # bound that long before the worker frees, it is there when the last one ends
    scheduler = make(workers=1, bind_ahead_s=0.01)
    scheduler.admit("first", "wf", graph(), 0.0)
    assert [d.op for d in scheduler.schedule(0.0).dispatches] == ["text_encoder"]
    end = scheduler._workers["w0"].busy_until
    scheduler.admit("second", "other", graph(spec=OTHER), 0.0)
    assert not [d for d in scheduler.schedule(end - 0.02).dispatches if not d.side_lane]
    bound = [d for d in scheduler.schedule(end - 0.005).dispatches if not d.side_lane]
    assert [(d.op, d.tasks[0].request_id) for d in bound] == [("text_encoder", "second")]
    # without one (a simulation without --overhead-ms), it waits for the worker to free
    scheduler = make(workers=1, bind_ahead_s=0.0)
    scheduler.admit("first", "wf", graph(), 0.0)
    scheduler.schedule(0.0)
    scheduler.admit("second", "other", graph(spec=OTHER), 0.0)
    end = scheduler._workers["w0"].busy_until
    assert not [d for d in scheduler.schedule(end - 0.001).dispatches if not d.side_lane]


def test_scheduler_state_stays_on_the_worker_that_initialised_it() -> None:
    scheduler = make(workers=3)
    scheduler.admit("r1", "wf", graph(steps=4), 0.0)
    _, dispatched = drain(scheduler)
    assert len({d.worker_id for d in dispatched if d.op == "noise_scheduler"}) == 1


def test_hot_models_are_preloaded_on_idle_workers_before_their_work_is_ready() -> None:
    scheduler = make(workers=6)
    for index in range(3):  # 3 requests x 42 UNet calls x 17 ms: ~2 s of UNet work pending
        scheduler.admit(f"r{index}", "wf", graph(steps=20), 0.0)
    decisions = scheduler.schedule(0.0)
    assert all(d.op != "unet" for d in decisions.dispatches)  # no UNet work is ready yet ...
    assert {p.model for p in decisions.preloads} == {"tiny-sd15:unet"}  # ... but the UNet is loading
    preloaded = {p.worker_id for p in decisions.preloads}  # on workers with nothing queued
    assert preloaded and not preloaded & {d.worker_id for d in decisions.dispatches if not d.side_lane}


def test_a_model_in_steady_demand_is_scaled_out_before_a_backlog_builds() -> None:
    unet = "tiny-sd15:unet"

    def preloads_after(history: bool) -> set[str]:
        scheduler = Scheduler(costs())
        scheduler.add_worker("w0", host="h0", loaded=[unet])  # the one replica
        for index in range(1, 4):
            scheduler.add_worker(f"w{index}", host="h0")
        if history:  # 6 s of 12 requests a second, each done (here: cancelled) at once
            for index in range(72):
                scheduler.admit(f"past{index}", "wf", graph(), index / 12)
                scheduler.cancel(f"past{index}")
                scheduler.release(f"past{index}")
        for index in range(2):  # two requests open: 0.17 s of UNet work, no backlog
            scheduler.admit(f"now{index}", "wf", graph(), 6.0)
        return {p.model for p in scheduler.schedule(6.0).preloads}

    # about 0.7 s of UNet work admitted per second lately: more than half of its one replica
    assert unet in preloads_after(history=True)
    assert unet not in preloads_after(history=False)


def test_a_model_whose_ready_work_keeps_waiting_for_its_busy_holders_is_scaled_out() -> None:
    # e.g. FLUX.1's text encoders on the one worker that also runs transformer steps: little work,
    # but every request's first step waits behind a transformer step (simulated RS 8: 0.85 → 0.95)
    unet = "tiny-sd15:unet"

    def preloads_after(waited_s: float) -> set[str]:
        scheduler = Scheduler(costs())
        scheduler.add_worker("w0", host="h0", loaded=[unet])
        scheduler.add_worker("w1", host="h0")
        for index in range(2):  # two requests open: no backlog, no demand to speak of
            scheduler.admit(f"r{index}", "wf", graph(), 0.0)
        rounds = int(waited_s * 10) + 1
        for index in range(rounds):  # rounds 0.1 s apart that each left UNet work waiting
            scheduler._count_holder_waits(index / 10, Counter({unet: 1}))
        return {p.model for p in scheduler.schedule(rounds / 10).preloads}

    worth = max(PRELOAD_BACKLOG_S, costs().load_s(unet))
    assert unet in preloads_after(waited_s=worth * 1.2)  # waiting cost more than a load: one pays
    assert unet not in preloads_after(waited_s=worth * 0.5)


# ---- admission, deadlines, cancellation ----


def test_admission_rejects_what_cannot_meet_its_slo_and_names_the_estimate() -> None:
    scheduler = make(workers=1, enforce_slo=True)
    standalone = scheduler.costs.standalone_s(graph())
    first = scheduler.admit("r0", "wf", graph(), 0.0)
    assert first.accepted and first.deadline == pytest.approx(2 * standalone)
    admitted = 1
    while scheduler.admit(f"r{admitted}", "wf", graph(), 0.0).accepted:
        admitted += 1
    rejected = scheduler.admit("one-more", "wf", graph(), 0.0)
    assert not rejected.accepted and "cannot meet its SLO: estimated" in rejected.reason
    # one worker: a second request's estimate (the first one's work, then its own) is its SLO,
    # within the admission headroom; a third one's is 1.5 times it
    assert admitted == 2


def test_a_few_batches_caught_in_a_host_stall_do_not_move_the_learned_costs() -> None:
    model = costs()
    node = next(n for n in graph().nodes.values() if n.op == "unet")
    for seconds in (0.05, 0.05, 0.05, 0.05, 2.05, 2.05, 2.05, 2.05, 0.05):
        model.observe(node, 1, seconds)
    assert model.exec_s(node) == pytest.approx(0.05)
    for _ in range(5):  # but a lasting change is followed
        model.observe(node, 1, 0.2)
    assert model.exec_s(node) == pytest.approx(0.2)


def test_overrun_estimates_cannot_refuse_every_request() -> None:
    scheduler = make(workers=1, enforce_slo=True)
    slo = 2 * scheduler.costs.standalone_s(graph())
    for node in graph().nodes.values():
        scheduler.costs.observe(node, 1, slo)  # every model measured far slower than it is
    alone = scheduler.admit("alone", "wf", graph(), 0.0, slo_s=slo)
    assert alone.accepted and alone.estimate_s > slo  # the cluster is idle: it runs, and is measured
    assert not scheduler.admit("behind-it", "wf", graph(), 0.0, slo_s=slo).accepted


def test_a_request_may_bring_its_own_slo() -> None:
    scheduler = make(workers=1, enforce_slo=True)
    tight = scheduler.admit("tight", "wf", graph(), 0.0, slo_s=1e-6)
    assert not tight.accepted and tight.unmeetable and "idle worker" in tight.reason
    assert scheduler.admit("loose", "wf", graph(), 0.0, slo_s=60).deadline == 60


def test_without_workers_admission_says_so() -> None:
    scheduler = Scheduler(costs(), enforce_slo=True)
    assert scheduler.admit("r", "wf", graph(), 0.0).reason == "no workers are serving"


def test_requests_past_their_deadline_are_dropped() -> None:
    scheduler = make(workers=1, policy="static", enforce_slo=True)
    admission = scheduler.admit("late", "wf", graph(), 0.0)
    events = scheduler.schedule(admission.deadline + 0.1).events
    assert [(e.request_id, e.code) for e in events if isinstance(e, RequestFailed)] == [("late", "deadline")]


def test_without_enforcement_nothing_is_rejected_or_dropped() -> None:
    scheduler = make(workers=1)
    for index in range(50):
        assert scheduler.admit(f"r{index}", "wf", graph(), 0.0).deadline == math.inf
    assert not [e for e in scheduler.schedule(1e9).events if isinstance(e, RequestFailed)]


def test_cancel_drops_queued_nodes() -> None:
    scheduler = make(workers=1)
    scheduler.admit("a", "wf", graph(), 0.0)
    (event,) = scheduler.cancel("a")
    assert isinstance(event, RequestFailed) and event.code == "cancelled"
    assert scheduler.ready_count() == 0
    assert scheduler.schedule(0.0).dispatches == []


def test_failed_batch_fails_its_requests() -> None:
    scheduler = make(workers=1)
    scheduler.admit("a", "wf", graph(), 0.0)
    scheduler.admit("b", "wf", graph(), 0.0)
    d = scheduler.schedule(0.0).dispatches[0]  # the text encodes of both
    events = scheduler.fail_batch(d.batch_id, "boom")
    assert {e.request_id for e in events} == {"a", "b"}
    assert all(isinstance(e, RequestFailed) and "boom" in e.message for e in events)


# ---- worker failure ----


def test_removed_worker_requeues_its_batch_and_stale_completions_are_ignored() -> None:
    scheduler = make(workers=1)
    scheduler.admit("a", "wf", graph(), 0.0)
    lost = scheduler.schedule(0.0).dispatches
    scheduler.remove_worker("w0")
    scheduler.add_worker("w1", host="h0")
    decisions = scheduler.schedule(1.0)
    tasks = lambda dispatches: sorted(t.task_id for d in dispatches for t in d.tasks)  # noqa: E731
    assert tasks(decisions.dispatches) == tasks(lost)
    assert NodeStarted("a", "text_encoder_0", "w1") in decisions.events
    assert all(scheduler.complete(d.batch_id, {}, 2.0) == [] for d in lost)


def test_losing_the_worker_with_scheduler_state_replays_it_elsewhere_and_completes() -> None:
    scheduler = make(workers=1)
    scheduler.admit("a", "wf", graph(steps=3), 0.0)
    ran: list[str] = []
    while "denoise_loop_2/step0/scheduler" not in ran:
        ran += [t.node.id for d in step(scheduler) for t in d.tasks]
    scheduler.remove_worker("w0")
    scheduler.add_worker("w1", host="h0")
    events, dispatched = drain(scheduler)
    stateful = [t.node.id for d in dispatched for t in d.tasks if d.op == "noise_scheduler"]
    # the new worker first rebuilds the scheduler state: init, then the steps already taken, then on
    assert stateful[:3] == [
        "denoise_loop_2/init",
        "denoise_loop_2/step0/scheduler",
        "denoise_loop_2/step1/scheduler",
    ]
    assert {d.worker_id for d in dispatched} == {"w1"}
    done = [e for e in events if isinstance(e, RequestDone)]
    assert len(done) == 1 and done[0].nodes_executed == 16
    assert not [e for e in events if isinstance(e, RequestFailed)]


# ---- monolithic baselines ----


def test_static_pins_each_workflow_to_its_share_and_runs_one_request_at_a_time() -> None:
    scheduler = make(workers=2, policy="static")
    scheduler.admit("a1", "wf", graph(), 0.0)
    scheduler.admit("a2", "wf", graph(), 0.0)
    scheduler.admit("b1", "other", graph(spec=OTHER), 0.0)
    decisions: Decisions = scheduler.schedule(0.0)
    assignments = {t.request_id: d.worker_id for d in decisions.dispatches for t in d.tasks}
    assert assignments == {"b1": "w0", "a1": "w1"}  # workflows sorted: other → w0, wf → w1; a2 waits
    events: list = []
    for dispatch in decisions.dispatches:
        events += scheduler.complete(dispatch.batch_id, outputs_of(dispatch), 0.0, 0.01)
    more, dispatched = drain(scheduler)
    events += more
    assert sum(isinstance(e, RequestDone) for e in events) == 3
    assert all(len({t.request_id for t in d.tasks}) == 1 for d in dispatched)  # never cross-request


def test_clockwork_runs_any_workflow_on_any_free_worker_preferring_loaded_models() -> None:
    scheduler = Scheduler(costs(), policy="clockwork")
    scheduler.add_worker("w0", host="h0")
    # a monolithic deployment: workflow wf's own private copies of its models
    scheduler.add_worker("w1", host="h0", loaded=["tiny-sd15#wf:text_encoder", "tiny-sd15#wf:unet"])
    scheduler.add_worker("w2", host="h0", loaded=["tiny-sd15:text_encoder", "tiny-sd15:unet"])
    scheduler.admit("a", "wf", graph(), 0.0)
    [dispatch] = scheduler.schedule(0.0).dispatches
    assert dispatch.worker_id == "w1" and dispatch.model == "tiny-sd15#wf:text_encoder"


def test_shepherd_splits_workers_by_the_observed_mix() -> None:
    assert apportion({"a": 9, "b": 1}, ["w0", "w1", "w2", "w3"]) == {"a": ["w0", "w1", "w2"], "b": ["w3"]}
    assert apportion({"a": 1, "b": 1}, ["w0", "w1", "w2", "w3"]) == {"a": ["w0", "w1"], "b": ["w2", "w3"]}
    assert apportion({"a": 1, "b": 1, "c": 1}, ["w0", "w1"]) == {"a": ["w0"], "b": ["w1"], "c": ["w0"]}


def test_unknown_policy_is_named() -> None:
    with pytest.raises(ValueError, match="policy must be one of"):
        Scheduler(policy="fastest")


# ---- tensor GC ----


def test_tensors_are_dead_once_their_last_reader_finishes_but_outputs_and_replay_inputs_stay() -> None:
    scheduler = make(workers=1)
    scheduler.admit("r", "wf", graph(steps=2), 0.0)
    drain(scheduler)
    dead = set(scheduler.take_dead_tensors())
    assert "h:r/text_encoder_0/embeddings" in dead  # read by every UNet call, then gone
    assert "h:r/denoise_loop_2/init/model_input" in dead
    assert "h:r/denoise_loop_2/step2/scheduler/latents" in dead  # read by the VAE only
    assert "h:r/vae_3/image" not in dead  # a workflow output: freed when the client has it
    assert "h:r/denoise_loop_2/step0/cond/noise_pred" not in dead  # kept to rebuild scheduler state
    assert scheduler.take_dead_tensors() == []


# ---- deferred inputs (ControlNet residuals) ----


def controlnet_graph():  # type: ignore[no-untyped-def]
    from lego.builtin_workflows import sd15_controlnet

    spec = sd15_controlnet("cn", "tiny-sd15", default_size=128)
    return instantiate(spec, resolve_inputs(spec, {"prompt": "p", "steps": 1, "control_image": "a.png"}))


def controlnet_started(streaming: frozenset[str]) -> tuple[Scheduler, dict[str, Dispatch]]:
    """Four idle workers (streaming those calls) run a ControlNet request; every batch but the
    ControlNets completes at once: they stay running."""
    scheduler = Scheduler(costs())
    for index in range(4):
        scheduler.add_worker(f"w{index}", host="h0", streaming=streaming)
    scheduler.admit("r", "cn", controlnet_graph(), 0.0)
    started: dict[str, Dispatch] = {}
    for _ in range(4):
        for dispatch in scheduler.schedule(0.0).dispatches:
            for task in dispatch.tasks:
                started[task.node.id] = dispatch
            if dispatch.op != "controlnet":
                scheduler.complete(dispatch.batch_id, outputs_of(dispatch), 0.0, 0.01)
    return scheduler, started


def test_a_denoiser_waiting_for_whole_residuals_queues_behind_its_controlnet() -> None:
    _, started = controlnet_started(frozenset())  # residuals travel whole: nothing to gain beside
    controlnet = started["denoise_loop_3/step0/cond/controlnet"]
    assert started["denoise_loop_3/step0/cond"].worker_id == controlnet.worker_id


def test_a_denoiser_starts_beside_its_running_controlnet_with_pending_residuals() -> None:
    from lego_coordinator.scheduler import Pending

    controlnet_call = f"controlnet.{controlnet_graph().nodes['denoise_loop_3/step0/cond/controlnet'].mode}"
    scheduler, started = controlnet_started(frozenset({controlnet_call}))  # its residuals stream
    controlnet = started["denoise_loop_3/step0/cond/controlnet"]
    denoiser = started["denoise_loop_3/step0/cond"]  # dispatched although its residuals are not made yet
    assert controlnet.batch_id in scheduler._in_flight  # still running
    task = next(t for t in denoiser.tasks if t.node.id == "denoise_loop_3/step0/cond")
    assert task.inputs["down_residuals"] == Pending("r/denoise_loop_3/step0/cond/controlnet/down_residuals")
    assert denoiser.worker_id != controlnet.worker_id  # side by side on another (idle) worker
    # the ControlNets report after their denoisers: the request still completes exactly once
    events: list = []
    for dispatch in {d.batch_id: d for d in started.values() if d.op == "controlnet"}.values():
        events += scheduler.complete(dispatch.batch_id, outputs_of(dispatch), 0.0, 0.01)
    more, _ = drain(scheduler)
    assert len([e for e in events + more if isinstance(e, RequestDone)]) == 1


def test_a_requeued_controlnet_makes_its_undispatched_denoiser_wait_again() -> None:
    scheduler = make(workers=1)
    scheduler.admit("r", "cn", controlnet_graph(), 0.0)
    for _ in range(6):
        decisions = scheduler.schedule(0.0)
        running = [d for d in decisions.dispatches if d.op == "controlnet"]
        for dispatch in decisions.dispatches:
            if dispatch.op != "controlnet":
                scheduler.complete(dispatch.batch_id, outputs_of(dispatch), 0.0, 0.01)
        if running:
            break
    scheduler.remove_worker("w0")  # the ControlNet goes back to the queue
    scheduler.add_worker("w1", host="h0")
    events, dispatched = drain(scheduler)
    ops = [d.op for d in dispatched]
    # the lost noise-scheduler state is replayed, then the ControlNets run again before their denoisers
    assert ops[:3] == ["noise_scheduler", "controlnet", "unet"]
    assert len([e for e in events if isinstance(e, RequestDone)]) == 1


def run_fifo(
    scheduler: Scheduler, limit: int = 500, unfinished: dict[str, int] | None = None
) -> list[Dispatch]:
    """Workers that run their batches in the order received, completing one head batch per round
    (round robin over the busy workers): what a chained batch relies on. Returns every dispatch."""
    queues: dict[str, list[Dispatch]] = defaultdict(list)
    made: dict[str, set[str]] = defaultdict(set)  # worker → "request/node" it ran
    dispatched: list[Dispatch] = []
    now = 0.0
    for _ in range(limit):
        for dispatch in scheduler.schedule(now).dispatches:
            queues[dispatch.worker_id].append(dispatch)
            dispatched.append(dispatch)
            if unfinished is not None:  # requests unfinished when it was sent
                unfinished[dispatch.batch_id] = scheduler.in_flight_requests()
        busy = sorted(w for w, q in queues.items() if q)
        if not busy:
            break
        now += 0.01
        for worker in busy:
            head = queues[worker].pop(0)
            for task in head.tasks:  # an input still being made is made here, before this batch
                for value in task.inputs.values():
                    if isinstance(value, Pending):
                        assert value.tensor_id.rsplit("/", 1)[0] in made[worker], (task.node.id, value)
            made[worker] |= {t.task_id for t in head.tasks}
            scheduler.complete(head.batch_id, outputs_of(head), now, 0.005)
    return dispatched


def chained(dispatched: list[Dispatch]) -> list[tuple[Dispatch, BatchTask]]:
    return [
        (d, t) for d in dispatched for t in d.tasks if any(isinstance(v, Pending) for v in t.inputs.values())
    ]


def warm(workers: int) -> Scheduler:
    """Workers that hold every model of the workflow (a node is chained only onto its model's holder)."""
    scheduler = make(workers=workers)
    for index in range(workers):
        scheduler.set_loaded(f"w{index}", sorted({n.model for n in graph().nodes.values()}))
    return scheduler


def test_under_light_load_a_successor_is_queued_behind_its_producer_on_the_same_worker() -> None:
    scheduler = warm(1)
    scheduler.admit("r1", "wf", graph(steps=3), 0.0)
    dispatched = run_fifo(scheduler)
    assert scheduler.in_flight_requests() == 0  # it completed
    placed = {t.node.id: d.worker_id for d in dispatched for t in d.tasks}
    assert len(placed) == len(graph(steps=3).nodes)  # every node ran once
    links = chained(dispatched)
    assert len(links) >= 2 * 3  # each step's denoiser calls and its scheduler step, at least
    for dispatch, task in links:
        for value in task.inputs.values():
            if isinstance(value, Pending):
                producer = value.tensor_id.split("/", 1)[1].rsplit("/", 1)[0]
                assert placed[producer] == dispatch.worker_id


def test_with_more_requests_than_workers_nothing_is_chained() -> None:
    scheduler = warm(1)
    for index, steps in enumerate((2, 2, 6)):  # the last one goes on alone for a while
        scheduler.admit(f"r{index}", "wf", graph(steps=steps), 0.0)
    unfinished: dict[str, int] = {}
    dispatched = run_fifo(scheduler, unfinished=unfinished)
    assert scheduler.in_flight_requests() == 0
    # while several requests share the worker, batches wait for the round trip (and may batch
    # together); chaining starts once the last request is alone
    assert {unfinished[d.batch_id] for d, _ in chained(dispatched)} == {1}
    assert any(len(d.tasks) > 2 for d in dispatched)  # requests batched together meanwhile


def test_a_chained_node_lost_with_its_worker_waits_again_for_its_producer() -> None:
    scheduler = warm(2)
    scheduler.admit("r1", "wf", graph(steps=2), 0.0)
    queues: dict[str, list[Dispatch]] = defaultdict(list)
    for _ in range(20):  # run until some worker holds a producer and a node chained behind it
        for dispatch in scheduler.schedule(0.0).dispatches:
            queues[dispatch.worker_id].append(dispatch)
        victim = next((w for w, q in queues.items() if chained(q)), None)
        if victim is not None:
            break
        worker = next(w for w, q in queues.items() if q)
        head = queues[worker].pop(0)
        scheduler.complete(head.batch_id, outputs_of(head), 0.0, 0.005)
    assert victim is not None
    held = queues.pop(victim)
    lost = {t.node.id for d in held for t in d.tasks}
    waiting = {t.node.id for _, t in chained(held)}
    held_state = victim in scheduler._requests["r1"].state_workers.values()  # then its init runs again
    scheduler.remove_worker(victim)
    assert scheduler.ready_count() == len(lost - waiting) + held_state  # the chained ones wait
    survivor = next(w for w in ("w0", "w1") if w != victim)
    queues[survivor] = []  # its batches completed above or were never sent
    redone = run_fifo(scheduler)
    assert scheduler.in_flight_requests() == 0
    assert lost <= {t.node.id for d in redone for t in d.tasks}
    assert all(d.worker_id == survivor for d in redone)
