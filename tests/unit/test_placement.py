"""The scheduler's shortcuts for large clusters decide exactly as the plain computation would.

Placement prices only `WorkerPools.finalists`; batches that would wait for their model's holders are
told so before any worker is priced; a round forms its batches one at a time and stops looking once
no worker has room; chaining looks only at the workers changed since. Each is checked against the
plain computation (pricing every worker, forming and looking at every batch, chaining from every
worker), and the whole scheduler against itself with the shortcuts turned off:
the same dispatches, to the same workers, at the same times.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lego import native
from lego.profiles import ProfileSet, default_profile_dir, load_batch_sizes
from lego.traces import parse_synthetic
from lego_cli.workloads import assign_tenants, warmup_of, workload
from lego_coordinator import scheduler as core
from lego_coordinator.placement import WorkerPools
from lego_coordinator.ready_queue import COMPACT_AT, ReadyQueue
from lego_coordinator.ready_queue import Item as ReadyItem
from lego_coordinator.simulator import Arrival, Simulator

MODELS = ("unet", "vae", "controlnet")


@dataclass
class FakeWorker:
    index: int
    host: str
    busy_until: float
    loaded: set[str] = field(default_factory=set)


workers_strategy = st.lists(
    st.tuples(
        st.sampled_from(["h0", "h1", "h2"]),
        st.integers(0, 8).map(lambda quarter: quarter / 4),  # exact in binary: ties stay ties
        st.sets(st.sampled_from(MODELS)),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=500, deadline=None)
@given(
    workers_strategy,
    st.sampled_from(MODELS),
    st.integers(0, 4).map(lambda quarter: quarter / 4),
    st.sets(st.sampled_from(["h0", "h1", "h2"])),
    st.one_of(st.just(-math.inf), st.integers(0, 10).map(lambda quarter: quarter / 4)),
)
def test_the_cheapest_worker_is_always_among_the_finalists(
    specs: list[tuple[str, float, set[str]]], model: str, now: float, hosts: set[str], made_at: float
) -> None:
    workers = [FakeWorker(i, host, busy, loaded) for i, (host, busy, loaded) in enumerate(specs)]
    pools: WorkerPools[FakeWorker] = WorkerPools()
    pools.advance(now / 2)  # filed at an earlier time, then advanced: idle ones move over
    for worker in workers:
        pools.update(worker, True)
    pools.advance(now)
    transfer = {"h0": 0.0, "h1": 0.5, "h2": 0.25}  # moving the inputs to each host

    def key(worker: FakeWorker) -> tuple[float, float, int]:  # as Scheduler._place prices them
        load = 0.0 if model in worker.loaded else 1.5
        wait = max(0.0, worker.busy_until - now, made_at - now)
        idle_wait = max(0.0, made_at - max(now, worker.busy_until))
        return wait + load + transfer[worker.host] + 0.75, idle_wait, worker.index

    allowed = [w for w in workers if not hosts or w.host in hosts]
    finalists = pools.finalists(model, frozenset(hosts), made_at)
    assert {w.index for w in finalists} <= {w.index for w in allowed}
    if allowed:
        assert min(finalists, key=key) is min(allowed, key=key)
        assert len(finalists) <= 8 * len({w.host for w in allowed})
    else:
        assert finalists == []


def test_a_worker_refiled_with_other_work_or_without_room_moves_or_leaves() -> None:
    pools: WorkerPools[FakeWorker] = WorkerPools()
    pools.advance(0.0)
    a, b = FakeWorker(0, "h", 0.0, {"unet"}), FakeWorker(1, "h", 0.0)
    pools.update(a, True)
    pools.update(b, True)
    assert {w.index for w in pools.finalists("unet")} == {0}
    a.busy_until = 2.0  # a batch was queued on it
    pools.update(a, True)
    assert {w.index for w in pools.finalists("unet")} == {0, 1}  # b idle, a the holder with work
    pools.advance(2.0)  # its work has ended
    assert {w.index for w in pools.finalists("unet")} == {0}
    pools.update(a, False)  # no room
    assert {w.index for w in pools.finalists("unet")} == {1} and len(pools) == 1


def test_the_ready_queue_lists_by_priority_once_each() -> None:
    priority = {("r", "a"): (2,), ("r", "b"): (1,), ("r", "c"): (3,)}
    queue = ReadyQueue(priority.__getitem__)
    queue.update([("r", "a"), ("r", "b"), ("r", "c")])
    assert queue.ordered() == [("r", "b"), ("r", "a"), ("r", "c")]
    queue.discard(("r", "b"))
    assert queue.ordered() == [("r", "a"), ("r", "c")] and len(queue) == 2 and ("r", "b") not in queue
    queue.add(("r", "b"))  # re-added after removal: listed once
    queue.add(("r", "a"))  # already there
    assert queue.ordered() == [("r", "b"), ("r", "a"), ("r", "c")]
    queue.difference_update([("r", "a"), ("r", "c")])
    assert queue.ordered() == [("r", "b")] and bool(queue)


def test_the_ready_queue_stays_small_when_nobody_reads_it() -> None:
    queue = ReadyQueue(lambda entry: (int(entry[1]),), group=lambda entry: int(entry[1]) % 3)
    for index in range(10_000):  # as under the monolithic baselines: added and taken, never listed
        queue.add(("r", str(index)))
        if index >= 5:
            queue.discard(("r", str(index - 5)))
    assert len(queue) == 5
    assert sum(len(order.items) for order in queue._groups.values()) < 3 * (2 * COMPACT_AT + 5)
    assert queue.ordered() == [("r", str(index)) for index in range(9_995, 10_000)]


def _plain_batches(scheduler: core.Scheduler, idle: int) -> list[list[tuple[str, str]]]:
    """The whole ready queue cut into batches, each untaken entry in priority order leading one
    with the next entries of its batch key (one node for a noise-scheduler node, else up to the
    latency-mode size, or the throughput-mode one when the key's entries need more workers than
    are idle), sorted by their leads' priorities."""
    queue = [entry for entry in scheduler._ready.ordered() if scheduler._runnable(entry)]
    groups: dict[tuple[object, ...], list[tuple[str, str]]] = {}
    for entry in queue:
        groups.setdefault(core._batch_key(scheduler._node(entry)), []).append(entry)
    batches: list[list[tuple[str, str]]] = []
    taken: set[tuple[str, str]] = set()
    for entry in queue:
        if entry in taken:
            continue
        node = scheduler._node(entry)
        group = groups[core._batch_key(node)]
        latency, throughput = scheduler.costs.batch_limits(node)
        limit = 1 if core._stateful(node) else throughput if len(group) > latency * max(1, idle) else latency
        start = group.index(entry)  # the key's earlier entries are taken: they came first
        batches.append(group[start : start + limit])
        taken.update(batches[-1])
    batches = scheduler._split_for_parallelism(batches, idle)
    return sorted(batches, key=lambda batch: scheduler._priority(batch[0]))


def _plain_round(scheduler: core.Scheduler, now: float, decisions: core.Decisions) -> None:
    """A lego round that forms every batch and looks at each, whatever room is left, and that
    chains from every worker."""
    scheduler._full_holders.clear()
    room = scheduler._has_room()
    waiting: Counter[str] = Counter()
    for batch in _plain_batches(scheduler, len(scheduler._idle)):
        if room or scheduler._bound_to_side_lane(batch[0]):
            scheduler._try_to_dispatch(batch, now, waiting, decisions)
            room = room and scheduler._has_room()
    scheduler._chain_all = True  # chaining looks at every worker, not just those changed since
    scheduler._chain(now, decisions)
    scheduler._count_holder_waits(now, waiting)
    scheduler._preload_hot_models(now, decisions)


def _decisions(shortcuts: bool, monkeypatch: pytest.MonkeyPatch) -> Dispatched:
    """Every dispatch (time, worker, tasks) of a loaded two-family mix on 6 simulated GPUs."""
    if not shortcuts:
        monkeypatch.setattr(
            WorkerPools,
            "finalists",
            lambda self, model, hosts=frozenset(), made_at=-math.inf: [
                f.worker for f in self._filed.values() if not hosts or f.worker.host in hosts
            ],
        )
        monkeypatch.setattr(core.Scheduler, "_waits_for_holders", lambda self, batch, now, waiting: False)
        monkeypatch.setattr(core.Scheduler, "_schedule_lego", _plain_round)
    dispatched, summary = _dispatches(
        "flux-schnell,sd3-medium", "poisson:rate=3,duration=40,seed=3", 6, monkeypatch
    )
    assert summary["completed"] > 0 and (summary["rejected"] or summary["dropped"])  # it was loaded
    return dispatched


Dispatched = list[tuple[float, str, tuple[str, ...]]]


def _dispatches(
    families: str, trace: str, gpus: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[Dispatched, dict[str, object]]:
    """Every dispatch (time, worker, tasks) of a simulated run, and its summary."""
    mix = workload(families)
    requests = parse_synthetic(trace)
    tenants = assign_tenants(requests, sorted(mix.workflows), 0.0, seed=3)
    arrivals = [Arrival(r.time_s, t, mix.inputs[t]) for r, t in zip(requests, tenants, strict=True)]
    plan = warmup_of([(a.time_s, a.workflow) for a in arrivals], sorted(mix.workflows), 10.0)
    warmup = [Arrival(at, tenant, mix.inputs[tenant]) for at, tenant in plan]
    directory = default_profile_dir()
    simulator = Simulator(mix.workflows, gpus, ProfileSet(directory), "lego", load_batch_sizes(directory))
    dispatched: Dispatched = []
    start = simulator._start

    def record(dispatch: core.Dispatch, now: float) -> None:
        dispatched.append((now, dispatch.worker_id, tuple(t.task_id for t in dispatch.tasks)))
        start(dispatch, now)

    monkeypatch.setattr(simulator, "_start", record)
    return dispatched, simulator.run(arrivals, warmup).summary()


@pytest.mark.skipif(native.requested(), reason="replaces the scheduler's methods: compiled classes forbid it")
def test_the_shortcuts_dispatch_exactly_as_pricing_every_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    used: Counter[str] = Counter()
    waits = core.Scheduler._waits_for_holders

    def counted_waits(
        self: core.Scheduler, batch: list[tuple[str, str]], now: float, waiting: Counter[str]
    ) -> bool:
        answer = waits(self, batch, now, waiting)
        used["waited"] += answer
        return answer

    every = core.Scheduler._every_batch_waits

    def counted_every(
        self: core.Scheduler,
        model: str,
        groups: list[tuple[list[ReadyItem], int, int]],
        waiting: Counter[str],
        now: float,
    ) -> bool:
        answer = every(self, model, groups, waiting, now)
        used["all waited"] += answer
        return answer

    with monkeypatch.context() as fast_run:
        fast_run.setattr(core.Scheduler, "_waits_for_holders", counted_waits)
        fast_run.setattr(core.Scheduler, "_every_batch_waits", counted_every)
        fast = _decisions(True, fast_run)
    with monkeypatch.context() as plain_run:
        slow = _decisions(False, plain_run)
    assert used["all waited"] > 1000 and used["waited"] > 10  # the shortcuts were taken, often
    assert len(fast) > 1000
    assert fast == slow


BURST = "gamma:rate=2,cv=8,duration=120,seed=1"


@pytest.mark.skipif(native.requested(), reason="replaces the scheduler's methods: compiled classes forbid it")
def test_leaving_out_the_batches_that_would_wait_dispatches_exactly_as_looking_at_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a batch queued behind the one making its inputs, on a busy holder of a model whose batches
    # were all going to wait, changes that answer mid-round: a round that had dropped the model's
    # batches for the rest of it dispatched differently here
    every = core.Scheduler._every_batch_waits
    used: Counter[str] = Counter()

    def counted_every(self: core.Scheduler, *args: object) -> bool:
        answer = every(self, *args)  # type: ignore[arg-type]
        used["all waited"] += answer
        return answer

    with monkeypatch.context() as fast_run:
        fast_run.setattr(core.Scheduler, "_every_batch_waits", counted_every)
        fast, _ = _dispatches("flux-schnell", BURST, 8, fast_run)
    with monkeypatch.context() as plain_run:
        plain_run.setattr(core.Scheduler, "_every_batch_waits", lambda self, *args: False)
        plain, _ = _dispatches("flux-schnell", BURST, 8, plain_run)
    assert used["all waited"] > 100
    assert len(fast) > 1000
    assert fast == plain
