"""The cost model the scheduler places and admits by (pure: no I/O, no clock).

Execution time per (op, model, mode, batch size) starts from the measured GPU profiles and is then
learned from what the workers report (the median of the last few reports), so the estimates follow
the real cluster (tiny models on CPUs included) but not a stalled host: a moving average let a few
batches caught in a two-second stall multiply a model's estimate, and admission then refused every
request, so nothing ran that could have corrected it. Loads cost the profile's host → device time;
moving a tensor between hosts costs its size over a bandwidth; a LoRA the worker does not hold
costs the median of the last fetches workers reported.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lego.graph import Ref, RequestGraph, TaskNode
from lego.profiles import PROFILE_MODES, ProfileSet, profile_name

UNKNOWN_EXEC_S = 0.01  # a model call with no profile and no measurement yet
UNKNOWN_LOAD_S = 1.0
REMOTE_BYTES_PER_S = 1e9  # the data engines' measured loopback pull rate is above this
LEARNING_WINDOW = 9  # reports per execution estimate: up to four outliers among them move nothing
OVERHEAD_LEARNING_RATE = 0.3
DEFAULT_BATCH = (4, 8)
INITIAL_OVERHEAD_S = 0.002  # per batch: dispatch, input fetch, output publish, report
LORA_FETCH_S = 4.4  # a LoRA fetch before any is reported: a production trace's median (Katz)


def _pixels(node: TaskNode) -> int:
    height, width = node.inputs.get("height"), node.inputs.get("width")
    if isinstance(height, int) and isinstance(width, int):
        return height * width
    return 0


@dataclass
class CostModel:
    profiles: ProfileSet | None = None
    batch_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # profile name → sizes
    learned: dict[tuple[str, str, str, int], float] = field(default_factory=dict)
    overhead_s: float = INITIAL_OVERHEAD_S  # learned: a batch's turnaround minus its execution
    time_scale: float = 1.0  # emulated workers K times faster than the profiled GPUs: priors / K
    # The profiles never change: their answers are memoised (the simulator asks millions of times).
    _profiled: dict[tuple[str, str, str, int, int], float | None] = field(default_factory=dict, repr=False)
    _limits: dict[tuple[str, str, str], tuple[int, int]] = field(default_factory=dict, repr=False)
    _reports: dict[tuple[str, str, str, int], deque[float]] = field(default_factory=dict, repr=False)
    _lora_fetches: deque[float] = field(default_factory=lambda: deque(maxlen=LEARNING_WINDOW), repr=False)
    _loads: dict[str, float] = field(default_factory=dict, repr=False)

    def _profile_name(self, model: str) -> str | None:
        try:
            return profile_name(model)
        except KeyError:
            return None

    def exec_s(self, node: TaskNode, batch: int = 1) -> float:
        key = (node.op, node.model, node.mode, batch)
        if key in self.learned:
            return self.learned[key]
        profiled = self._profiled_s(node, batch)
        if profiled is not None:
            return profiled
        single = self.learned.get((node.op, node.model, node.mode, 1))
        return (single if single is not None else UNKNOWN_EXEC_S) * (1 + 0.1 * (batch - 1))

    def _profiled_s(self, node: TaskNode, batch: int) -> float | None:
        key = (node.op, node.model, node.mode, batch, _pixels(node))
        if key not in self._profiled:
            name = self._profile_name(node.model)
            mode = PROFILE_MODES.get((node.op, node.mode))
            seconds = None
            if self.profiles is not None and name is not None and mode is not None:
                with contextlib.suppress(KeyError):
                    seconds = self.profiles.get(name).execution_s(mode, batch, key[4]) / self.time_scale
            self._profiled[key] = seconds
        return self._profiled[key]

    def observe(self, node: TaskNode, batch: int, seconds: float) -> None:
        key = (node.op, node.model, node.mode, batch)
        reports = self._reports.setdefault(key, deque(maxlen=LEARNING_WINDOW))
        reports.append(seconds)
        self.learned[key] = statistics.median(reports)

    def observe_overhead(self, seconds: float) -> None:
        """A moving average, not a median: admission's backlog model assumes work spreads perfectly
        over the workers, and the average's slow fall from its initial value is slack it needs
        (with a median, a simulated burst admitted requests it then dropped). A stalled report
        decays within the next batches, which a request alone on the cluster always gets to run."""
        self.overhead_s += OVERHEAD_LEARNING_RATE * (max(0.0, seconds) - self.overhead_s)

    def observe_lora_fetch(self, seconds: float) -> None:
        self._lora_fetches.append(max(0.0, seconds))

    def lora_fetch_s(self) -> float:
        if self._lora_fetches:
            return statistics.median(self._lora_fetches)
        return LORA_FETCH_S / self.time_scale

    def load_s(self, model: str) -> float:
        if model not in self._loads:
            self._loads[model] = self._profiled_load_s(model)
        return self._loads[model]

    def _profiled_load_s(self, model: str) -> float:
        name = self._profile_name(model)
        if self.profiles is not None and name is not None:
            try:
                return self.profiles.get(name).host_to_device_s / self.time_scale
            except KeyError:
                pass
        return UNKNOWN_LOAD_S

    def batch_limits(self, node: TaskNode) -> tuple[int, int]:
        """(latency-mode, throughput-mode) batch size for this node: model_batch.json's for its
        model (a stack: the smallest of its members'), else read off the model's profile for the
        node's mode, else DEFAULT_BATCH (a model nothing is known of)."""
        key = (node.model, node.op, node.mode)
        if key not in self._limits:
            self._limits[key] = self._batch_limits(node)
        return self._limits[key]

    def _batch_limits(self, node: TaskNode) -> tuple[int, int]:
        name = self._profile_name(node.model) or ""
        if name in self.batch_sizes:
            return self.batch_sizes[name]
        parts = name.split("+")
        if len(parts) > 1 and all(part in self.batch_sizes for part in parts):
            limits = [self.batch_sizes[part] for part in parts]
            return min(lat for lat, _ in limits), min(thr for _, thr in limits)
        mode = PROFILE_MODES.get((node.op, node.mode))
        if self.profiles is not None and name and mode is not None:
            with contextlib.suppress(KeyError):
                return self.profiles.get(name).batch_limits(mode, _pixels(node))
        return DEFAULT_BATCH

    @staticmethod
    def transfer_s(nbytes: int, same_host: bool) -> float:
        return 0.0 if same_host else nbytes / REMOTE_BYTES_PER_S

    def standalone_s(self, graph: RequestGraph, with_overhead: bool = True) -> float:
        """The request alone on one idle device: ready nodes with the same batch key run as one
        batch (as a pipeline would batch its CFG branches), everything else one after another."""
        return self._alone_s(graph, self.exec_s, self.overhead_s if with_overhead else 0.0)

    def floor_s(self, graph: RequestGraph) -> float:
        """Its execution alone by the profiles (what was learned only where none is known): a floor
        no schedule beats. Not the learned times: measured on a busy machine they overrun, and a
        client's SLO above the true floor must not be refused as impossible."""

        def profiled(node: TaskNode, batch: int = 1) -> float:
            seconds = self._profiled_s(node, batch)
            return seconds if seconds is not None else self.exec_s(node, batch)

        return self._alone_s(graph, profiled, 0.0)

    def _alone_s(
        self, graph: RequestGraph, exec_s: Callable[[TaskNode, int], float], overhead_s: float
    ) -> float:
        remaining = {node_id: 0 for node_id in graph.nodes}
        for node in graph.nodes.values():
            remaining[node.id] = len({v.node for v in node.inputs.values() if isinstance(v, Ref)})
        successors: dict[str, list[str]] = {node_id: [] for node_id in graph.nodes}
        for node in graph.nodes.values():
            for producer in {v.node for v in node.inputs.values() if isinstance(v, Ref)}:
                successors[producer].append(node.id)
        ready = [n for n, count in remaining.items() if count == 0]
        total = 0.0
        while ready:
            first = graph.nodes[ready[0]]
            batch = [ready[0]] + [n for n in ready[1:] if _same_batch(graph.nodes[n], first)]
            total += exec_s(first, len(batch)) + overhead_s
            ready = [n for n in ready if n not in batch]
            for done in batch:
                for successor in successors[done]:
                    remaining[successor] -= 1
                    if remaining[successor] == 0:
                        ready.append(successor)
        return total

    def work_s(self, nodes: Iterable[TaskNode]) -> float:
        """Device-seconds of these nodes run one by one (an upper bound used for backlog)."""
        return sum(self.exec_s(node) + self.overhead_s for node in nodes)

    def pending_s(self, pending: PendingWork) -> float:
        """`work_s` of the nodes counted in `pending`, at the current estimates."""
        return sum(
            count * (self.exec_s(pending.examples[kind]) + self.overhead_s)
            for kind, count in pending.counts.items()
            if count
        )


class PendingWork:
    """Nodes not done yet, counted by what prices them: admission sums the backlog of every request
    in flight at each arrival, and a few kinds per request (FLUX.1-dev: 6 kinds, 110 nodes) keep that
    cheap on large clusters."""

    def __init__(self, nodes: Iterable[TaskNode] = ()) -> None:
        self.counts: Counter[tuple[str, str, str, int]] = Counter()
        self.examples: dict[tuple[str, str, str, int], TaskNode] = {}
        for node in nodes:
            self.add(node)

    def add(self, node: TaskNode, count: int = 1) -> None:
        kind = (node.op, node.model, node.mode, _pixels(node))
        self.examples.setdefault(kind, node)
        self.counts[kind] += count

    def subtract(self, other: PendingWork) -> None:
        self.counts.subtract(other.counts)


def _same_batch(a: TaskNode, b: TaskNode) -> bool:
    return (a.op, a.model, a.mode, a.patches) == (b.op, b.model, b.mode, b.patches) and not a.state_key
