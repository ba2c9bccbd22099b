"""The LoRAs a worker holds, fetched on a side thread (bounded asynchronous LoRA loading, after Katz).

Fetching a LoRA (from its store into host memory) takes seconds and needs no device, so it runs
off the device thread: a batch whose tasks may run without their patches (lego.graph
`patches_optional`, a loop's first `lora_async_steps` steps) starts at once without the missing
ones while they load; any other batch waits for them, which is synchronous loading. At most
`capacity` LoRAs are kept; the least recently used goes first, never one the current batch uses.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from lego_worker.backend import PatchSet

DEFAULT_CAPACITY = 16


@dataclass
class LoRAStats:
    fetches: int = 0  # fetches started
    fetch_s: float = 0.0  # seconds those that finished took
    waits: int = 0  # batches that waited for a fetch (synchronous loading)
    unpatched: int = 0  # batches that ran without some of their patches


class LoRALoads:
    def __init__(
        self,
        fetch: Callable[[str], float],
        drop: Callable[[str], None],
        capacity: int = DEFAULT_CAPACITY,
        on_fetched: Callable[[str, float], None] = lambda source, seconds: None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"LoRA capacity must be ≥ 1, got {capacity}")
        self._fetch = fetch
        self._drop = drop
        self._on_fetched = on_fetched
        self.capacity = capacity
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-fetch")
        self._held: OrderedDict[str, concurrent.futures.Future[float]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = LoRAStats()

    def held(self) -> list[str]:
        """Sources fetched or being fetched, least recently used first."""
        with self._lock:
            return list(self._held)

    def _timed_fetch(self, source: str) -> float:
        seconds = self._fetch(source)
        self.stats.fetch_s += seconds
        self._on_fetched(source, seconds)
        return seconds

    def request(self, patches: PatchSet) -> list[tuple[str, concurrent.futures.Future[float]]]:
        """Start fetching every patch not held (a failed fetch is retried); the ones not ready yet,
        with their fetches. Called from the device thread: evicting drops adapters from models."""
        missing = []
        evicted = []
        with self._lock:
            for source, _ in patches:
                future = self._held.get(source)
                if future is None or _failed(future):
                    future = self._pool.submit(self._timed_fetch, source)
                    self._held[source] = future
                    self.stats.fetches += 1
                self._held.move_to_end(source)
                if not _ready(future):
                    missing.append((source, future))
            using = {source for source, _ in patches}
            for source in list(self._held):
                if len(self._held) <= self.capacity:
                    break
                if source not in using and self._held[source].done():
                    del self._held[source]
                    evicted.append(source)
        for source in evicted:
            self._drop(source)
        return missing

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _failed(future: concurrent.futures.Future[float]) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


def _ready(future: concurrent.futures.Future[float]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
