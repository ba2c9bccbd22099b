"""A discrete-event simulator that drives the same Scheduler as the coordinator, in simulated time.

Workers are modelled from the measured profiles, as the emulated backend models them: a batch takes
the profiled execution time (plus `overhead_s`, a live control plane's turnaround per batch:
dispatch, input fetch, output publish, report; 0 by default); a model that is not resident first
costs its load time (disk → host the first time on a worker, then host → device) and evicts
least-recently-used idle models under the device memory budget. A worker runs its batches one
after another, each starting once the inputs it was sent before they were made (deferred or
chained) have been; a side-lane batch (a noise-scheduler node) runs as soon as its inputs are
there, beside the worker's queue. The scheduler's decisions are taken exactly as in the live
coordinator; only the clock and the workers are simulated. Pure: no I/O, no wall clock.

Workers start with an empty device and every model prefetched into host memory. As on a live
bench, requests alone on the idle cluster, one after another (`run(..., alone=...)`, where a live
bench measures standalone latencies), then a warm-up (`warmup=`, e.g. the first seconds of the same
trace) run first and are not counted: their loads leave each policy's models where that policy put
them; the measured arrivals start WARMUP_GAP_S after the warm-up has finished. (Without the requests
alone, the warm-up's arrivals piled up on a cold cluster and left more replicas than a live bench
starts from: FLUX.1-schnell at 4 GPUs, 0.98 simulated against 0.81-0.94 live.)"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from lego.device_cache import DeviceCache
from lego.graph import RequestGraph, instantiate
from lego.profiles import ProfileSet, profile_name
from lego.request_inputs import resolve_inputs
from lego.v1 import compiler_pb2
from lego.values import Scalar

from lego_coordinator import scheduler as core
from lego_coordinator.costs import CostModel

DEVICE_BYTES = 80 * 10**9
UNKNOWN_MODEL_BYTES = 10**9
WARMUP_GAP_S = 10.0  # idle time between the end of the warm-up and the first measured arrival
WARMUP_SLO_S = 600.0
GC_THRESHOLD = 50_000  # allocations between young-generation collections (Python's default: 700)


@dataclass(frozen=True)
class Arrival:
    time_s: float
    workflow: str
    inputs: dict[str, Scalar]
    slo_s: float | None = None


@dataclass(frozen=True)
class _Submit:
    request_id: str
    arrival: Arrival


@dataclass(frozen=True)
class _Done:
    batch_id: str
    execution_s: float
    loading_s: float


@dataclass
class _SimWorker:
    worker_id: str
    cache: DeviceCache
    host_models: set[str] = field(default_factory=set)
    free_at: float = 0.0
    busy_s: float = 0.0
    loads: int = 0


@dataclass
class Outcome:
    workflow: str
    arrival: float
    slo_s: float = math.inf
    latency_s: float | None = None
    failure: str = ""  # "rejected", "deadline", ...


@dataclass
class SimulationResult:
    outcomes: dict[str, Outcome]
    gpu_seconds: float
    model_loads: int
    end_s: float

    def summary(self) -> dict[str, object]:
        return summarize(list(self.outcomes.values())) | {
            "gpu_seconds": round(self.gpu_seconds, 3),
            "model_loads": self.model_loads,
            "simulated_s": round(self.end_s, 3),
            "per_workflow": {
                name: summarize([o for o in self.outcomes.values() if o.workflow == name])
                for name in sorted({o.workflow for o in self.outcomes.values()})
            },
        }


def summarize(outcomes: list[Outcome]) -> dict[str, object]:
    latencies = sorted(o.latency_s for o in outcomes if o.latency_s is not None)
    within = sum(1 for o in outcomes if o.latency_s is not None and o.latency_s <= o.slo_s)

    def pct(fraction: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, math.ceil(fraction * len(latencies)) - 1)], 4)

    return {
        "requests": len(outcomes),
        "completed": len(latencies),
        "slo_attainment": round(within / len(outcomes), 4) if outcomes else None,
        "rejected": sum(1 for o in outcomes if o.failure == "rejected"),
        "dropped": sum(1 for o in outcomes if o.failure == "deadline"),
        "p50_s": round(statistics.median(latencies), 4) if latencies else None,
        "p90_s": pct(0.9),
        "p99_s": pct(0.99),
    }


class Simulator:
    def __init__(
        self,
        workflows: dict[str, compiler_pb2.WorkflowSpec],
        gpus: int,
        profiles: ProfileSet,
        policy: str = "lego",
        batch_sizes: dict[str, tuple[int, int]] | None = None,
        slo_factor: float = 2.0,
        device_bytes: int = DEVICE_BYTES,
        overhead_s: float = 0.0,
        ready_depth: int = 1,
    ) -> None:
        self.workflows = workflows
        self.profiles = profiles
        self.overhead_s = overhead_s  # per batch: the control plane's turnaround beside its execution
        self.truth = CostModel(profiles, batch_sizes or {}, overhead_s=overhead_s)
        costs = CostModel(profiles, batch_sizes or {}, overhead_s=overhead_s)
        self.scheduler = core.Scheduler(
            costs,
            policy,
            enforce_slo=True,
            slo_factor=slo_factor,
            ready_depth=ready_depth,
            bind_ahead_s=2 * overhead_s,  # what the live coordinator learns: twice its overhead
        )
        self.workers = {f"gpu{i}": _SimWorker(f"gpu{i}", DeviceCache(device_bytes)) for i in range(gpus)}
        self._events: list[tuple[float, int, _Submit | _Done]] = []
        self._seq = itertools.count()
        self._dispatched: dict[str, core.Dispatch] = {}
        self._ends: dict[str, float] = {}  # task id → when the batch running it ends (while it runs)
        self._graphs: dict[tuple[str, tuple[tuple[str, Scalar], ...]], RequestGraph] = {}

    def _start_workers(self, arrivals: list[Arrival]) -> None:
        """Every worker's host-memory pool holds the models of the workflows it may serve, as after
        the workers' start-up prefetch; their devices hold nothing."""
        models: set[str] = set()
        for name in {a.workflow for a in arrivals}:
            example = next(a for a in arrivals if a.workflow == name)
            graph = self.scheduler.as_placed(name, self._graph(example))
            models |= {node.model for node in graph.nodes.values()}
        for worker in self.workers.values():
            worker.host_models |= models
            self.scheduler.add_worker(worker.worker_id, host="h0", loaded=worker.cache.resident())

    # ---- the model of a worker ----

    def _footprint(self, model: str) -> tuple[int, int]:
        """(weights, workspace) bytes on the device, as the emulated backend counts them."""
        try:
            profile = self.profiles.get(profile_name(model))
        except KeyError:
            return UNKNOWN_MODEL_BYTES, 0
        return profile.memory_bytes, profile.workspace_bytes()

    def _load_s(self, worker: _SimWorker, model: str) -> float:
        """Make `model` resident; the seconds that takes (0 when it already is)."""
        if model in worker.cache:
            worker.cache.touch(model)
            return 0.0
        for victim in worker.cache.plan_load(model, *self._footprint(model)):
            worker.cache.evict(victim)
        worker.cache.admit(model, *self._footprint(model))
        worker.loads += 1
        seconds = self.truth.load_s(model)
        if model not in worker.host_models:
            worker.host_models.add(model)
            with contextlib.suppress(KeyError):
                seconds += self.profiles.get(profile_name(model)).disk_to_host_s
        return seconds

    def _inputs_made_at(self, dispatch: core.Dispatch) -> float:
        """When the inputs the batch was sent before they existed will have been made."""
        made = 0.0
        for task in dispatch.tasks:
            for value in task.inputs.values():
                if isinstance(value, core.Pending):  # tensor id: request/node/output
                    made = max(made, self._ends.get(value.tensor_id.rsplit("/", 1)[0], 0.0))
        return made

    def _start(self, dispatch: core.Dispatch, now: float) -> None:
        worker = self.workers[dispatch.worker_id]
        start = max(now, self._inputs_made_at(dispatch))
        if not dispatch.side_lane:
            start = max(start, worker.free_at)
        load = self._load_s(worker, dispatch.model)
        execution = self.truth.exec_s(dispatch.tasks[0].node, len(dispatch.tasks))
        end = start + load + execution + self.overhead_s
        if not dispatch.side_lane:
            worker.free_at = end
        worker.busy_s += load + execution
        self.scheduler.set_loaded(worker.worker_id, worker.cache.resident())
        self._dispatched[dispatch.batch_id] = dispatch
        for task in dispatch.tasks:
            self._ends[task.task_id] = end
        self._push(end, _Done(dispatch.batch_id, execution, load))

    def _preload(self, preload: core.Preload, now: float) -> None:
        worker = self.workers[preload.worker_id]
        start = max(now, worker.free_at)
        load = self._load_s(worker, preload.model)
        worker.free_at = start + load
        worker.busy_s += load
        self.scheduler.set_loaded(worker.worker_id, worker.cache.resident())

    # ---- the event loop ----

    def _push(self, time_s: float, event: _Submit | _Done) -> None:
        heapq.heappush(self._events, (time_s, next(self._seq), event))

    def run(
        self,
        arrivals: list[Arrival],
        warmup: list[Arrival] | tuple[()] = (),
        alone: list[Arrival] | tuple[()] = (),
    ) -> SimulationResult:
        """Outcomes of `arrivals` (times from the start of the measurement), after `alone` (each
        request on the idle cluster, one after another, as a live bench measures standalone
        latencies) and then `warmup` have run to their end. Those requests get a long SLO: they
        are there to load models, not to be dropped before they have."""
        with _few_collections():
            return self._run(arrivals, warmup, alone)

    def _run(
        self, arrivals: list[Arrival], warmup: list[Arrival] | tuple[()], alone: list[Arrival] | tuple[()]
    ) -> SimulationResult:
        self._start_workers([*alone, *warmup, *arrivals])
        outcomes: dict[str, Outcome] = {}
        start = 0.0
        for index, arrival in enumerate(alone):
            self._push(start, _Submit(f"a{index}", replace(arrival, slo_s=WARMUP_SLO_S)))
            start = self._run_events(outcomes)
        for index, arrival in enumerate(warmup):
            self._push(start + arrival.time_s, _Submit(f"w{index}", replace(arrival, slo_s=WARMUP_SLO_S)))
        if warmup:
            start = self._run_events(outcomes) + WARMUP_GAP_S
        gpu_seconds, loads = self._gpu_seconds_and_loads()
        for index, arrival in enumerate(arrivals):
            self._push(start + arrival.time_s, _Submit(f"r{index}", arrival))
        end = self._run_events(outcomes)
        measured = {rid: o for rid, o in outcomes.items() if rid.startswith("r")}
        for outcome in measured.values():
            outcome.arrival -= start
        gpu_seconds_after, loads_after = self._gpu_seconds_and_loads()
        return SimulationResult(measured, gpu_seconds_after - gpu_seconds, loads_after - loads, end - start)

    def _run_events(self, outcomes: dict[str, Outcome]) -> float:
        """Process events until none is left; the time of the last one."""
        now = 0.0
        while self._events:
            now, _, event = heapq.heappop(self._events)
            events: list[core.Event] = []
            if isinstance(event, _Submit):
                outcomes[event.request_id] = self._admit(event.request_id, event.arrival, now)
            else:
                dispatch = self._dispatched.pop(event.batch_id)
                for task in dispatch.tasks:
                    self._ends.pop(task.task_id, None)
                outputs = {
                    t.task_id: {o: core.Tensor(f"{t.task_id}/{o}", 0, "h0") for o in t.node.outputs}
                    for t in dispatch.tasks
                }
                events += self.scheduler.complete(
                    event.batch_id, outputs, now, event.execution_s, event.loading_s
                )
            decisions = self.scheduler.schedule(now)
            events += decisions.events
            for dispatch in decisions.dispatches:
                self._start(dispatch, now)
            for preload in decisions.preloads:
                self._preload(preload, now)
            self._record(events, outcomes, now)
        return now

    def _gpu_seconds_and_loads(self) -> tuple[float, int]:
        return sum(w.busy_s for w in self.workers.values()), sum(w.loads for w in self.workers.values())

    def _graph(self, arrival: Arrival) -> RequestGraph:
        """The request's graph. Requests with the same inputs share one: the scheduler reads a
        graph and never changes it (what a request has done is kept apart)."""
        key = (arrival.workflow, tuple(sorted(arrival.inputs.items())))
        graph = self._graphs.get(key)
        if graph is None:
            spec = self.workflows[arrival.workflow]
            graph = self._graphs[key] = instantiate(spec, resolve_inputs(spec, arrival.inputs))
        return graph

    def _admit(self, request_id: str, arrival: Arrival, now: float) -> Outcome:
        graph = self._graph(arrival)
        admission = self.scheduler.admit(request_id, arrival.workflow, graph, now, arrival.slo_s)
        slo = admission.deadline - now if math.isfinite(admission.deadline) else math.inf
        outcome = Outcome(arrival.workflow, now, slo)
        if not admission.accepted:
            outcome.failure = "rejected"
        return outcome

    def _record(self, events: list[core.Event], outcomes: dict[str, Outcome], now: float) -> None:
        for event in events:
            outcome = outcomes[event.request_id]
            if isinstance(event, core.RequestDone):
                outcome.latency_s = now - outcome.arrival
                self.scheduler.release(event.request_id)
            elif isinstance(event, core.RequestFailed):
                outcome.failure = event.code
                self.scheduler.release(event.request_id)


@contextlib.contextmanager
def _few_collections() -> Iterator[None]:
    """The cyclic garbage collector seldom runs meanwhile. A simulation's state only grows (each
    request's outcome and progress), so the collector's passes find next to nothing, and at the
    default threshold they took about a tenth of a 256-GPU run."""
    threshold = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)


def standalone_latencies(
    workflows: dict[str, compiler_pb2.WorkflowSpec],
    inputs: dict[str, dict[str, Scalar]],
    profiles: ProfileSet,
    overhead_s: float = 0.0,
) -> dict[str, float]:
    """Each workflow's latency alone on one idle, warm device (the SLO's base)."""
    costs = CostModel(profiles, overhead_s=overhead_s)
    return {
        name: costs.standalone_s(instantiate(spec, resolve_inputs(spec, inputs[name])))
        for name, spec in workflows.items()
    }


def offered_gpu_seconds(arrivals: list[Arrival], standalone: dict[str, float]) -> float:
    return sum(standalone[a.workflow] for a in arrivals)
