"""The scheduler core, driven directly with fake handles and explicit time."""

from lego.builtin_workflows import sd15_txt2img
from lego.graph import instantiate
from lego.request_inputs import resolve_inputs
from lego_coordinator.scheduler import (
    NodeStarted,
    RequestDone,
    RequestFailed,
    Scheduler,
    StepProgress,
)

SPEC = sd15_txt2img("wf", "tiny-sd15", default_size=128)


def graph(steps: int = 2, guidance: float = 7.5):
    return instantiate(
        SPEC, resolve_inputs(SPEC, {"prompt": "p", "steps": steps, "guidance_scale": guidance})
    )


def run_to_completion(scheduler: Scheduler, now: float = 0.0, limit: int = 1000):
    """Complete every dispatched batch at once, like instantly fast workers; returns all events."""
    events = []
    for _ in range(limit):
        dispatches, started = scheduler.schedule(now)
        events += started
        if not dispatches:
            break
        for dispatch in dispatches:
            outputs = {t.task_id: {o: f"h:{t.task_id}/{o}" for o in t.node.outputs} for t in dispatch.tasks}
            events += scheduler.complete(dispatch.batch_id, outputs, now)
    return events


def test_one_request_runs_to_done_with_progress() -> None:
    scheduler = Scheduler()
    scheduler.add_worker("w0")
    scheduler.submit("r1", graph(steps=3), 0.0)
    events = run_to_completion(scheduler)
    done = [e for e in events if isinstance(e, RequestDone)]
    assert len(done) == 1
    assert done[0].outputs == {"image": "h:r1/vae_3/image"}
    assert done[0].nodes_executed == 16
    assert [(e.step, e.total) for e in events if isinstance(e, StepProgress)] == [
        (1, 4),
        (2, 4),
        (3, 4),
        (4, 4),
    ]


def test_cfg_branches_of_a_step_are_batched_uncond_first() -> None:
    scheduler = Scheduler()
    scheduler.add_worker("w0")
    scheduler.submit("r1", graph(steps=1), 0.0)
    seen = []
    for _ in range(20):
        dispatches, _ = scheduler.schedule(0.0)
        if not dispatches:
            break
        for d in dispatches:
            seen.append((d.op, [t.node.id for t in d.tasks]))
            scheduler.complete(
                d.batch_id, {t.task_id: {o: "h" for o in t.node.outputs} for t in d.tasks}, 0.0
            )
    assert ("unet", ["denoise_loop_2/step0/uncond", "denoise_loop_2/step0/cond"]) in seen
    # both text encodes are ready together and batch too
    assert seen[0] == ("text_encoder", ["text_encoder_0", "text_encoder_1"])


def test_batch_limit_splits_branches() -> None:
    scheduler = Scheduler(max_batch=lambda op, model, mode: 1)
    scheduler.add_worker("w0")
    scheduler.submit("r1", graph(steps=1), 0.0)
    sizes = []
    for _ in range(20):
        dispatches, _ = scheduler.schedule(0.0)
        if not dispatches:
            break
        for d in dispatches:
            sizes.append(len(d.tasks))
            scheduler.complete(
                d.batch_id, {t.task_id: {o: "h" for o in t.node.outputs} for t in d.tasks}, 0.0
            )
    assert set(sizes) == {1}


def test_earlier_requests_go_first() -> None:
    scheduler = Scheduler(max_batch=lambda op, model, mode: 1)
    scheduler.add_worker("w0")
    scheduler.submit("early", graph(), 0.0)
    scheduler.submit("late", graph(), 1.0)
    dispatches, _ = scheduler.schedule(2.0)
    assert [t.request_id for t in dispatches[0].tasks] == ["early"]


def test_requests_share_batches_of_the_same_model() -> None:
    scheduler = Scheduler()
    scheduler.add_worker("w0")
    scheduler.submit("a", graph(), 0.0)
    scheduler.submit("b", graph(), 0.0)
    dispatches, _ = scheduler.schedule(0.0)
    assert dispatches[0].op == "text_encoder"
    assert sorted({t.request_id for t in dispatches[0].tasks}) == ["a", "b"]


def test_scheduler_state_stays_on_the_worker_that_initialised_it() -> None:
    scheduler = Scheduler()
    for worker in ("w0", "w1", "w2"):
        scheduler.add_worker(worker)
    scheduler.submit("r1", graph(steps=4), 0.0)
    placements: dict[str, set[str]] = {}
    for _ in range(100):
        dispatches, _ = scheduler.schedule(0.0)
        if not dispatches:
            break
        for d in dispatches:
            placements.setdefault(d.op, set()).add(d.worker_id)
            scheduler.complete(
                d.batch_id, {t.task_id: {o: "h" for o in t.node.outputs} for t in d.tasks}, 0.0
            )
    assert len(placements["noise_scheduler"]) == 1


def test_a_worker_runs_one_batch_at_a_time() -> None:
    scheduler = Scheduler()
    scheduler.add_worker("w0")
    scheduler.submit("a", graph(), 0.0)
    first, _ = scheduler.schedule(0.0)
    second, _ = scheduler.schedule(0.0)
    assert len(first) == 1
    assert second == []


def test_removed_worker_requeues_its_batch_and_stale_completions_are_ignored() -> None:
    scheduler = Scheduler()
    scheduler.add_worker("w0")
    scheduler.submit("a", graph(), 0.0)
    (lost,), _ = scheduler.schedule(0.0)
    assert scheduler.remove_worker("w0") == []  # no scheduler state held yet: nothing fails
    scheduler.add_worker("w1")
    (retry,), started = scheduler.schedule(1.0)
    assert [t.task_id for t in retry.tasks] == [t.task_id for t in lost.tasks]
    assert started[0] == NodeStarted("a", "text_encoder_0", "w1")
    assert scheduler.complete(lost.batch_id, {}, 2.0) == []


def test_losing_the_worker_with_scheduler_state_fails_the_request_retryably() -> None:
    scheduler = Scheduler()
    scheduler.add_worker("w0")
    scheduler.submit("a", graph(), 0.0)
    for _ in range(3):  # text encode, then scheduler init (binds the state to w0)
        (d,), _ = scheduler.schedule(0.0)
        scheduler.complete(d.batch_id, {t.task_id: {o: "h" for o in t.node.outputs} for t in d.tasks}, 0.0)
    events = scheduler.remove_worker("w0")
    assert len(events) == 1 and isinstance(events[0], RequestFailed) and events[0].retryable


def test_failed_batch_fails_its_requests_and_cancel_drops_queued_nodes() -> None:
    scheduler = Scheduler()
    scheduler.add_worker("w0")
    scheduler.submit("a", graph(), 0.0)
    scheduler.submit("b", graph(), 0.0)
    (d,), _ = scheduler.schedule(0.0)
    events = scheduler.fail_batch(d.batch_id, "boom")
    assert {e.request_id for e in events} == {"a", "b"}
    assert all(isinstance(e, RequestFailed) and "boom" in e.message for e in events)
    assert scheduler.ready_count() == 0
