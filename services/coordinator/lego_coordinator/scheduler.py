"""The scheduler core: pure, deterministic, no I/O and no clock of its own (time is an argument).

It holds each request's DAG state and decides, on every `schedule(now)`, what runs where:

- policy `lego` (micro-serving): a ready queue ordered by request arrival then depth from the sinks;
  ready nodes with the same (op, model, mode, patch set) from any request or workflow form batches
  (latency-mode size, throughput-mode size when the ready work outnumbers the idle workers); batches
  are split across idle workers when that finishes sooner (adaptive parallelism, e.g. the two CFG
  branches of a step); each batch goes to the worker where it would finish first (queued work +
  model load if not resident + input transfer + execution), taken from the ready queue only when
  a worker frees (`ready_depth`), a step chained behind the batch making its inputs apart; a
  request's noise-scheduler nodes
  (fractions of a millisecond each) go to the worker holding its scheduler state at once and run
  there beside its queue (the side lane), not behind its queued batches; hot models get preloaded on idle
  workers; requests are admitted only if their SLO can be met; a request of a loop with
  approximate caching whose prompt is close to a finished one's resumes from that one's cached
  latent (its graph rewritten, lego.graph `resume_from_cache`), and its misses fill the cache.
- baselines `static`, `clockwork`, `shepherd` (monolithic serving): a request is one placement unit
  run alone on one worker, FCFS; `static` pins each workflow to an equal share of the workers,
  `shepherd` to a share planned from the observed request mix, `clockwork` lets any workflow run on
  any worker (preferring one that holds its models, swapping otherwise).

The coordinator service and the simulator drive this same object. A round must not scan every
request or worker of a large cluster, so the scheduler keeps indexes up to date as it goes (open
requests, their remaining work, deadlines, holders of each model, free workers in
`placement.WorkerPools`, the ready queue in `ready_queue.ReadyQueue`), prices only the workers that
can be cheapest for a batch, looks again for chaining only at workers whose state changed, and tells
a batch that would wait for its model's holders so before pricing any worker. tests/unit/test_placement.py
checks that these shortcuts dispatch exactly as the plain computation does.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

from lego import operators
from lego.graph import CACHED_LATENTS, ApproxSite, Ref, RequestGraph, TaskNode, resume_from_cache
from lego.values import Scalar

from lego_coordinator.approx_cache import ApproxCache, Handle, Hit, candidate_skips
from lego_coordinator.costs import CostModel, PendingWork
from lego_coordinator.demand import RecentSeconds
from lego_coordinator.placement import WorkerPools
from lego_coordinator.ready_queue import Item as ReadyItem
from lego_coordinator.ready_queue import ReadyQueue

POLICIES = ("lego", "static", "clockwork", "shepherd")
FailureCode = Literal["unavailable", "deadline", "cancelled", "internal"]
PRELOAD_BACKLOG_S = 0.25  # pending work per replica above which a hot model is preloaded elsewhere
# A model is also preloaded elsewhere once the work admitted for it lately keeps its replicas more
# than half busy (lego_coordinator.demand), before a backlog builds: a step queued at a half-busy
# replica waits half a step on average, and a request's steps queue one after another. With the
# backlog rule alone (a backlog of a load time, 2.7 s for FLUX.1's transformer, above the SLO)
# FLUX.1-schnell on a cluster whose models a first few requests had loaded ran on one transformer
# replica until requests missed: simulated RS 1 / 4 0.944 / 0.978 → 0.966 / 0.997 with this. And
# once its ready work has lately spent more than a load time waiting for busy holders
# (`_count_holder_waits`): FLUX.1's text encoders, little work, sat on the one worker that also ran
# transformer steps, and every request's first step waited behind one (RS 8: 0.85 → 0.95).
SCALE_OUT_DEMAND = 0.5
# A worker whose queue ends within twice the learned control-plane overhead per batch may take its
# next batch from the ready queue already (`Scheduler._takes_ready`), when that overhead is at least
# this: below it there is no gap worth hiding.
MIN_BIND_AHEAD_S = 0.001
SHEPHERD_REPLAN_S = 10.0
# The share of the SLO the admission estimate may fill. The estimate (the work ahead spread over
# the workers, then the request's own standalone latency) is an upper bound, as for any list
# schedule: the request's own steps run while others' do. With ready work bound to a worker only
# when it frees (`ready_depth`), requests admitted near the SLO met it: 1.1 rather than 0.95 held
# simulated FLUX.1-schnell at RS 8 (0.93 vs 0.89) and SD3-medium at RS 4.5 (0.94 vs 0.93).
ADMISSION_HEADROOM = 1.1
# While more of the recently admitted requests miss their deadlines than the 90 % attainment target
# allows, admission inflates its estimate: by 1 / (1 - the excess share of misses). Beyond capacity,
# a cluster shared by many models loads them over and over, which the backlog model does not see,
# and admitted requests missed their deadlines in a cascade (simulated twelve-workflow mix at RS 2:
# 0.24 attainment, 48 of 89 dropped). Scaling by latency ÷ estimate instead also refused requests
# that would have met their SLOs just above capacity (SD3-medium at RS 4.5: 0.91 → 0.90).
MISS_TOLERANCE = 0.1
MISS_WEIGHT = 0.05  # of each admitted request's outcome in the moving average of misses


@dataclass(frozen=True)
class Tensor:
    """A produced tensor: the shell's handle (opaque here), its size and the host that holds it."""

    handle: Handle
    nbytes: int = 0
    host: str = ""


@dataclass(frozen=True)
class Pending:
    """A deferred input whose producer is running: the consumer waits for it on the data engine."""

    tensor_id: str


@dataclass(frozen=True)
class NodeStarted:
    request_id: str
    node_id: str
    worker_id: str


@dataclass(frozen=True)
class NodeFinished:
    request_id: str
    node_id: str


@dataclass(frozen=True)
class StepProgress:
    request_id: str
    step: int
    total: int


@dataclass(frozen=True)
class RequestDone:
    request_id: str
    outputs: dict[str, object]
    nodes_executed: int
    execution_s: float
    unpatched_calls: int = 0  # denoiser calls that ran before their LoRA had loaded
    skipped_steps: int = 0  # denoise iterations an approximate-cache hit skipped


@dataclass(frozen=True)
class RequestFailed:
    request_id: str
    message: str
    code: FailureCode = "internal"


Event = NodeStarted | NodeFinished | StepProgress | RequestDone | RequestFailed


@dataclass(frozen=True)
class Admission:
    accepted: bool
    reason: str = ""
    deadline: float = math.inf
    estimate_s: float = 0.0
    standalone_s: float = 0.0
    unmeetable: bool = False  # the request's own SLO is shorter than its latency on an idle worker


@dataclass
class BatchTask:
    task_id: str
    request_id: str
    node: TaskNode
    inputs: dict[str, Scalar | object]


@dataclass
class Dispatch:
    batch_id: str
    worker_id: str
    op: str
    model: str
    mode: str
    tasks: list[BatchTask]
    patches: tuple[tuple[str, float], ...] = ()
    sent_at: float = 0.0
    side_lane: bool = False  # runs at once beside the worker's queued batches (a noise-scheduler node)


@dataclass(frozen=True)
class Preload:
    worker_id: str
    model: str


@dataclass
class Decisions:
    dispatches: list[Dispatch] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    preloads: list[Preload] = field(default_factory=list)


@dataclass
class _Request:
    request_id: str
    workflow: str
    graph: RequestGraph
    arrival: float
    seq: int
    deadline: float
    standalone_s: float
    remaining: dict[str, int]
    successors: dict[str, list[str]]  # released when this node finishes
    produced: dict[Ref, Tensor] = field(default_factory=dict)
    # released when this node is dispatched: consumers reading all its outputs as deferred inputs
    early_successors: dict[str, list[str]] = field(default_factory=dict)
    placed_on: dict[str, str] = field(default_factory=dict)  # node → worker it was last dispatched to
    ends: dict[str, float] = field(default_factory=dict)  # node → when its batch should end (running)
    done: set[str] = field(default_factory=set)
    models: frozenset[str] = frozenset()
    running: set[str] = field(default_factory=set)
    state_workers: dict[str, str] = field(default_factory=dict)
    replay: list[str] = field(default_factory=list)  # stateful nodes re-run to rebuild lost state
    worker: str | None = None  # monolithic policies: the worker running the whole request
    finished: bool = False
    execution_s: float = 0.0
    unpatched_calls: int = 0
    # approximate caching: the loop's site, the prompt's signature, and the hit it resumed from
    site: ApproxSite | None = None
    signature: tuple[float, ...] = ()
    hit: Hit | None = None
    external: dict[Ref, Tensor] = field(default_factory=dict)  # inputs no node of its graph makes
    order: dict[str, int] = field(default_factory=dict)
    work_ratio: float = 1.0  # standalone time ÷ one-by-one work: what batching saves
    readers: dict[Ref, int] = field(default_factory=dict)  # consumers still to read each tensor
    kept: set[Ref] = field(default_factory=set)  # freed only with the request (outputs, replay inputs)
    pending: PendingWork = field(default_factory=PendingWork)  # its nodes not done yet, for admission
    admitted_by_estimate: bool = False  # its outcome counts in the miss rate that admission follows

    def __post_init__(self) -> None:
        self.site = self.graph.approx
        self.order = {node_id: index for index, node_id in enumerate(self.graph.nodes)}
        self.readers = dict(self.graph.consumers)
        self.kept = set(self.graph.outputs.values()) | {
            value
            for node in self.graph.nodes.values()
            if node.state_key
            for value in node.inputs.values()
            if isinstance(value, Ref)
        }


@dataclass
class _Worker:
    worker_id: str
    host: str
    index: int
    in_flight: list[str] = field(default_factory=list)
    loaded: set[str] = field(default_factory=set)
    loras: set[str] = field(default_factory=set)  # LoRA sources it holds (or is fetching)
    busy_until: float = 0.0
    last_done_at: float = 0.0
    serving: str | None = None  # monolithic: the request it runs
    preloading: set[str] = field(default_factory=set)
    draining: bool = False  # scale-down: no new work; it leaves once `drained`
    streaming: frozenset[str] = frozenset()  # "op.mode" of the calls whose outputs it streams in parts
    side: list[str] = field(default_factory=list)  # side-lane batches (noise-scheduler nodes) it runs

    def batches(self) -> list[str]:
        return self.in_flight + self.side


def private_copies(graph: RequestGraph, owner: str) -> RequestGraph:
    """The graph with every model replaced by `owner`'s private copy of it (`source#owner:component`):
    a monolithic deployment gives each workflow its own weights, shared with no other workflow."""
    nodes = {}
    for node_id, node in graph.nodes.items():
        source, _, component = node.model.rpartition(":")
        private = source and "#" not in source and node.model != operators.IMAGE_MODEL
        nodes[node_id] = replace(node, model=f"{source}#{owner}:{component}") if private else node
    return RequestGraph(nodes, graph.outputs, graph.consumers, graph.approx)


def as_placed(policy: str, workflow: str, graph: RequestGraph) -> RequestGraph:
    """The graph as `policy` runs it: the monolithic baselines give each workflow private copies of
    its models (as one pipeline per workflow does); lego shares them."""
    return graph if policy == "lego" else private_copies(graph, workflow)


def _batch_key(node: TaskNode) -> tuple[str, str, str, tuple[tuple[str, float], ...]]:
    """Nodes that may share one forward pass: same operator, model, mode and patch set."""
    return (node.op, node.model, node.mode, node.patches)


def _producers(request: _Request, node: TaskNode, blocking: bool) -> set[str]:
    """The nodes `node` waits for: those it must run after, and the producers of its inputs (of
    those it does not read deferred, when `blocking`); an input given from outside counts none."""
    return set(node.after) | {
        value.node
        for name, value in node.inputs.items()
        if isinstance(value, Ref)
        and value not in request.external
        and not (blocking and name in node.deferred)
    }


def _stateful(node: TaskNode) -> bool:
    signature = operators.SIGNATURES.get(node.op, {}).get(node.mode)
    return bool(signature and signature.stateful)


class Scheduler:
    def __init__(
        self,
        costs: CostModel | None = None,
        policy: str = "lego",
        enforce_slo: bool = False,
        slo_factor: float = 2.0,
        max_in_flight: int = 2,
        approx_cache: ApproxCache | None = None,
        ready_depth: int = 1,
        bind_ahead_s: float | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.costs = costs or CostModel()
        self.policy = policy
        self.enforce_slo = enforce_slo
        self.slo_factor = slo_factor
        # A worker holds up to `max_in_flight` batches, but takes one from the ready queue only while
        # it holds fewer than `ready_depth`: the rest of its room is for a request's own next step,
        # chained behind the step that feeds it. A ready batch bound to a busy worker's queue is
        # bound before it knows what will be ready when that worker frees: each step of a request
        # then queued behind another request's, every request advanced at about half speed under
        # load, and SLOs were missed in a long tail. Bound only when a worker frees, the
        # highest-priority step ready then takes it (simulated SD3-medium, Poisson 2.9 rps on 8
        # GPUs, six seeds: 0.883 attainment with 2, 0.949 with 1; clockwork 0.961).
        self.max_in_flight = max_in_flight if policy == "lego" else 1
        self.ready_depth = min(ready_depth, self.max_in_flight)
        self.bind_ahead_s = bind_ahead_s  # None: twice the learned overhead (`_bind_ahead`)
        self._bind_wakes: list[tuple[float, str, float]] = []  # (when, worker, its busy_until then)
        self._bind_waking: dict[str, float] = {}  # worker → the busy_until its wake is filed for
        self._requests: dict[str, _Request] = {}
        self._workers: dict[str, _Worker] = {}
        self._ready = ReadyQueue(
            self._priority, group=lambda entry: _batch_key(self._node(entry)), lane=self._bound_to_side_lane
        )
        self._in_flight: dict[str, Dispatch] = {}
        self._seq = itertools.count()
        self._batch_ids = itertools.count(1)
        self._dispatches = 0  # so far: what a round's `_every_batch_waits` answers hold until
        self._dispatches_behind = 0  # ... of those, queued on a worker taking no ready work
        self._worker_index = itertools.count()
        self._arrivals: Counter[str] = Counter()  # shepherd's view of the request mix
        self._plan: dict[str, list[str]] = {}  # workflow → workers (static, shepherd)
        self._planned_at = -math.inf
        self._pending_s: defaultdict[str, float] = defaultdict(float)  # model → seconds of work not done yet
        self._demand = RecentSeconds()  # model → seconds of work admitted, lately
        self._held_up = RecentSeconds()  # model → seconds its ready work waited for busy holders, lately
        self._waiting_since: tuple[float, set[str]] = (0.0, set())  # the last round, its models left waiting
        self._dead: list[object] = []  # handles of tensors no node will read again
        self.approx = approx_cache or ApproxCache()
        # Indexes kept up to date so a scheduling round does not scan every request or worker:
        self._open: dict[str, _Request] = {}  # requests not finished, in admission order
        self._model_users: Counter[str] = Counter()  # model → open requests whose graph uses it
        self._deadlines: list[tuple[float, int, str]] = []  # heap of open requests' deadlines
        self._by_deadline: list[tuple[float, int, str]] = []  # open requests, sorted by deadline
        # the work open requests have left, summed per work ratio (requests of one workflow share it)
        self._pending_by_ratio: dict[float, PendingWork] = {}
        self._holders: defaultdict[str, set[str]] = defaultdict(set)  # model → workers it is loaded on
        self._pools: WorkerPools[_Worker] = WorkerPools()  # active workers with room
        self._idle: set[str] = set()  # active workers with nothing in flight
        self._draining: set[str] = set()
        # model → its holders with no room this round, and when the first of them frees
        self._full_holders: dict[str, tuple[list[_Worker], float]] = {}
        self._preloads: Counter[str] = Counter()  # model → workers loading it ahead of its work
        # chaining looks again only at workers whose batches, models or requests changed since
        self._chain_dirty: set[str] = set()
        self._chain_all = True  # ... or at every worker (at first, or when the split mode turned)
        self._split_mode = False
        self._miss_rate = 0.0  # moving average over admitted requests as they end: 1 for a miss

    # ---- membership ----

    def add_worker(
        self,
        worker_id: str,
        host: str = "",
        loaded: list[str] | None = None,
        streaming: frozenset[str] = frozenset(),
    ) -> None:
        """A worker joined (or reports again): its data engine's host, the models resident on its
        device, and the calls ("op.mode") whose outputs it streams in parts while they run."""
        worker = self._workers.get(worker_id)
        if worker is None:
            worker = _Worker(worker_id, host, next(self._worker_index), streaming=streaming)
            self._workers[worker_id] = worker
            self._plan = {}
            self._refresh(worker)
        self._hold(worker, worker.loaded | set(loaded or []))

    def _takes_ready(self, worker: _Worker) -> bool:
        """Whether the worker may take a batch from the ready queue: while it holds fewer than
        `ready_depth` batches, and one more once its queue ends within the bind-ahead time (twice
        the learned control-plane overhead per batch: dispatch, input fetch, report), so that on a
        live cluster the next batch is there when the last one ends. A worker past its estimated
        end takes none: when it will free is not known."""
        held = len(worker.in_flight)
        if held < self.ready_depth:
            return True
        return held < self.max_in_flight and 0.0 <= worker.busy_until - self._pools.now < self._bind_ahead()

    def _bind_ahead(self) -> float:
        """How long before a worker's queue ends it may take its next batch (a simulator gives its
        modelled overhead; a live coordinator learns it)."""
        if self.bind_ahead_s is not None:
            return self.bind_ahead_s
        overhead = self.costs.overhead_s
        return 2 * overhead if overhead >= MIN_BIND_AHEAD_S else 0.0

    def _wake_to_bind_ahead(self, worker: _Worker) -> None:
        """A worker that may take its next batch early, but not yet: filed again when it may."""
        ahead = self._bind_ahead()
        if ahead <= 0 or len(worker.in_flight) != self.ready_depth:
            return
        if worker.busy_until - self._pools.now < ahead:  # it may take one now (`_takes_ready`)
            return
        if self._bind_waking.get(worker.worker_id) != worker.busy_until:  # filed once per queue
            self._bind_waking[worker.worker_id] = worker.busy_until
            heapq.heappush(self._bind_wakes, (worker.busy_until - ahead, worker.worker_id, worker.busy_until))

    def _refresh(self, worker: _Worker) -> None:
        """File the worker anew in the placement indexes: its queue, membership or draining changed."""
        active = self._workers.get(worker.worker_id) is worker and not worker.draining
        self._pools.update(worker, active and self._takes_ready(worker))
        if active and self.ready_depth < self.max_in_flight:
            self._wake_to_bind_ahead(worker)
        if active and not worker.in_flight:
            self._idle.add(worker.worker_id)
        else:
            self._idle.discard(worker.worker_id)

    def _hold(self, worker: _Worker, models: set[str]) -> None:
        """The models now resident on the worker (`_holders` follows)."""
        for model in worker.loaded - models:
            self._holders[model].discard(worker.worker_id)
        for model in models - worker.loaded:
            self._holders[model].add(worker.worker_id)
        if models != worker.loaded:
            worker.loaded = models
            self._refresh(worker)
            self._chain_dirty.add(worker.worker_id)

    def remove_worker(self, worker_id: str) -> list[Event]:
        """A worker died or left: its in-flight nodes run again elsewhere, and per-request scheduler
        state it held is rebuilt by replaying that request's scheduler nodes on another worker."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return []
        self._plan = {}
        self._draining.discard(worker_id)
        self._preloads.subtract(worker.preloading)
        self._refresh(worker)
        self._hold(worker, set())
        if worker.host and all(w.host != worker.host for w in self._workers.values()):
            self.approx.drop_host(worker.host)  # its data engine, and the latents there, are gone
        requeued: list[tuple[_Request, str]] = []
        for batch_id in worker.batches():
            dispatch = self._in_flight.pop(batch_id)
            for task in dispatch.tasks:
                request = self._requests.get(task.request_id)
                if request is not None and not request.finished:
                    request.running.discard(task.node.id)
                    if task.node.id in request.replay:
                        continue  # re-queued with the rest of the replay below
                    self._ready.add((task.request_id, task.node.id))
                    requeued.append((request, task.node.id))
        for request, producer in requeued:  # not dispatched any more: its deferred consumers wait again
            for consumer in request.early_successors[producer]:
                if consumer not in request.running and consumer not in request.done:
                    request.remaining[consumer] += 1
                    self._ready.discard((request.request_id, consumer))
        for request, node_id in requeued:  # a chained node waits again for producers lost with it
            missing = self._missing_producers(request, node_id)
            if missing:
                request.remaining[node_id] = missing
                self._ready.discard((request.request_id, node_id))
        for request in list(self._open.values()):
            if request.worker == worker_id:  # monolithic: the whole request starts over
                self._restart(request)
                continue
            for key, holder in list(request.state_workers.items()):
                if holder == worker_id:
                    self._replay_state(request, key)
        return []

    def _missing_producers(self, request: _Request, node_id: str) -> int:
        """Producers of the node's inputs that are not done, besides those it reads deferred."""
        node = request.graph.nodes[node_id]
        return len(_producers(request, node, blocking=True) - request.done)

    def _replay_state(self, request: _Request, key: str) -> None:
        self._chain_all = True
        del request.state_workers[key]
        lost = [
            n
            for n in request.graph.nodes.values()
            if n.state_key == key and (n.id in request.done or n.id in request.replay)
        ]
        if not lost:
            return
        request.replay = [n.id for n in lost]
        for node in lost:
            if node.id in request.done:
                request.done.discard(node.id)
                self._count_pending(request, node, +1)
        self._ready.add((request.request_id, request.replay[0]))

    def _restart(self, request: _Request) -> None:
        self._chain_all = True
        request.readers = dict(request.graph.consumers)
        for node_id in request.done:
            self._count_pending(request, request.graph.nodes[node_id], +1)
        request.worker = None
        request.done.clear()
        request.running.clear()
        request.produced = dict(request.external)
        request.state_workers.clear()
        request.replay.clear()
        request.execution_s = 0.0
        request.unpatched_calls = 0
        self._unready(request)
        self._init_readiness(request)

    def _count_pending(self, request: _Request, node: TaskNode, sign: int) -> None:
        """A node of the request is (+1) or is no longer (-1) work to do."""
        self._pending_s[node.model] += sign * self.costs.exec_s(node)
        request.pending.add(node, sign)
        if self._open.get(request.request_id) is request:
            self._pending_by_ratio.setdefault(request.work_ratio, PendingWork()).add(node, sign)

    def _touch(self, worker: _Worker | None, request_ids: set[str]) -> None:
        """For chaining: the worker's batches changed, and so did these requests' progress (which
        the workers holding their running nodes chain from)."""
        if worker is not None:
            self._chain_dirty.add(worker.worker_id)
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is not None:
                self._chain_dirty.update(request.placed_on[node_id] for node_id in request.running)

    def _unready(self, request: _Request, graph: RequestGraph | None = None) -> None:
        for node_id in (graph or request.graph).nodes:
            self._ready.discard((request.request_id, node_id))

    def _close(self, request: _Request) -> None:
        """The request is finished, failed or released: it leaves the open-request indexes."""
        if self._open.get(request.request_id) is request:
            del self._open[request.request_id]
            self._model_users.subtract(request.models)
            self._pending_by_ratio[request.work_ratio].subtract(request.pending)
            key = (request.deadline, request.seq, request.request_id)
            del self._by_deadline[bisect.bisect_left(self._by_deadline, key)]

    # ---- draining (scale-down without failing a request) ----

    def drain_worker(self, worker_id: str) -> None:
        """The worker takes no new work. Its batches in flight finish, and the noise-scheduler nodes of
        requests whose state it holds (or, monolithic, the request it runs) still go to it until those
        requests finish, so nothing is replayed; then `drained` is true and the shell lets it leave."""
        worker = self._workers.get(worker_id)
        if worker is not None and not worker.draining:
            worker.draining = True
            self._draining.add(worker_id)
            self._plan = {}
            self._refresh(worker)

    def drained(self, worker_id: str) -> bool:
        worker = self._workers.get(worker_id)
        if worker is None or not worker.draining or worker.batches():
            return False
        serving = self._requests.get(worker.serving) if worker.serving else None
        if serving is not None and not serving.finished:
            return False
        return not any(worker_id in request.state_workers.values() for request in self._open.values())

    def draining_workers(self) -> set[str]:
        return {w.worker_id for w in self._workers.values() if w.draining}

    def _active(self) -> list[_Worker]:
        return [w for w in self._workers.values() if not w.draining]

    def _active_count(self) -> int:
        return len(self._workers) - len(self._draining)

    def ready_by_model(self) -> dict[str, int]:
        """Ready nodes per model: the queue depth that drives worker autoscaling."""
        counts: Counter[str] = Counter(self._node(entry).model for entry in self._ready)
        return dict(counts)

    def set_loaded(self, worker_id: str, models: list[str], loras: list[str] | None = None) -> None:
        """What the worker reports resident on its device (after loads and evictions), and the
        LoRAs it holds (None: not reported)."""
        worker = self._workers.get(worker_id)
        if worker is not None:
            self._hold(worker, set(models))
            arrived = worker.preloading & worker.loaded
            worker.preloading -= arrived
            self._preloads.subtract(arrived)
            if loras is not None and worker.loras != set(loras):
                worker.loras = set(loras)
                self._chain_dirty.add(worker_id)

    def workers(self) -> dict[str, tuple[bool, list[str]]]:
        return {w.worker_id: (bool(w.in_flight), sorted(w.loaded)) for w in self._workers.values()}

    # ---- admission ----

    def _backlog_s(self, deadline: float = math.inf) -> float:
        """Work per worker that runs before a request with this deadline (earliest deadline first)."""
        work = sum(ratio * self.costs.pending_s(pending) for ratio, pending in self._pending_by_ratio.items())
        later = bisect.bisect_right(self._by_deadline, (deadline, math.inf))
        for _, _, request_id in self._by_deadline[later:]:
            request = self._open[request_id]
            work -= request.work_ratio * self.costs.pending_s(request.pending)
        return max(0.0, work) / max(1, self._active_count())

    def admit(
        self, request_id: str, workflow: str, graph: RequestGraph, now: float, slo_s: float | None = None
    ) -> Admission:
        if request_id in self._requests:
            return Admission(True, deadline=self._requests[request_id].deadline)
        standalone = self.costs.standalone_s(graph)
        slo = slo_s if slo_s else self.slo_factor * standalone
        deadline = now + slo if (self.enforce_slo or slo_s) else math.inf
        estimate = standalone
        floor = self.costs.floor_s(graph)
        if slo_s and slo_s < floor:  # not even its execution fits, whatever the load: the client's error
            reason = f"slo_ms must be at least its execution time on an idle worker, {floor * 1000:.1f} ms"
            return Admission(False, reason, deadline, standalone, standalone, unmeetable=True)
        if self.policy == "lego" and self.enforce_slo:
            if not self._active_count():
                return Admission(False, "no workers are serving", deadline, math.inf, standalone)
            estimate = (self._backlog_s(deadline) + standalone) * self._admission_scale()
            # Alone on the cluster a request is admitted whatever the estimate says: refusing it
            # would leave the cost model nothing to learn from, so overrun estimates could refuse
            # every request from then on.
            if estimate > ADMISSION_HEADROOM * slo and self.in_flight_requests() > 0:
                return Admission(
                    False,
                    f"cannot meet its SLO: estimated {estimate:.3f}s of {slo:.3f}s "
                    f"({self._active_count()} workers busy)",
                    deadline,
                    estimate,
                    standalone,
                )
        graph = self.as_placed(workflow, graph)
        request = _Request(request_id, workflow, graph, now, next(self._seq), deadline, standalone, {}, {})
        request.admitted_by_estimate = self.policy == "lego" and self.enforce_slo
        work = self.costs.work_s(graph.nodes.values())
        request.work_ratio = standalone / work if work > 0 else 1.0
        request.models = frozenset(node.model for node in graph.nodes.values())
        self._requests[request_id] = request
        self._init_readiness(request)
        self._open[request_id] = request
        self._model_users.update(request.models)
        bisect.insort(self._by_deadline, (deadline, request.seq, request_id))
        if math.isfinite(deadline):
            heapq.heappush(self._deadlines, (deadline, request.seq, request_id))
        self._arrivals[workflow] += 1
        for node in graph.nodes.values():
            self._count_pending(request, node, +1)
            self._demand.add(node.model, self.costs.exec_s(node), now)
        return Admission(True, "", deadline, estimate, standalone)

    def as_placed(self, workflow: str, graph: RequestGraph) -> RequestGraph:
        return as_placed(self.policy, workflow, graph)

    def _init_readiness(self, request: _Request) -> None:
        """Dependency counts and successor lists of the request's graph, for what it has not done
        yet (all of it, but for a graph rewritten mid-way); its nodes with nothing to wait for
        are ready. A deferred input's producer counts as met once it runs."""
        request.remaining = {}
        request.successors = {node_id: [] for node_id in request.graph.nodes}
        request.early_successors = {node_id: [] for node_id in request.graph.nodes}
        for node in request.graph.nodes.values():
            blocking = _producers(request, node, blocking=True)
            producers = _producers(request, node, blocking=False)
            for producer in producers:
                (request.successors if producer in blocking else request.early_successors)[producer].append(
                    node.id
                )
            met = request.done | (request.running & (producers - blocking))
            request.remaining[node.id] = len(producers - met)
        self._ready.update(
            (request.request_id, n)
            for n, c in request.remaining.items()
            if c == 0 and n not in request.done and n not in request.running
        )

    def release(self, request_id: str) -> None:
        """Forget a request (answered, failed or cancelled); its queued nodes are dropped."""
        request = self._requests.pop(request_id, None)
        if request is not None:
            self._unpin(request)
            self._close(request)
            self._unready(request)
        if request is not None and request.worker in self._workers:
            worker = self._workers[request.worker]
            if worker.serving == request_id:
                worker.serving = None

    def cancel(self, request_id: str) -> list[Event]:
        request = self._requests.get(request_id)
        if request is None or request.finished:
            return []
        return [self._fail(request, "cancelled", "cancelled")]

    def in_flight_requests(self) -> int:
        return len(self._open)

    def ready_count(self) -> int:
        return len(self._ready)

    # ---- scheduling ----

    def schedule(self, now: float) -> Decisions:
        decisions = Decisions()
        self._pools.advance(now)
        while self._bind_wakes and self._bind_wakes[0][0] <= now:
            _, worker_id, busy_until = heapq.heappop(self._bind_wakes)
            if self._bind_waking.get(worker_id) == busy_until:
                del self._bind_waking[worker_id]
            worker = self._workers.get(worker_id)
            if worker is not None and worker.busy_until == busy_until:  # its queue as it was then
                self._refresh(worker)
        self._drop_expired(now, decisions.events)
        if self.policy == "lego":
            self._schedule_lego(now, decisions)
        else:
            self._schedule_monolithic(now, decisions)
        return decisions

    def _drop_expired(self, now: float, events: list[Event]) -> None:
        expired = []
        while self._deadlines and now > self._deadlines[0][0]:
            _, seq, request_id = heapq.heappop(self._deadlines)
            request = self._open.get(request_id)
            if request is not None and request.seq == seq:  # not a later request with a reused id
                expired.append(request)
        for request in sorted(expired, key=lambda r: r.seq):
            waited, slo = now - request.arrival, request.deadline - request.arrival
            message = f"deadline passed after {waited:.3f}s (SLO {slo:.3f}s)"
            self._observe_outcome(request, now)
            events.append(self._fail(request, message, "deadline"))

    def _priority(self, entry: tuple[str, str]) -> tuple[float, int, int, int]:
        """Earliest deadline first (arrival order among requests without one), then depth."""
        request = self._requests[entry[0]]
        node = request.graph.nodes[entry[1]]
        return (request.deadline, request.seq, -node.depth, request.order[node.id])

    def _blocked(self, request: _Request, node: TaskNode) -> bool:
        """A stateful node waits while its request's scheduler state is being rebuilt."""
        return bool(request.replay) and node.state_key != "" and node.id != request.replay[0]

    def _node(self, entry: tuple[str, str]) -> TaskNode:
        return self._requests[entry[0]].graph.nodes[entry[1]]

    def _split_for_parallelism(
        self, batches: list[list[tuple[str, str]]], idle: int
    ) -> list[list[tuple[str, str]]]:
        """With idle workers to spare, run a batch's members side by side when that is faster. Only
        while there are more idle workers than unfinished requests: a split batch costs a device
        more than the batched call, which only pays while the devices would otherwise sit idle (in
        simulation, splitting under load nearly doubled GPU-seconds and raised median latency)."""
        spare = idle - len(batches)
        if idle <= self.in_flight_requests():
            return batches
        for batch in sorted(batches, key=len, reverse=True):
            while spare > 0 and len(batch) > 1:
                if not self._faster_apart(self._node(batch[0]), len(batch)):
                    break
                batches.append([batch.pop()])
                spare -= 1
        return batches

    def _faster_apart(self, node: TaskNode, size: int) -> bool:
        """Whether a batch of `size` such nodes ends sooner with its last member run elsewhere."""
        together = self.costs.exec_s(node, size)
        return max(self.costs.exec_s(node, size - 1), self.costs.exec_s(node, 1)) < together

    def _lora_fetch_s(self, worker: _Worker, node: TaskNode) -> float:
        missing = sum(1 for source, _ in node.patches if source not in worker.loras)
        return missing * self.costs.lora_fetch_s()

    def _load_s(self, worker: _Worker, nodes: list[TaskNode]) -> float:
        """What the batch waits for on this worker before it runs: its model's load, and the fetch of
        LoRAs the worker lacks unless every node may start without them."""
        node = nodes[0]
        load = 0.0 if node.model in worker.loaded else self.costs.load_s(node.model)
        if all(member.patches_optional for member in nodes):
            return load
        return load + self._lora_fetch_s(worker, node)

    def _inputs(self, batch: list[tuple[str, str]]) -> list[Tensor]:
        """The tensors the batch reads that exist already (what placing it may have to move)."""
        tensors = []
        for request_id, node_id in batch:
            request = self._requests[request_id]
            for value in request.graph.nodes[node_id].inputs.values():
                if isinstance(value, Ref) and value in request.produced:
                    tensors.append(request.produced[value])
        return tensors

    def _cost(
        self, worker: _Worker, nodes: list[TaskNode], inputs: list[Tensor], now: float, made_at: float = 0.0
    ) -> float:
        """When the batch would end there: after the worker's queue and the inputs it must wait for
        whole (`made_at`), a model load, input transfers and its execution. A batch that may start
        without its LoRAs is still placed as if it waited for them: it starts their fetch where it
        runs, and the loop's later steps need them there."""
        node = nodes[0]
        load = self._load_s(worker, nodes)
        if all(member.patches_optional for member in nodes):
            load += self._lora_fetch_s(worker, node)
        transfer = 0.0
        for tensor in inputs:
            transfer += self.costs.transfer_s(tensor.nbytes, tensor.host == worker.host)
        execution = self.costs.exec_s(node, len(nodes)) + self.costs.overhead_s
        return max(0.0, worker.busy_until - now, made_at - now) + load + transfer + execution

    def _schedule_lego(self, now: float, decisions: Decisions) -> None:
        self._full_holders.clear()
        room = self._has_room()
        waiting: Counter[str] = Counter()  # batches of each model left this round for its holders
        lane = self._ready.lane_items()  # the round looks at the entries ready when it starts
        passed: tuple[object, ...] = ()  # the priority of the last batch looked at while there was room
        if room:
            for batch in self._batches_by_priority(len(self._idle), now, waiting):
                passed = self._priority(batch[0])
                self._try_to_dispatch(batch, now, waiting, decisions)
                if not self._has_room():
                    room = False
                    break
        if not room:  # only nodes bound to a side lane can still go, those not looked at above
            for item_priority, _, entry in lane:
                if item_priority > passed and self._bound_to_side_lane(entry) and self._runnable(entry):
                    self._try_to_dispatch([entry], now, waiting, decisions)
        self._chain(now, decisions)
        self._count_holder_waits(now, waiting)
        self._preload_hot_models(now, decisions)

    def _try_to_dispatch(
        self, batch: list[tuple[str, str]], now: float, waiting: Counter[str], decisions: Decisions
    ) -> None:
        if self._waits_for_holders(batch, now, waiting):
            return
        worker = self._place(batch, now)
        if worker is not None and not self._wait_for_holder(batch, worker, now, waiting):
            self._dispatch(batch, worker, now, decisions)

    def _batches_by_priority(
        self, idle: int, now: float, waiting: Counter[str]
    ) -> Iterable[list[tuple[str, str]]]:
        """The round's batches, highest-priority lead first. With more idle workers than unfinished
        requests (light load, few entries) all at once, to split some over the idle workers;
        otherwise formed one at a time, as the round takes them: a round stops looking once no
        worker has room, and under load hundreds of entries wait that it would not reach. There,
        the batches of a model that would each choose to wait for its busy holders are left out
        (`_every_batch_waits`)."""
        if idle > self.in_flight_requests():
            batches = self._split_for_parallelism(list(self._merged_batches(idle)), idle)
            return sorted(batches, key=lambda batch: self._priority(batch[0]))
        return self._merged_batches(idle, (now, waiting))

    def _merged_batches(
        self, idle: int, skipping: tuple[float, Counter[str]] | None = None
    ) -> Iterator[list[tuple[str, str]]]:
        """The ready queue cut into batches, each when asked for, highest-priority lead first: each
        group (batch key) into consecutive batches in priority order, one node each for a
        noise-scheduler node, else the latency-mode size, or the throughput-mode one when the
        group's ready work needs more workers than are idle; the groups' next batches merge on
        their leads' priorities. With `skipping` (the round's time and its count of batches left
        waiting per model), a model's batches are counted as waiting instead of yielded while
        `_every_batch_waits` says each still to come would wait."""
        heads: list[tuple[tuple[object, ...], int, int]] = []  # (lead priority, group, position)
        groups = self._ready.groups()
        limits = []
        models = []
        for index, items in enumerate(groups):
            node = self._node(items[0][2])
            if _stateful(node):  # one node a batch; one waiting for its state's replay is left out
                limits.append(1)
            else:
                latency, throughput = self.costs.batch_limits(node)
                limits.append(throughput if len(items) > latency * max(1, idle) else latency)
            heads.append((items[0][0], index, 0))
            models.append(node.model)
        heapq.heapify(heads)
        positions = [0] * len(groups)  # where each group's next batch starts
        checked: dict[str, tuple[int, int, bool]] = {}  # model → (dispatches by then, …, whether all wait)
        while heads:
            _, index, position = heads[0]
            items, limit = groups[index], limits[index]
            waits = False  # whether this batch would wait for its model's busy holders
            if skipping is not None:
                model = models[index]
                seen = checked.get(model)
                # "all wait" holds until a batch is queued on a full worker (a holder, maybe)
                if (
                    seen is None
                    or seen[1] != self._dispatches_behind
                    or (not seen[2] and seen[0] != self._dispatches)
                ):
                    now, waiting = skipping
                    rest = [(groups[g], positions[g], limits[g]) for g, m in enumerate(models) if m == model]
                    every = self._every_batch_waits(model, rest, waiting, now)
                    seen = checked[model] = self._dispatches, self._dispatches_behind, every
                waits = seen[2]
            batch = [entry for _, _, entry in items[position : position + limit]]
            position += limit
            positions[index] = position
            if position < len(items):
                heapq.heapreplace(heads, (items[position][0], index, position))
            else:
                heapq.heappop(heads)
            if not self._runnable(batch[0]):
                continue
            if skipping is not None and waits:  # counted as `_waits_for_holders` counts it
                skipping[1][models[index]] += 1
            else:
                yield batch

    def _runnable(self, entry: tuple[str, str]) -> bool:
        request = self._requests[entry[0]]
        return not self._blocked(request, request.graph.nodes[entry[1]])

    def _has_room(self) -> bool:
        """Whether some worker can take a batch (a draining one only for requests whose state it holds)."""
        return len(self._pools) > 0 or any(
            self._takes_ready(self._workers[worker_id]) for worker_id in self._draining
        )

    def _side_lane(self, node: TaskNode) -> bool:
        """Whether the node runs beside its worker's queue: a noise-scheduler node, under lego (the
        monolithic baselines run a request's nodes one after another on its worker)."""
        return self.policy == "lego" and _stateful(node)

    def _bound_to_side_lane(self, entry: tuple[str, str]) -> bool:
        """A noise-scheduler node whose request's state already has a worker: it can go there at
        once whatever that worker's queue (a first one, an init, waits for a worker with room)."""
        request = self._requests[entry[0]]
        node = request.graph.nodes[entry[1]]
        return self._side_lane(node) and node.state_key in request.state_workers

    def _requeue_bound(self, request: _Request, state_key: str) -> None:
        """The request's state has a worker now: its nodes of that state already queued (a step
        waiting while a replay rebuilds the state) are queued again, bound to the side lane."""
        for node in request.graph.nodes.values():
            entry = (request.request_id, node.id)
            if node.state_key == state_key and entry in self._ready:
                self._ready.discard(entry)
                self._ready.add(entry)

    def _has_room_for(self, worker: _Worker, node: TaskNode) -> bool:
        return self._side_lane(node) or self._takes_ready(worker)

    def _place(self, batch: list[tuple[str, str]], now: float) -> _Worker | None:
        """The cheapest worker for the batch (ties to the lowest index), if any may take it. A node
        of a request's noise-scheduler state goes where that state is; a batch without LoRA patches
        is priced on the few workers `WorkerPools.finalists` names, which include the cheapest."""
        nodes = [self._node(e) for e in batch]
        node, request = nodes[0], self._requests[batch[0][0]]
        pinned = request.state_workers.get(node.state_key) if node.state_key else None
        holder = self._workers.get(pinned) if pinned is not None else None
        if pinned is not None and (holder is None or not self._has_room_for(holder, node)):
            return None
        hosts, waiting = self._deferred_constraints(batch)
        made_at = self._inputs_made_at(batch)
        if holder is not None:
            candidates = [holder]
        elif node.patches or waiting:
            candidates = [w for w in self._workers.values() if not w.draining and self._takes_ready(w)]
        else:
            candidates = self._pools.finalists(node.model, hosts, made_at)
        if made_at > now and holder is None and len(self._idle) <= self.in_flight_requests():
            # with no idle worker to spare, rather behind what makes its inputs, as a chained step
            # (with some, waiting on one of them leaves the maker, maybe the model's only holder,
            # to the next call of its model)
            candidates += [w for w in self._makers(batch) if w not in candidates]
        candidates = [
            w for w in candidates if (not hosts or hosts == {w.host}) and w.worker_id not in waiting
        ]
        if not candidates:
            return None
        inputs = self._inputs(batch)

        def key(worker: _Worker) -> tuple[float, float, int]:
            # among equal costs, rather a worker that does not sit idle waiting for those inputs
            idle_wait = max(0.0, made_at - max(now, worker.busy_until))
            return self._cost(worker, nodes, inputs, now, made_at), idle_wait, worker.index

        return min(candidates, key=key)

    def _makers(self, batch: list[tuple[str, str]]) -> list[_Worker]:
        """The workers running the producers of the deferred inputs the batch must wait for whole,
        those with room for a step chained behind them (the ready depth leaves it free)."""
        makers: list[_Worker] = []
        for request_id, node_id in batch:
            request = self._requests[request_id]
            node = request.graph.nodes[node_id]
            for name in node.deferred:
                value = node.inputs.get(name)
                if isinstance(value, Ref) and value not in request.produced and value.node in request.running:
                    worker = self._workers.get(request.placed_on.get(value.node, ""))
                    if worker is None or worker.draining:
                        continue
                    if len(worker.in_flight) < self.max_in_flight:
                        makers.append(worker)
        return makers

    def _inputs_made_at(self, batch: list[tuple[str, str]], chained: bool = False) -> float:
        """When the inputs the batch must wait for whole should have been made (0: none): those it
        reads deferred from a producer still running, and with `chained` every input still being
        made (a chained batch is sent before its producers end); not those it reads deferred from a
        worker that streams that call's outputs in parts."""
        made = 0.0
        for request_id, node_id in batch:
            request = self._requests[request_id]
            node = request.graph.nodes[node_id]
            for name in node.inputs if chained else node.deferred:
                value = node.inputs.get(name)
                if not isinstance(value, Ref) or value in request.produced or value.node not in request.ends:
                    continue
                producer = request.graph.nodes[value.node]
                worker = self._workers.get(request.placed_on.get(value.node, ""))
                streamed = worker is not None and f"{producer.op}.{producer.mode}" in worker.streaming
                if streamed and name in node.deferred:
                    continue  # read part by part as it is made
                made = max(made, request.ends[value.node])
        return made

    def _chain(self, now: float, decisions: Decisions) -> None:
        """Under light load, queue on a worker the successors of the batches it holds whose every
        missing input those batches make: they start as soon as it has published them, without
        waiting for a round trip through the coordinator (its inputs arrive lazily on the worker's
        own data engine). Only when no ready work waits and no more requests are unfinished than
        there are workers: a chained node is not batched with nodes that become ready later.
        A round looks only at the workers whose batches, models or requests changed since it last
        looked (or at all, when the split mode turned); a learned execution time that moves
        meanwhile (`_faster_apart`) waits for such a change to be looked at again."""
        split_mode = len(self._idle) > self.in_flight_requests()  # `_chainable` leaves splits alone
        if split_mode != self._split_mode:
            self._split_mode, self._chain_all = split_mode, True
        if self._ready or self.in_flight_requests() > self._active_count():
            return  # off meanwhile: the workers changed are still noted
        if self._chain_all:
            workers = self._active()
        else:  # the others' `_chainable` answers are what they were (nothing)
            dirty = (self._workers.get(worker_id) for worker_id in self._chain_dirty)
            workers = sorted((w for w in dirty if w is not None and not w.draining), key=lambda w: w.index)
        self._chain_all = False
        self._chain_dirty.clear()
        for worker in workers:
            if worker.batches() and len(worker.in_flight) < self.max_in_flight:
                batch = self._chainable(worker)
                if batch:
                    for request_id, node_id in batch:
                        self._requests[request_id].remaining[node_id] = 0
                    self._dispatch(batch, worker, now, decisions)

    def _chainable(self, worker: _Worker) -> list[tuple[str, str]]:
        """The highest-priority group of same-key nodes whose missing producers all run or wait on
        `worker`, if it fits one batch."""
        held: dict[str, set[str]] = defaultdict(set)  # request → its nodes on this worker
        for batch_id in worker.batches():
            for task in self._in_flight[batch_id].tasks:
                held[task.request_id].add(task.node.id)
        groups: dict[tuple[object, ...], list[tuple[str, str]]] = defaultdict(list)
        for request_id, nodes in held.items():
            request = self._requests.get(request_id)
            if request is None or request.finished or request.replay:
                continue
            for successor in {s for n in nodes for s in request.successors[n]}:
                node = request.graph.nodes[successor]
                if (
                    successor in request.running
                    or successor in request.done
                    or node.deferred
                    or node.after
                    or node.model not in worker.loaded
                    or any(source not in worker.loras for source, _ in node.patches)
                    or request.state_workers.get(node.state_key, worker.worker_id) != worker.worker_id
                ):
                    continue
                if _producers(request, node, blocking=False) - request.done <= nodes:
                    groups[_batch_key(node)].append((request_id, successor))
        # a group that would not fit one batch is left whole to the ready queue: chaining part of it
        # would split what runs together there (a step's two CFG branches, and their denoisers)
        whole = [g for g in groups.values() if len(g) <= self._batch_limit(self._node(g[0]))]
        if len(self._idle) > self.in_flight_requests():  # idle workers to spare: a group that runs
            # faster split over them (a step's two CFG branches) goes to the ready queue to be split
            whole = [g for g in whole if len(g) == 1 or not self._faster_apart(self._node(g[0]), len(g))]
        if not whole:
            return []
        return sorted(min(whole, key=lambda entries: min(map(self._priority, entries))), key=self._priority)

    def _batch_limit(self, node: TaskNode) -> int:
        return 1 if _stateful(node) else self.costs.batch_limits(node)[0]

    def _every_batch_waits(
        self, model: str, groups: list[tuple[list[ReadyItem], int, int]], waiting: Counter[str], now: float
    ) -> bool:
        """Whether `_waits_for_holders` would answer yes for each batch still to come this round of
        `model`'s groups (items, where the next batch starts, batch size), so the round need not
        look at them. It would where no worker with room holds or preloads the model and no batch
        has a deferred constraint, when even the last of them, behind those already left waiting,
        queued for the full holders ends before a load would: `free_in + k * exec / holders` grows
        with k, and nothing the round dispatches meanwhile changes the holders (they take no ready
        batch: they are full; a batch queued behind the one making its inputs makes the round ask
        again) or gives a worker with room the model (only a batch of the model would).
        With ready work bound only when a worker frees, 256 simulated GPUs spent most of their
        rounds looking at such batches (5.3 M looks for 44 k dispatches over 10 s of arrivals)."""
        if not len(self._pools) or self._preloads[model] > 0 or self._pools.holds(model):
            return False
        full, first_free = self._full_holders_of(model, now)
        if not full:
            return False
        last = waiting[model] + sum(-(-(len(items) - start) // limit) for items, start, limit in groups)
        free_in = max(0.0, first_free - now)
        load = self.costs.load_s(model)
        for items, start, limit in groups:
            for lead in range(start, len(items), limit):
                batch = [entry for _, _, entry in items[lead : lead + limit]]
                node = self._node(batch[0])
                if node.patches or node.state_key or _stateful(node):
                    return False
                if any(self._deferred_constraints(batch)):
                    return False
                if free_in + last * self.costs.exec_s(node, len(batch)) / len(full) >= load:
                    return False
        return True

    def _waits_for_holders(self, batch: list[tuple[str, str]], now: float, waiting: Counter[str]) -> bool:
        """`_wait_for_holder` before pricing any worker, where its answer cannot depend on the worker
        chosen: no worker with room holds or preloads the model, so the cheapest one would load it.
        Under load most batches that wait are these, again at every round until a holder frees."""
        node = self._node(batch[0])
        if node.patches or node.state_key or not len(self._pools) or self._preloads[node.model] > 0:
            return False
        if self._pools.holds(node.model) or any(self._deferred_constraints(batch)):
            return False
        return self._wait_for_holder(batch, None, now, waiting)

    def _wait_for_holder(
        self, batch: list[tuple[str, str]], chosen: _Worker | None, now: float, waiting: Counter[str]
    ) -> bool:
        """Whether a batch whose cheapest free worker would have to load its model should rather
        queue for the full workers that hold it: when they free, with the batches already left for
        them this round ahead of it, sooner than the load takes. Loading for every batch that finds
        the holders momentarily full thrashed devices shared by many models (342 loads for 89
        requests of the four-family mix at RS 0.25 in simulation); waiting regardless of the queue
        behind them, or behind a holder stuck past its estimates, kept a model on the one or two
        workers that held it while its requests missed their deadlines. A holder overdue by more
        than a load is not waited for."""
        node = self._node(batch[0])
        if chosen is not None and node.patches and self._wait_for_lora_holder(batch, chosen, now, waiting):
            return True
        if chosen is not None and (node.model in chosen.loaded or node.model in chosen.preloading):
            return False
        load = self.costs.load_s(node.model)
        full, first_free = self._full_holders_of(node.model, now)
        holders = self._safe_for_deferred(batch, full)
        if not holders:
            return False
        if holders is not full:
            first_free = min(w.busy_until for w in holders)
        free_in = max(0.0, first_free - now)
        queued = (waiting[node.model] + 1) * self.costs.exec_s(node, len(batch)) / len(holders)
        if free_in + queued >= load:
            return False
        waiting[node.model] += 1
        return True

    def _wait_for_lora_holder(
        self, batch: list[tuple[str, str]], chosen: _Worker, now: float, waiting: Counter[str]
    ) -> bool:
        """The same for a batch of LoRA-patched nodes whose chosen worker lacks the LoRAs: it
        queues for a full worker holding them when that ends it sooner, with the batches left for
        those workers this round ahead of it. Not steps that may start without their LoRAs
        (asynchronous LoRA loading): they start on the free worker while it fetches them."""
        nodes = [self._node(entry) for entry in batch]
        sources = {source for source, _ in nodes[0].patches}
        if not sources <= chosen.loras and not all(node.patches_optional for node in nodes):
            full = [
                w
                for w in self._workers.values()
                if not w.draining and not self._takes_ready(w) and sources <= w.loras
            ]
            holders = self._safe_for_deferred(batch, full)
            if holders:
                inputs, made_at = self._inputs(batch), self._inputs_made_at(batch)
                key = f"lora:{nodes[0].model}"
                queued = waiting[key] * self.costs.exec_s(nodes[0], len(batch)) / len(holders)
                soonest = min(self._cost(w, nodes, inputs, now, made_at) for w in holders)
                if soonest + queued < self._cost(chosen, nodes, inputs, now, made_at):
                    waiting[key] += 1
                    return True
        return False

    def _full_holders_of(self, model: str, now: float) -> tuple[list[_Worker], float]:
        """The active workers holding `model` with no room for ready work and not overdue by more
        than its load, and when the first of them frees: the same for every batch until the next
        dispatch (the cache is cleared then, and at each round)."""
        if model not in self._full_holders:
            load = self.costs.load_s(model)
            full = [
                w
                for w in map(self._workers.__getitem__, self._holders[model])
                if not w.draining and not self._takes_ready(w) and w.busy_until > now - load
            ]
            self._full_holders[model] = full, min((w.busy_until for w in full), default=math.inf)
        return self._full_holders[model]

    def _users(self, model: str) -> int:
        """Unfinished requests whose graph uses `model`: the most replicas that can work at once."""
        return self._model_users[model]

    def _safe_for_deferred(self, batch: list[tuple[str, str]], candidates: list[_Worker]) -> list[_Worker]:
        hosts, waiting = self._deferred_constraints(batch)
        if not hosts and not waiting:
            return candidates
        return [w for w in candidates if (not hosts or hosts == {w.host}) and w.worker_id not in waiting]

    def _deferred_constraints(self, batch: list[tuple[str, str]]) -> tuple[set[str], set[str]]:
        """Where a batch may go without deadlock or a pull of a tensor not yet made: a consumer of a
        pending deferred input stays on its producer's host (pending handles name no location: the
        hosts returned, if any), and a producer never queues behind a consumer already waiting for
        it (the workers returned)."""
        hosts: set[str] = set()
        waiting: set[str] = set()
        for request_id, node_id in batch:
            request = self._requests[request_id]
            node = request.graph.nodes[node_id]
            for name in node.deferred:  # only inputs read deferred can be pending
                value = node.inputs.get(name)
                if isinstance(value, Ref) and value not in request.produced:
                    producer_worker = self._workers.get(request.placed_on.get(value.node, ""))
                    if producer_worker is not None:
                        hosts.add(producer_worker.host)
            if request.early_successors[node_id]:
                waiting |= {
                    request.placed_on[s] for s in request.early_successors[node_id] if s in request.running
                }
        return hosts, waiting

    def _count_holder_waits(self, now: float, waiting: Counter[str]) -> None:
        """A model whose ready work waited for busy holders in the last round and still does has
        waited the time between the two rounds."""
        last, waited = self._waiting_since
        now_waiting = {model for model, count in waiting.items() if count > 0}
        for model in waited & now_waiting:
            self._held_up.add(model, now - last, now)
        self._waiting_since = (now, now_waiting)

    def _preload_hot_models(self, now: float, decisions: Decisions) -> None:
        """Scale a model out before its work is ready: when the work admitted but not yet done for it
        exceeds, per replica, both PRELOAD_BACKLOG_S and its load time (so the load pays off), when
        the work admitted for it lately keeps each replica more than SCALE_OUT_DEMAND busy, or when
        its ready work has lately waited that long for busy holders, an idle worker loads it now.
        One preload per model at a time: replicas grow step by step."""
        if not self._idle:
            return
        idle: list[_Worker] | None = None  # sorted when a model first needs one
        for model, pending in sorted(self._pending_s.items(), key=lambda item: -item[1]):
            if idle == [] or pending <= 0:
                return
            holders = self._holders[model]  # up to every worker: count the draining, not copy the rest
            replicas = len(holders) - len(self._draining & holders)
            worth = max(PRELOAD_BACKLOG_S, self.costs.load_s(model))  # seconds a replica must save
            backlogged = pending / max(1, replicas) >= worth
            demanded = self._demand.rate(model, now) >= SCALE_OUT_DEMAND * max(1, replicas)
            held_up = self._held_up.total(model, now) >= worth
            if not (backlogged or demanded or held_up):
                continue
            if self._users(model) <= replicas:  # one request's steps run one after another
                continue
            if self._preloads[model] > 0:
                continue
            if idle is None:
                idle = sorted(map(self._workers.__getitem__, self._idle), key=lambda w: w.index)
            target = next((w for w in idle if model not in w.loaded and model not in w.preloading), None)
            if target is not None:
                target.preloading.add(model)
                self._preloads[model] += 1
                idle.remove(target)
                decisions.preloads.append(Preload(target.worker_id, model))

    def _dispatch(
        self, batch: list[tuple[str, str]], worker: _Worker, now: float, decisions: Decisions
    ) -> None:
        first = self._node(batch[0])
        batch_id = f"b{next(self._batch_ids)}"
        tasks = []
        ends: list[dict[str, float]] = []  # each task's request's
        for request_id, node_id in batch:
            request = self._requests[request_id]
            node = request.graph.nodes[node_id]
            if node.state_key and node.state_key not in request.state_workers:
                request.state_workers[node.state_key] = worker.worker_id
                self._requeue_bound(request, node.state_key)
            inputs: dict[str, object] = {}
            for name, value in node.inputs.items():
                if not isinstance(value, Ref):
                    inputs[name] = value
                elif value in request.produced:
                    inputs[name] = request.produced[value].handle
                else:  # a deferred input whose producer is running
                    inputs[name] = Pending(f"{request_id}/{value.node}/{value.output}")
            tasks.append(BatchTask(f"{request_id}/{node_id}", request_id, node, inputs))
            request.running.add(node_id)
            request.placed_on[node_id] = worker.worker_id
            ends.append(request.ends)
            for successor in request.early_successors[node_id]:
                request.remaining[successor] -= 1
                if request.remaining[successor] == 0:
                    self._ready.add((request_id, successor))
            decisions.events.append(NodeStarted(request_id, node_id, worker.worker_id))
        dispatch = Dispatch(
            batch_id, worker.worker_id, first.op, first.model, first.mode, tasks, first.patches, now
        )
        self._ready.difference_update(batch)
        self._full_holders.clear()
        self._dispatches += 1
        self._in_flight[batch_id] = dispatch
        decisions.dispatches.append(dispatch)
        self._touch(worker, {request_id for request_id, _ in batch})
        start = max(now, self._inputs_made_at(batch, chained=True))
        if self._side_lane(first):  # its queue is not touched
            dispatch.side_lane = True
            worker.side.append(batch_id)
            end = start + self.costs.exec_s(first, len(batch))
        else:
            if not self._takes_ready(worker):  # behind the batch making its inputs
                self._dispatches_behind += 1
            worker.in_flight.append(batch_id)
            load = self._load_s(worker, [task.node for task in tasks])
            worker.loras.update(source for source, _ in first.patches)  # fetched there from now on
            execution = self.costs.exec_s(first, len(batch)) + self.costs.overhead_s
            worker.busy_until = end = max(start, worker.busy_until) + load + execution
            self._refresh(worker)
        for (_, node_id), request_ends in zip(batch, ends, strict=True):
            request_ends[node_id] = end

    # ---- monolithic baselines ----

    def _allowed_workers(self, workflow: str, now: float, workers: list[_Worker]) -> list[_Worker]:
        """Of the active `workers` (by index), those the workflow may run on."""
        if self.policy == "clockwork" or not workers:
            return workers
        if self.policy == "shepherd" and now - self._planned_at >= SHEPHERD_REPLAN_S:
            self._plan = {}
        if workflow not in self._plan:
            self._replan(workers, now, extra=workflow)
        names = set(self._plan.get(workflow, []))
        return [w for w in workers if w.worker_id in names]

    def _replan(self, workers: list[_Worker], now: float, extra: str) -> None:
        known = sorted(set(self._arrivals) | {extra} | {r.workflow for r in self._requests.values()})
        weights = {name: (self._arrivals[name] or 1) if self.policy == "shepherd" else 1 for name in known}
        self._plan = apportion(weights, [w.worker_id for w in workers])
        self._planned_at = now

    def _schedule_monolithic(self, now: float, decisions: Decisions) -> None:
        self._assign_requests(now)

        for worker in self._workers.values():
            if worker.serving is None or worker.in_flight:
                continue
            serving = self._requests.get(worker.serving)
            if serving is None or serving.finished:
                worker.serving = None
                continue
            queue = self._ready_of(serving)
            if queue:
                key = _batch_key(self._node(queue[0]))
                limit = 1 if _stateful(self._node(queue[0])) else len(queue)
                batch = [e for e in queue if _batch_key(self._node(e)) == key][:limit]
                self._dispatch(batch, worker, now, decisions)

    def _ready_of(self, request: _Request) -> list[tuple[str, str]]:
        """The request's ready entries, highest priority first."""
        entries = ((request.request_id, node_id) for node_id in request.graph.nodes)
        return sorted((e for e in entries if e in self._ready and self._runnable(e)), key=self._priority)

    def _assign_requests(self, now: float) -> None:
        """FCFS: each waiting request, in arrival order, takes a free worker it may run on (the one
        holding most of its models). A workflow none of whose workers is free is passed over for
        the rest of the round (its share is still looked up: that is when shares are replanned)."""
        workers = sorted(self._active(), key=lambda w: w.index)
        free_count = sum(1 for w in workers if w.serving is None)
        allowed: dict[str, list[_Worker]] = {}  # by workflow, while the plan stays the same
        plan = self._plan
        for request in list(self._open.values()):  # in arrival order
            if request.worker is not None:
                continue
            if self._plan is not plan:  # replanned (a new workflow came): every share moved
                allowed.clear()
                plan = self._plan
            if request.workflow not in allowed:
                allowed[request.workflow] = self._allowed_workers(request.workflow, now, workers)
            if free_count == 0:
                continue
            free = [w for w in allowed[request.workflow] if w.serving is None]
            if not free:
                allowed[request.workflow] = []
                continue
            models = {n.model for n in request.graph.nodes.values()}
            worker = max(free, key=lambda w: (len(models & w.loaded), -w.index))
            worker.serving = request.request_id
            request.worker = worker.worker_id
            free_count -= 1

    # ---- completions ----

    def complete(
        self,
        batch_id: str,
        outputs: dict[str, dict[str, Tensor]],
        now: float,
        execution_s: float | None = None,
        loading_s: float = 0.0,
        unpatched: frozenset[str] = frozenset(),
        signatures: dict[str, tuple[float, ...]] | None = None,
    ) -> list[Event]:
        """A batch finished at `now`: its outputs, its measured execution and the model loads its
        worker did meanwhile (neither is control-plane overhead), the tasks that ran without
        their LoRAs (still loading), and the prompt signatures its tasks were asked for."""
        dispatch = self._in_flight.pop(batch_id, None)
        if dispatch is None:
            return []  # a stale report (the worker was removed meanwhile): never applied twice
        worker = self._workers.get(dispatch.worker_id)
        self._touch(worker, {task.request_id for task in dispatch.tasks})
        if worker is not None and batch_id in worker.side:
            worker.side.remove(batch_id)
        elif worker is not None:
            worker.in_flight.remove(batch_id)
            if not worker.in_flight:
                worker.busy_until = now
            self._refresh(worker)
            if execution_s is not None:  # what the batch cost beyond its execution, as seen from here
                turnaround = now - max(dispatch.sent_at, worker.last_done_at)
                self.costs.observe_overhead(turnaround - execution_s - loading_s)
            worker.last_done_at = now
        if execution_s is not None:
            self.costs.observe(dispatch.tasks[0].node, len(dispatch.tasks), execution_s)
        events: list[Event] = []
        for request_id in {task.request_id for task in dispatch.tasks}:  # a batch's time counts once
            if request_id in self._requests:
                self._requests[request_id].execution_s += execution_s or 0.0
        for task in dispatch.tasks:
            request = self._requests.get(task.request_id)
            if request is None or request.finished:
                if request is None or len(request.done) < len(request.graph.nodes):
                    # outputs of a failed or released request, published after it was freed: no
                    # reader will come, and its Free has already run on the data engines
                    self._dead.extend(t.handle for t in outputs.get(task.task_id, {}).values())
                continue
            node = task.node
            request.running.discard(node.id)
            if node.id not in request.done:
                self._count_pending(request, node, -1)
                request.unpatched_calls += task.task_id in unpatched
            for name, tensor in outputs.get(task.task_id, {}).items():
                request.produced[Ref(node.id, name)] = tensor
            request.done.add(node.id)
            if request.replay and request.replay[0] == node.id:  # rebuilt state, outputs unchanged
                request.replay.pop(0)
                if request.replay:
                    self._ready.add((request.request_id, request.replay[0]))
                continue
            events.append(NodeFinished(request.request_id, node.id))
            self._collect_garbage(request, node)
            if node.step:
                events.append(StepProgress(request.request_id, node.step, node.total_steps))
            for successor in request.successors[node.id]:
                if successor in request.running or successor in request.done:
                    continue  # chained: already queued behind this node on its worker
                request.remaining[successor] -= 1
                if request.remaining[successor] == 0:
                    self._ready.add((request.request_id, successor))
            if request.site is not None and node.id == request.site.encoder:
                self._look_up_approx(request, (signatures or {}).get(task.task_id, ()))
            if len(request.done) == len(request.graph.nodes):
                self._observe_outcome(request, now)
                events.append(self._finish(request))
        return events

    def _observe_outcome(self, request: _Request, now: float) -> None:
        """A request ended now: done, or dropped at its deadline."""
        if request.admitted_by_estimate:
            missed = 1.0 if now >= request.deadline else 0.0
            self._miss_rate += MISS_WEIGHT * (missed - self._miss_rate)

    def _admission_scale(self) -> float:
        return 1.0 / (1.0 - min(0.9, max(0.0, self._miss_rate - MISS_TOLERANCE)))

    def _finish(self, request: _Request) -> RequestDone:
        request.finished = True
        self._close(request)
        self._free_worker(request)
        self._unpin(request)
        if request.site is not None and request.signature and request.hit is None:
            self._keep_latents(request, request.site)
        result = {name: request.produced[ref].handle for name, ref in request.graph.outputs.items()}
        skipped = request.hit.skip - request.site.repeats if request.hit and request.site else 0
        executed = len(request.graph.nodes)
        return RequestDone(
            request.request_id, result, executed, request.execution_s, request.unpatched_calls, skipped
        )

    # ---- approximate caching ----

    def _look_up_approx(self, request: _Request, signature: tuple[float, ...]) -> None:
        """The prompt's signature has come: resume from the closest cached latent, if any is close
        enough (the loop's init was held for this, so none of the loop has run yet)."""
        site = request.site
        if site is None or not signature or request.signature:
            return
        request.signature = signature
        hit = self.approx.lookup(site.context, signature, site.steps)
        if hit is None:
            return
        before = request.graph
        self._chain_all = True
        request.graph = resume_from_cache(before, hit.skip)
        request.hit = hit
        request.external[CACHED_LATENTS] = request.produced[CACHED_LATENTS] = Tensor(
            hit.handle, hit.nbytes, hit.host
        )
        for node_id in before.nodes.keys() - request.graph.nodes.keys():
            self._count_pending(request, before.nodes[node_id], -1)
        # the init runs in its new mode, which may cost otherwise
        self._count_pending(request, before.nodes[site.init], -1)
        self._count_pending(request, request.graph.nodes[site.init], +1)
        for ref, count in before.consumers.items():  # reads of the dropped nodes will not come
            if ref in request.readers:
                request.readers[ref] -= count - request.graph.consumers.get(ref, 0)
        self._unready(request, before)  # what stays is queued anew: the rewrite changed depths
        self._init_readiness(request)

    def _keep_latents(self, request: _Request, site: ApproxSite) -> None:
        """A request that ran its whole loop leaves the latents later ones could start from."""
        latents = {}
        for skip in candidate_skips(site.steps, len(site.iterations), site.repeats):
            tensor = request.produced.get(Ref(site.iterations[skip - 1][-1], "latents"))
            if tensor is not None:
                latents[skip] = (tensor.handle, tensor.nbytes, tensor.host)
        self.approx.insert(site.context, request.signature, request.request_id, latents)

    def _unpin(self, request: _Request) -> None:
        if request.hit is not None and CACHED_LATENTS in request.external:
            del request.external[CACHED_LATENTS]
            self.approx.unpin(request.hit.item)

    def retained_tensors(self, request_id: str) -> list[object]:
        """Handles of the request's tensors the approximate cache keeps: its Free must spare them."""
        return self.approx.retained(request_id)

    def _collect_garbage(self, request: _Request, node: TaskNode) -> None:
        for value in node.inputs.values():
            if isinstance(value, Ref) and value in request.readers:
                request.readers[value] -= 1
                # (a consumer of a deferred input may report before its producer does: then the
                # tensor is freed with the request)
                if request.readers[value] == 0 and value not in request.kept and value in request.produced:
                    self._dead.append(request.produced[value].handle)

    def take_dead_tensors(self) -> list[object]:
        """Tensors whose last consumer has finished: the shell frees them on the data engines."""
        dead, self._dead = self._dead + self.approx.take_dead(), []
        return dead

    def fail_batch(self, batch_id: str, message: str) -> list[Event]:
        dispatch = self._in_flight.pop(batch_id, None)
        if dispatch is None:
            return []
        worker = self._workers.get(dispatch.worker_id)
        self._touch(worker, {task.request_id for task in dispatch.tasks})
        if worker is not None:
            (worker.side if batch_id in worker.side else worker.in_flight).remove(batch_id)
            self._refresh(worker)
        events: list[Event] = []
        for request_id in dict.fromkeys(task.request_id for task in dispatch.tasks):
            request = self._requests.get(request_id)
            if request is not None and not request.finished:
                events.append(
                    self._fail(request, f"{dispatch.op}.{dispatch.mode} failed: {message}", "internal")
                )
        return events

    def _free_worker(self, request: _Request) -> None:
        if request.worker in self._workers and self._workers[request.worker].serving == request.request_id:
            self._workers[request.worker].serving = None

    def _fail(self, request: _Request, message: str, code: FailureCode) -> RequestFailed:
        request.finished = True
        self._close(request)
        self._unpin(request)
        for node in request.graph.nodes.values():
            if node.id not in request.done:
                self._count_pending(request, node, -1)
        self._free_worker(request)
        self._unready(request)
        return RequestFailed(request.request_id, message, code)


def apportion(weights: dict[str, int], workers: list[str]) -> dict[str, list[str]]:
    """Split workers among workflows in proportion to their weights (largest remainder, ≥ 1 each
    while workers last); with more workflows than workers, workflows share workers round-robin."""
    names = sorted(weights)
    if not names or not workers:
        return {}
    if len(names) >= len(workers):
        return {name: [workers[i % len(workers)]] for i, name in enumerate(names)}
    total = sum(weights.values())
    spare = len(workers) - len(names)
    quotas = {name: spare * weights[name] / total for name in names}
    counts = {name: 1 + math.floor(quotas[name]) for name in names}
    leftovers = len(workers) - sum(counts.values())
    for name in sorted(names, key=lambda n: quotas[n] - math.floor(quotas[n]), reverse=True)[:leftovers]:
        counts[name] += 1
    plan: dict[str, list[str]] = {}
    position = 0
    for name in names:
        plan[name] = workers[position : position + counts[name]]
        position += counts[name]
    return plan
