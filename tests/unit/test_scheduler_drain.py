"""Draining a worker (scale-down) in the scheduler core: no new work, state kept, then drained."""

from __future__ import annotations

from lego_coordinator.scheduler import RequestDone, RequestFailed

from tests.unit.test_scheduler import drain, graph, make, outputs_of, step


def test_a_draining_worker_gets_no_new_work_and_is_drained_when_idle() -> None:
    scheduler = make(workers=2)
    scheduler.drain_worker("w1")
    assert scheduler.draining_workers() == {"w1"}
    scheduler.admit("a", "wf", graph(steps=3), 0.0)
    scheduler.admit("b", "wf", graph(steps=3), 0.0)
    events, dispatched = drain(scheduler)
    assert {d.worker_id for d in dispatched} == {"w0"}
    assert sum(isinstance(e, RequestDone) for e in events) == 2
    assert scheduler.drained("w1")
    assert not scheduler.drained("w0")  # not draining at all


def test_a_draining_worker_keeps_the_scheduler_state_it_holds_until_its_requests_finish() -> None:
    scheduler = make(workers=2)
    scheduler.admit("a", "wf", graph(steps=4), 0.0)
    ran: list[tuple[str, str]] = []
    while not any(node == "denoise_loop_2/step0/scheduler" for node, _ in ran):
        ran += [(t.node.id, d.worker_id) for d in step(scheduler) for t in d.tasks]
    holder = next(worker for node, worker in ran if node == "denoise_loop_2/init")
    other = "w0" if holder == "w1" else "w1"
    scheduler.drain_worker(holder)
    assert not scheduler.drained(holder)  # it still holds request a's scheduler state
    scheduler.admit("b", "wf", graph(steps=2), 0.0)
    events, dispatched = drain(scheduler)
    placed = {(t.request_id, t.node.op, d.worker_id) for d in dispatched for t in d.tasks}
    # only a's scheduler steps still go to the draining worker: nothing replayed, b never goes there
    assert {(r, op) for r, op, w in placed if w == holder} == {("a", "noise_scheduler")}
    assert ("b", "noise_scheduler", other) in placed
    stateful = [
        t.node.id for d in dispatched for t in d.tasks if t.request_id == "a" and d.op == "noise_scheduler"
    ]
    assert "denoise_loop_2/init" not in stateful  # the state was not rebuilt
    assert sum(isinstance(e, RequestDone) for e in events) == 2
    assert not [e for e in events if isinstance(e, RequestFailed)]
    assert scheduler.drained(holder)
    assert scheduler.remove_worker(holder) == []  # leaving now requeues nothing


def test_a_draining_worker_with_a_batch_in_flight_is_not_drained_until_it_reports() -> None:
    scheduler = make(workers=1)
    scheduler.admit("a", "wf", graph(), 0.0)
    first = scheduler.schedule(0.0).dispatches
    scheduler.drain_worker("w0")
    assert not scheduler.drained("w0")
    assert scheduler.schedule(0.0).dispatches == []  # nothing new while draining
    scheduler.add_worker("w1", host="h0")
    for dispatch in first:
        scheduler.complete(dispatch.batch_id, outputs_of(dispatch), 0.0, 0.01)
    # w0's init ran there; its state keeps w0 until request a finishes
    events, _ = drain(scheduler)
    assert sum(isinstance(e, RequestDone) for e in events) == 1
    assert scheduler.drained("w0")


def test_admission_counts_only_workers_that_are_not_draining() -> None:
    scheduler = make(workers=1, enforce_slo=True)
    scheduler.drain_worker("w0")
    admission = scheduler.admit("a", "wf", graph(), 0.0)
    assert not admission.accepted and "no workers" in admission.reason


def test_monolithic_draining_worker_finishes_its_request_and_takes_no_other() -> None:
    scheduler = make(workers=2, policy="clockwork")
    scheduler.admit("a", "wf", graph(), 0.0)
    first = scheduler.schedule(0.0).dispatches
    holder = first[0].worker_id
    scheduler.drain_worker(holder)
    scheduler.admit("b", "wf", graph(), 0.0)
    for dispatch in first:
        scheduler.complete(dispatch.batch_id, outputs_of(dispatch), 0.0, 0.01)
    events, dispatched = drain(scheduler)
    by_request = {t.request_id: d.worker_id for d in dispatched for t in d.tasks}
    assert by_request["a"] == holder and by_request["b"] != holder
    assert sum(isinstance(e, RequestDone) for e in events) == 2
    assert scheduler.drained(holder)


def test_queue_depth_per_model() -> None:
    scheduler = make(workers=0)
    scheduler.admit("a", "wf", graph(), 0.0)
    scheduler.admit("b", "wf", graph(), 0.0)
    depth = scheduler.ready_by_model()
    assert depth == {"tiny-sd15:text_encoder": 4, "tiny-sd15:scheduler": 2}
