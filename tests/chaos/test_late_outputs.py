"""A fault seen from the scheduler core: a request fails (one of its batches failed, e.g. its data
engine was SIGKILLed) while another of its batches still runs on another worker. The outputs that
batch publishes afterwards must be freed: the request's Free(request_id) has already run on the data
engines, so nobody else would (found by `lego chaos`: tensors left in the engine)."""

from __future__ import annotations

from lego.builtin_workflows import sd15_txt2img
from lego.graph import instantiate
from lego.profiles import ProfileSet, default_profile_dir, load_batch_sizes
from lego.request_inputs import resolve_inputs
from lego_coordinator.costs import CostModel
from lego_coordinator.scheduler import Dispatch, RequestFailed, Scheduler, Tensor

SPEC = sd15_txt2img("wf", "tiny-sd15", default_size=128)


def _scheduler() -> Scheduler:
    directory = default_profile_dir()
    scheduler = Scheduler(CostModel(ProfileSet(directory), load_batch_sizes(directory)))
    scheduler.add_worker("w0", host="h0")
    scheduler.add_worker("w1", host="h0")
    return scheduler


def _outputs(dispatch: Dispatch) -> dict[str, dict[str, Tensor]]:
    return {
        t.task_id: {o: Tensor(f"{t.task_id}/{o}", 1024, "h0") for o in t.node.outputs} for t in dispatch.tasks
    }


def _two_batches_of_one_request(scheduler: Scheduler) -> tuple[Dispatch, Dispatch]:
    graph = instantiate(SPEC, resolve_inputs(SPEC, {"prompt": "p", "steps": 2}))
    scheduler.admit("r", "wf", graph, 0.0)
    for _ in range(20):  # until the two CFG branches of a step run side by side on the two workers
        dispatches = scheduler.schedule(0.0).dispatches
        if len(dispatches) == 2:
            return dispatches[0], dispatches[1]
        for dispatch in dispatches:
            scheduler.complete(dispatch.batch_id, _outputs(dispatch), 0.0, 0.01)
    raise AssertionError("no two batches of the request ran at once")


def test_outputs_of_a_batch_that_ends_after_its_request_failed_are_freed() -> None:
    scheduler = _scheduler()
    failing, late = _two_batches_of_one_request(scheduler)
    scheduler.take_dead_tensors()
    events = scheduler.fail_batch(failing.batch_id, "AioRpcError: data engine unavailable")
    assert any(isinstance(e, RequestFailed) for e in events)
    late_outputs = _outputs(late)
    assert scheduler.complete(late.batch_id, late_outputs, 0.1, 0.01) == []
    published = {t.handle for produced in late_outputs.values() for t in produced.values()}
    assert published and published <= set(scheduler.take_dead_tensors())


def test_outputs_of_a_batch_that_ends_after_its_request_was_released_are_freed() -> None:
    scheduler = _scheduler()
    failing, late = _two_batches_of_one_request(scheduler)
    scheduler.fail_batch(failing.batch_id, "unavailable")
    scheduler.release("r")  # the gateway answered the failure and released the request
    scheduler.take_dead_tensors()
    late_outputs = _outputs(late)
    scheduler.complete(late.batch_id, late_outputs, 0.1, 0.01)
    published = {t.handle for produced in late_outputs.values() for t in produced.values()}
    assert published <= set(scheduler.take_dead_tensors())


def test_a_finished_request_keeps_its_outputs() -> None:
    """Only failed or forgotten requests: a done request's image is the client's to fetch."""
    scheduler = _scheduler()
    graph = instantiate(SPEC, resolve_inputs(SPEC, {"prompt": "p", "steps": 1}))
    scheduler.admit("r", "wf", graph, 0.0)
    image = None
    for _ in range(50):
        dispatches = scheduler.schedule(0.0).dispatches
        if not dispatches:
            break
        for dispatch in dispatches:
            outputs = _outputs(dispatch)
            scheduler.complete(dispatch.batch_id, outputs, 0.0, 0.01)
            image = next((t.handle for o in outputs.values() for n, t in o.items() if n == "image"), image)
    assert image is not None and image not in scheduler.take_dead_tensors()
