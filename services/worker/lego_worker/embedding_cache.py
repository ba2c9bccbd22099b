"""An exact cache of text embeddings, shared by every workflow whose requests reach this worker.

Text encoders are deterministic: the same (model, mode, LoRA patches, prompt) gives the same
embeddings, so a hit returns the stored arrays and the encoder does not run. Entries are evicted
least recently used first once their bytes would pass the capacity. Each entry remembers what its
computation cost, so the cache can say how much device time its hits saved.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from lego_worker.backend import Item, Outputs, PatchSet

CACHED_OP = "text_encoder"

Key = tuple[str, str, PatchSet, str]


@dataclass
class EmbeddingCacheStats:
    hits: int = 0
    misses: int = 0
    saved_s: float = 0.0  # device seconds the hits did not spend
    evictions: int = 0


@dataclass(frozen=True)
class _Entry:
    outputs: Outputs
    nbytes: int
    cost_s: float


def _nbytes(outputs: Outputs) -> int:
    return sum(np.asarray(array).nbytes for array in outputs.values())


class EmbeddingCache:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"embedding cache capacity must be positive, got {capacity_bytes} bytes")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.stats = EmbeddingCacheStats()
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # used from the event loop and from backend threads

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(op: str, model_id: str, mode: str, patches: PatchSet, item: Item) -> Key | None:
        """The entry an item would use, or None when its op is not a text encoder."""
        text = item.get("text")
        if op != CACHED_OP or not isinstance(text, str):
            return None
        return (model_id, mode, patches, text)

    def get(self, key: Key) -> Outputs | None:
        with self._lock:
            return self._get(key)

    def _get(self, key: Key) -> Outputs | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        self.stats.saved_s += entry.cost_s
        return entry.outputs

    def put(self, key: Key, outputs: Outputs, cost_s: float) -> None:
        """Keep a computed item's outputs (read-only copies: callers may not change a hit's arrays)."""
        stored = {name: np.array(array, copy=True) for name, array in outputs.items()}
        for array in stored.values():
            array.flags.writeable = False
        nbytes = _nbytes(stored)
        with self._lock:
            self._put(key, stored, nbytes, cost_s)

    def _put(self, key: Key, stored: Outputs, nbytes: int, cost_s: float) -> None:
        if nbytes > self.capacity_bytes or key in self._entries:
            return
        while self.used_bytes + nbytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.used_bytes -= evicted.nbytes
            self.stats.evictions += 1
        self._entries[key] = _Entry(stored, nbytes, cost_s)
        self.used_bytes += nbytes
