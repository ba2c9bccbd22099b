"""The scheduler core: pure, deterministic, no I/O and no clock of its own (time is an argument).

It holds each request's DAG state, a ready queue ordered by request arrival then depth from the
sinks, groups ready nodes with the same (op, model, mode) into batches, and places each batch on an
idle worker (the one holding the request's noise-scheduler state for stateful nodes; else one that
has the model loaded; else any). The coordinator service and, later, the simulator drive it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from lego import operators
from lego.graph import Ref, RequestGraph, TaskNode
from lego.values import Scalar

Handle = object  # opaque to the core: whatever the shell uses for tensor handles


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
    outputs: dict[str, Handle]
    nodes_executed: int


@dataclass(frozen=True)
class RequestFailed:
    request_id: str
    message: str
    retryable: bool = False


Event = NodeStarted | NodeFinished | StepProgress | RequestDone | RequestFailed


@dataclass
class BatchTask:
    task_id: str
    request_id: str
    node: TaskNode
    inputs: dict[str, Scalar | Handle]


@dataclass
class Dispatch:
    batch_id: str
    worker_id: str
    op: str
    model: str
    mode: str
    tasks: list[BatchTask]
    patches: tuple[tuple[str, float], ...] = ()


@dataclass
class _Request:
    request_id: str
    graph: RequestGraph
    arrival: float
    seq: int
    remaining: dict[str, int]
    successors: dict[str, list[str]]
    produced: dict[Ref, Handle] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    state_workers: dict[str, str] = field(default_factory=dict)
    finished: bool = False
    order: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.order = {node_id: index for index, node_id in enumerate(self.graph.nodes)}


@dataclass
class _Worker:
    worker_id: str
    batch_id: str | None = None
    loaded: set[str] = field(default_factory=set)


def _batch_key(node: TaskNode) -> tuple[str, str, str, tuple[tuple[str, float], ...]]:
    """Nodes that may share one forward pass: same operator, model, mode and patch set."""
    return (node.op, node.model, node.mode, node.patches)


DEFAULT_MAX_BATCH = {"unet": 8, "text_encoder": 8, "vae": 4}


def default_max_batch(op: str, model: str, mode: str) -> int:
    return DEFAULT_MAX_BATCH.get(op, 1)


class Scheduler:
    def __init__(self, max_batch: Callable[[str, str, str], int] = default_max_batch) -> None:
        self._max_batch = max_batch
        self._requests: dict[str, _Request] = {}
        self._workers: dict[str, _Worker] = {}
        self._ready: set[tuple[str, str]] = set()  # (request_id, node_id)
        self._in_flight: dict[str, Dispatch] = {}
        self._seq = itertools.count()
        self._batch_ids = itertools.count(1)

    # ---- membership ----

    def add_worker(self, worker_id: str, loaded: list[str] | None = None) -> None:
        self._workers.setdefault(worker_id, _Worker(worker_id)).loaded.update(loaded or [])

    def remove_worker(self, worker_id: str) -> list[Event]:
        """Requeue the worker's in-flight nodes; requests whose scheduler state it held fail."""
        worker = self._workers.pop(worker_id, None)
        events: list[Event] = []
        if worker is None:
            return events
        if worker.batch_id is not None:
            dispatch = self._in_flight.pop(worker.batch_id)
            for task in dispatch.tasks:
                if task.request_id in self._requests:
                    self._ready.add((task.request_id, task.node.id))
        for request in list(self._requests.values()):
            if not request.finished and worker_id in request.state_workers.values():
                events.append(
                    self._fail(
                        request, f"worker {worker_id} holding its scheduler state left", retryable=True
                    )
                )
        return events

    def set_loaded(self, worker_id: str, models: list[str]) -> None:
        """What the worker reports resident on its device (after loads and evictions)."""
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.loaded = set(models)

    def workers(self) -> dict[str, tuple[bool, list[str]]]:
        return {w.worker_id: (w.batch_id is not None, sorted(w.loaded)) for w in self._workers.values()}

    # ---- requests ----

    def submit(self, request_id: str, graph: RequestGraph, now: float) -> None:
        if request_id in self._requests:
            return
        remaining: dict[str, int] = {}
        successors: dict[str, list[str]] = {node_id: [] for node_id in graph.nodes}
        for node in graph.nodes.values():
            producers = {v.node for v in node.inputs.values() if isinstance(v, Ref)}
            remaining[node.id] = len(producers)
            for producer in producers:
                successors[producer].append(node.id)
        request = _Request(request_id, graph, now, next(self._seq), remaining, successors)
        self._requests[request_id] = request
        self._ready.update((request_id, n) for n, count in remaining.items() if count == 0)

    def release(self, request_id: str) -> None:
        """Forget a request (answered, failed or cancelled); its queued nodes are dropped."""
        self._requests.pop(request_id, None)
        self._ready = {entry for entry in self._ready if entry[0] != request_id}

    def cancel(self, request_id: str) -> list[Event]:
        request = self._requests.get(request_id)
        if request is None or request.finished:
            return []
        return [self._fail(request, "cancelled")]

    def in_flight_requests(self) -> int:
        return sum(1 for r in self._requests.values() if not r.finished)

    def ready_count(self) -> int:
        return len(self._ready)

    # ---- scheduling ----

    def _priority(self, entry: tuple[str, str]) -> tuple[int, int, int]:
        request = self._requests[entry[0]]
        node = request.graph.nodes[entry[1]]
        return (request.seq, -node.depth, request.order[node.id])

    def _resolve_inputs(self, request: _Request, node: TaskNode) -> dict[str, Scalar | Handle]:
        return {
            name: request.produced[value] if isinstance(value, Ref) else value
            for name, value in node.inputs.items()
        }

    def _choose_worker(self, request: _Request, node: TaskNode, idle: list[_Worker]) -> _Worker | None:
        if node.state_key and node.state_key in request.state_workers:
            bound = request.state_workers[node.state_key]
            return next((w for w in idle if w.worker_id == bound), None)
        with_model = [w for w in idle if node.model in w.loaded]
        candidates = with_model or idle
        return candidates[0] if candidates else None

    def schedule(self, now: float) -> tuple[list[Dispatch], list[Event]]:
        dispatches: list[Dispatch] = []
        events: list[Event] = []
        idle = [w for w in self._workers.values() if w.batch_id is None]
        queue = sorted(self._ready, key=self._priority)
        taken: set[tuple[str, str]] = set()
        for entry in queue:
            if not idle:
                break
            if entry in taken:
                continue
            request = self._requests[entry[0]]
            node = request.graph.nodes[entry[1]]
            worker = self._choose_worker(request, node, idle)
            if worker is None:
                continue
            stateful = operators.SIGNATURES.get(node.op, {}).get(node.mode)
            limit = (
                1
                if (stateful and stateful.stateful)
                else max(1, self._max_batch(node.op, node.model, node.mode))
            )
            members = [entry]
            for other in queue:
                if len(members) >= limit:
                    break
                if other in taken or other == entry:
                    continue
                other_node = self._requests[other[0]].graph.nodes[other[1]]
                if _batch_key(other_node) == _batch_key(node):
                    members.append(other)
            taken.update(members)
            batch_id = f"b{next(self._batch_ids)}"
            tasks = []
            for request_id, node_id in members:
                member_request = self._requests[request_id]
                member_node = member_request.graph.nodes[node_id]
                if member_node.state_key:
                    member_request.state_workers.setdefault(member_node.state_key, worker.worker_id)
                tasks.append(
                    BatchTask(
                        f"{request_id}/{node_id}",
                        request_id,
                        member_node,
                        self._resolve_inputs(member_request, member_node),
                    )
                )
                events.append(NodeStarted(request_id, node_id, worker.worker_id))
            dispatch = Dispatch(
                batch_id, worker.worker_id, node.op, node.model, node.mode, tasks, node.patches
            )
            self._ready.difference_update(members)
            self._in_flight[batch_id] = dispatch
            worker.batch_id = batch_id
            idle.remove(worker)
            dispatches.append(dispatch)
        return dispatches, events

    # ---- completions ----

    def complete(self, batch_id: str, outputs: dict[str, dict[str, Handle]], now: float) -> list[Event]:
        dispatch = self._in_flight.pop(batch_id, None)
        if dispatch is None:
            return []  # a stale report (the worker was removed meanwhile): ignore, never apply twice
        worker = self._workers.get(dispatch.worker_id)
        if worker is not None:
            worker.batch_id = None
        events: list[Event] = []
        for task in dispatch.tasks:
            request = self._requests.get(task.request_id)
            if request is None or request.finished:
                continue
            node = task.node
            for name, handle in outputs.get(task.task_id, {}).items():
                request.produced[Ref(node.id, name)] = handle
            request.done.add(node.id)
            events.append(NodeFinished(request.request_id, node.id))
            if node.step:
                events.append(StepProgress(request.request_id, node.step, node.total_steps))
            for successor in request.successors[node.id]:
                request.remaining[successor] -= 1
                if request.remaining[successor] == 0:
                    self._ready.add((request.request_id, successor))
            if len(request.done) == len(request.graph.nodes):
                request.finished = True
                result = {name: request.produced[ref] for name, ref in request.graph.outputs.items()}
                events.append(RequestDone(request.request_id, result, len(request.graph.nodes)))
        return events

    def fail_batch(self, batch_id: str, message: str) -> list[Event]:
        dispatch = self._in_flight.pop(batch_id, None)
        if dispatch is None:
            return []
        worker = self._workers.get(dispatch.worker_id)
        if worker is not None:
            worker.batch_id = None
        events: list[Event] = []
        for request_id in dict.fromkeys(task.request_id for task in dispatch.tasks):
            request = self._requests.get(request_id)
            if request is not None and not request.finished:
                events.append(self._fail(request, f"{dispatch.op}.{dispatch.mode} failed: {message}"))
        return events

    def _fail(self, request: _Request, message: str, retryable: bool = False) -> RequestFailed:
        request.finished = True
        self._ready = {entry for entry in self._ready if entry[0] != request.request_id}
        return RequestFailed(request.request_id, message, retryable)
