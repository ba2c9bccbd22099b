"""Runs batches on one device: makes the model resident first (LRU eviction under the memory
budget), pins it while it runs, and keeps the worker's metrics and model events. With an embedding
cache, text-encoder items it holds are answered from it and only the rest run. A batch's LoRAs are
fetched on a side thread (lego_worker.lora_loads): a batch that may run without them does so while
they load; any other waits for them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from lego.device_cache import DeviceCache

from lego_worker.backend import Backend, Item, Outputs, PartSink, PatchSet
from lego_worker.embedding_cache import EmbeddingCache, Key
from lego_worker.emulated_backend import EmulatedBackend
from lego_worker.lora_loads import DEFAULT_CAPACITY, LoRALoads


@dataclass(frozen=True)
class ModelEvent:
    model: str  # a model id; a LoRA source for "lora_fetch"; sources joined by "+" for "lora_wait"
    # "prefetch", "load", "evict"; "lora_fetch" (a LoRA fetched), "lora_wait" (a batch waited for one)
    kind: str
    seconds: float


@dataclass
class WorkerMetrics:
    batches: int = 0
    busy_s: float = 0.0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    loads: int = 0
    evictions: int = 0
    load_s: float = 0.0
    peak_memory_bytes: int = 0


@dataclass
class _Lookup:
    """A batch's items split by the embedding cache: hits answered, misses still to run."""

    found: list[Outputs | None]
    keys: list[Key | None]

    @property
    def misses(self) -> list[int]:
        return [index for index, outputs in enumerate(self.found) if outputs is None]


class Executor:
    def __init__(
        self,
        backend: Backend,
        memory_budget_bytes: int,
        embeddings: EmbeddingCache | None = None,
        lora_capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        self.backend = backend
        self.cache = DeviceCache(memory_budget_bytes)
        self.embeddings = embeddings
        self.loras = LoRALoads(backend.fetch_lora, backend.drop_lora, lora_capacity, self._fetched)
        self.last_unpatched = False  # the last batch ran without some of its patches
        self.metrics = WorkerMetrics()
        self._events: list[ModelEvent] = []
        self._lock = threading.Lock()  # one device: one batch or model move at a time
        self.last_execution_s = 0.0  # the last batch's forward pass, without any model load

    def drain_events(self) -> list[ModelEvent]:
        events, self._events = self._events, []
        return events

    def _ensure_loaded(self, model_id: str) -> None:
        if model_id in self.cache:
            self.cache.touch(model_id)
            return
        fetched = self.backend.prefetch(model_id)
        if fetched:
            self._events.append(ModelEvent(model_id, "prefetch", fetched))
        size, workspace = self.backend.footprint(model_id), self.backend.workspace(model_id)
        for victim in self.cache.plan_load(model_id, size, workspace):
            self.backend.unload(victim)
            self.cache.evict(victim)
            self.metrics.evictions += 1
            self._events.append(ModelEvent(victim, "evict", 0.0))
        seconds = self.backend.load(model_id)
        self.cache.admit(model_id, size, workspace)
        self.metrics.peak_memory_bytes = max(self.metrics.peak_memory_bytes, self.cache.used_bytes)
        self.metrics.loads += 1
        self.metrics.load_s += seconds
        self._events.append(ModelEvent(model_id, "load", seconds))

    def prefetch(self, model_id: str) -> float:
        with self._lock:
            seconds = self.backend.prefetch(model_id)
            if seconds:
                self._events.append(ModelEvent(model_id, "prefetch", seconds))
            return seconds

    def load(self, model_id: str) -> float:
        started = time.perf_counter()
        with self._lock:
            self._ensure_loaded(model_id)
        return time.perf_counter() - started

    def unload(self, model_id: str) -> bool:
        with self._lock:
            if model_id not in self.cache:
                return False
            self.backend.unload(model_id)
            self.cache.evict(model_id)
            self.metrics.evictions += 1
            self._events.append(ModelEvent(model_id, "evict", 0.0))
            return True

    def _lookup(self, op: str, model_id: str, mode: str, items: list[Item], patches: PatchSet) -> _Lookup:
        if self.embeddings is None:
            return _Lookup([None] * len(items), [None] * len(items))
        keys = [EmbeddingCache.key(op, model_id, mode, patches, item) for item in items]
        return _Lookup([None if k is None else self.embeddings.get(k) for k in keys], keys)

    def _answer(self, lookup: _Lookup, computed: list[Outputs]) -> list[Outputs]:
        """The batch's outputs in item order; what was computed is kept for later hits."""
        misses = lookup.misses
        found = list(lookup.found)
        for index, outputs in zip(misses, computed, strict=True):
            found[index] = outputs
            key = lookup.keys[index]
            if self.embeddings is not None and key is not None:
                self.embeddings.put(key, outputs, self.last_execution_s / len(misses))
        return [outputs for outputs in found if outputs is not None]

    def _patches_now(
        self, patches: PatchSet, optional: bool
    ) -> tuple[PatchSet, list[concurrent.futures.Future[float]]]:
        """The patches a batch runs with, and the LoRA fetches it must wait for first: with
        `optional`, only the patches already fetched and nothing to wait for."""
        self.last_unpatched = False
        missing = self.loras.request(patches) if patches else []
        if not missing:
            return patches, []
        if not optional:
            self.loras.stats.waits += 1
            return patches, [future for _, future in missing]
        absent = {source for source, _ in missing}
        self.last_unpatched = True
        self.loras.stats.unpatched += 1
        return tuple(patch for patch in patches if patch[0] not in absent), []

    def _fetched(self, source: str, seconds: float) -> None:  # the fetch thread: list.append is atomic
        self._events.append(ModelEvent(source, "lora_fetch", seconds))

    def _waited(self, patches: PatchSet, seconds: float) -> None:
        """One event per wait (the coordinator adds up waits): its LoRAs' sources joined by '+'."""
        self._events.append(ModelEvent("+".join(source for source, _ in patches), "lora_wait", seconds))

    def _count(self, items: int, seconds: float) -> None:
        self.metrics.busy_s += seconds
        self.metrics.batches += 1
        self.metrics.batch_sizes[items] += 1

    def run(
        self,
        op: str,
        model_id: str,
        mode: str,
        items: list[Item],
        patches: PatchSet = (),
        parts: PartSink | None = None,
        patches_optional: bool = False,
    ) -> list[Outputs]:
        """One batch; a backend that streams hands the parts of streamed outputs to `parts`. With
        `patches_optional` it runs at once without the patches still loading (`last_unpatched`)."""
        with self._lock:
            lookup = self._lookup(op, model_id, mode, items, patches)
            misses = [items[index] for index in lookup.misses]
            self.last_execution_s = 0.0
            if not misses:  # every item was a hit: the model is not even needed
                return self._answer(lookup, [])
            patches, fetches = self._patches_now(patches, patches_optional)
            if fetches:  # synchronous loading: the device waits, as it would loading them itself
                started = time.perf_counter()
                for fetch in fetches:
                    fetch.result()
                self._waited(patches, time.perf_counter() - started)
            self._ensure_loaded(model_id)
            self.cache.pin(model_id)
            started = time.perf_counter()
            try:
                outputs = self.backend.run(op, model_id, mode, misses, patches, parts)
            finally:
                self.cache.unpin(model_id)
            self.last_execution_s = time.perf_counter() - started
            self._count(len(misses), self.last_execution_s)
            return self._answer(lookup, outputs)

    async def run_async(
        self,
        op: str,
        model_id: str,
        mode: str,
        items: list[Item],
        patches: PatchSet = (),
        parts: PartSink | None = None,
        patches_optional: bool = False,
    ) -> list[Outputs]:
        """`run` from an event loop: real backends compute on a thread; the emulated one waits on
        the loop itself (a thread hop per batch would cost more than many emulated calls take)."""
        if not isinstance(self.backend, EmulatedBackend):
            return await asyncio.to_thread(
                self.run, op, model_id, mode, items, patches, parts, patches_optional
            )
        lookup = self._lookup(op, model_id, mode, items, patches)
        misses = [items[index] for index in lookup.misses]
        self.last_execution_s = 0.0
        if not misses:
            return self._answer(lookup, [])
        patches, fetches = self._patches_now(patches, patches_optional)
        if fetches:  # the worker runs one batch at a time: its queue waits too, as it would loading
            started = time.perf_counter()
            await asyncio.gather(*(asyncio.shield(asyncio.wrap_future(fetch)) for fetch in fetches))
            self._waited(patches, time.perf_counter() - started)
        if model_id not in self.cache:
            await asyncio.to_thread(self.load, model_id)
        async with self._device():
            self.cache.touch(model_id)
            self.cache.pin(model_id)
        try:
            seconds, outputs = self.backend.plan(op, model_id, mode, misses)
            started = time.perf_counter()
            await asyncio.sleep(seconds)
            self.last_execution_s = time.perf_counter() - started
        finally:
            async with self._device():
                self.cache.unpin(model_id)
        self._count(len(misses), self.last_execution_s)
        return self._answer(lookup, outputs)

    async def run_beside(
        self, op: str, model_id: str, mode: str, items: list[Item]
    ) -> tuple[list[Outputs], float]:
        """A side-lane batch (a request's noise-scheduler call: a fraction of a millisecond on small
        tensors, its state the request's own) runs at once, without the device lock that a batch of
        the queue holds for its whole forward pass, so it never waits behind one. Its outputs and
        execution seconds (the last-batch fields are the queue's; its seconds count as busy ones,
        as the simulator counts them, though they overlap the queue's)."""
        if model_id not in self.cache:  # its first call here: a load (no device memory), under the lock
            await asyncio.to_thread(self.load, model_id)
        with contextlib.suppress(KeyError):  # recently used: the last model an eviction picks
            self.cache.touch(model_id)
        started = time.perf_counter()
        if isinstance(self.backend, EmulatedBackend):
            seconds, outputs = self.backend.plan(op, model_id, mode, items)
            await asyncio.sleep(seconds)
        else:
            outputs = await asyncio.to_thread(self.backend.run, op, model_id, mode, items, (), None)
        seconds = time.perf_counter() - started
        self._count(len(items), seconds)
        return outputs, seconds

    @contextlib.asynccontextmanager
    async def _device(self) -> AsyncIterator[None]:
        """The device lock, from the event loop: taken at once when free, else awaited on a thread.
        A model move holds it for seconds, and blocking the loop meanwhile stalls everything on
        it (the embedded cluster's every service), so emulated batches overran their profiles."""
        if not self._lock.acquire(blocking=False):
            acquiring = asyncio.ensure_future(asyncio.to_thread(self._lock.acquire))
            try:
                await asyncio.shield(acquiring)
            except asyncio.CancelledError:
                acquiring.add_done_callback(lambda _: self._lock.release())
                raise
        try:
            yield
        finally:
            self._lock.release()

    def release(self, request_id: str) -> None:
        self.backend.release(request_id)
