"""The few workers worth pricing for a batch, so placement does not price every worker.

A batch's cost on a worker (Scheduler._cost) is the work queued there, plus its model's load where
it is not resident, plus moving its inputs to that worker's host, plus its execution. For a batch
without LoRA patches the last two are the same for every worker of one host, so among the workers
of a host the cheapest (ties to the lowest index, as a full scan breaks them) is one of four:

- the first idle worker holding the model (nothing queued, no load),
- the first idle worker (nothing queued),
- the holder with the least work queued,
- the worker with the least work queued,

and, for a batch that must wait until its inputs are made elsewhere, the holder and the worker
whose queues end last before that (they wait least idle) and first after it.

`WorkerPools` files the workers that can take a batch by host, and by host and resident model:
idle ones by index, the others by when their queued work ends. Finding the four is then a look at
the head of four lists per host. On 256 simulated GPUs, pricing every free worker for every batch
was most of the simulator's time. Pure: time is an argument.
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, cast


class PooledWorker(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def host(self) -> str: ...
    @property
    def busy_until(self) -> float: ...
    @property
    def loaded(self) -> set[str]: ...


W = TypeVar("W", bound=PooledWorker)
Pool = tuple[str, str]  # (host, model), or (host, "") for every worker of the host
ALL = ""
Key = tuple[float, int]  # (when its queued work ends, or -inf while idle; index)


@dataclass
class _Filed:  # not Generic[W]: compiled with mypyc (lego.native), a generic dataclass fails to load
    worker: PooledWorker  # a W: `WorkerPools` casts it back
    key: Key
    pools: list[Pool]


def _pools_of(worker: PooledWorker) -> list[Pool]:
    return [(worker.host, ALL), *((worker.host, model) for model in worker.loaded)]


class WorkerPools(Generic[W]):
    """The workers that can take a batch, filed at the time of the last `advance`. The scheduler
    calls `update` whenever a worker's queue, resident models, membership or draining changes."""

    def __init__(self) -> None:
        self.now = -math.inf
        # host → model (or ALL) → its workers' keys, sorted: the idle ones first (key -inf), by index
        self._lists: dict[str, dict[str, list[Key]]] = {}
        self._filed: dict[int, _Filed] = {}  # by worker index
        self._wakes: list[tuple[float, int]] = []  # heap: when a queued worker turns idle

    def __len__(self) -> int:
        return len(self._filed)

    def advance(self, now: float) -> None:
        """Workers whose queued work has ended by `now` are idle from now on."""
        if now < self.now:  # time went back (a test's clock): file everyone anew
            workers = [cast(W, filed.worker) for filed in self._filed.values()]
            self.now = now
            for worker in workers:
                self.update(worker, True)
            return
        self.now = now
        while self._wakes and self._wakes[0][0] <= now:
            busy_until, index = heapq.heappop(self._wakes)
            filed = self._filed.get(index)
            if filed is not None and filed.key == (busy_until, index):  # not refiled since
                self.update(cast(W, filed.worker), True)

    def update(self, worker: W, free: bool) -> None:
        """File the worker anew, or not at all while it cannot take a batch (`free` false)."""
        filed = self._filed.get(worker.index)
        if free and filed is not None and filed.key == self._key(worker) and filed.pools == _pools_of(worker):
            return  # filed where it belongs already
        self._filed.pop(worker.index, None)
        if filed is not None:
            for host, model in filed.pools:
                keys = self._lists[host][model]
                del keys[bisect.bisect_left(keys, filed.key)]
        if not free:
            return
        key = self._key(worker)
        pools = _pools_of(worker)
        for host, model in pools:
            bisect.insort(self._lists.setdefault(host, {}).setdefault(model, []), key)
        self._filed[worker.index] = _Filed(worker, key, pools)
        if key[0] != -math.inf:
            heapq.heappush(self._wakes, key)

    def _key(self, worker: W) -> Key:
        return (-math.inf if worker.busy_until <= self.now else worker.busy_until, worker.index)

    def holds(self, model: str) -> bool:
        """Whether any worker filed here holds `model`."""
        return any(pools.get(model) for pools in self._lists.values())

    def finalists(
        self, model: str, hosts: set[str] | frozenset[str] = frozenset(), made_at: float = -math.inf
    ) -> list[W]:
        """The workers (of `hosts`, or of every host) among which the cheapest for a batch of
        `model` without LoRA patches is found. A batch that cannot start before `made_at` (its
        inputs are made whole elsewhere) costs the same on every worker whose queue ends by then,
        where the one whose queue ends last waits least idle: that one is a finalist too."""
        chosen: dict[int, W] = {}
        for host, pools in self._lists.items():
            if hosts and host not in hosts:
                continue
            for keys in (pools.get(ALL), pools.get(model)):
                if not keys:
                    continue
                picks = [0]  # the first idle worker, else the one whose work ends first
                if keys[0][0] == -math.inf:  # and the first with work queued
                    picks.append(bisect.bisect_left(keys, (-math.inf, math.inf)))
                if made_at > self.now:
                    after = bisect.bisect_right(keys, (made_at, math.inf))
                    picks.append(after)  # the first whose work ends after `made_at`
                    if after > 0 and keys[after - 1][0] != -math.inf:  # the last to end by then
                        picks.append(bisect.bisect_left(keys, (keys[after - 1][0], -1)))
                for pick in picks:
                    if pick < len(keys):
                        index = keys[pick][1]
                        chosen[index] = cast(W, self._filed[index].worker)
        return list(chosen.values())
