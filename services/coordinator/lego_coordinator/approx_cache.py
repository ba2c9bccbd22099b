"""Approximate caching (after NIRVANA, NSDI'24): an index of finished requests' intermediate latents,
keyed by their prompt's signature (pure: no I/O, no clock).

A request whose signature is close enough to a cached one (cosine similarity ≥ a row of
SKIP_BY_SIMILARITY) starts its denoise loop from that request's latent after K iterations and runs
only the rest: the more similar, the larger K, at most half the steps. Each finished request that
missed leaves its latents after K iterations for every K a later request could skip, one item
each. The latents stay in the data engines (the coordinator sees their handles); when the items'
bytes pass the capacity, the item worth least is evicted (LCBFU, "least computationally beneficial
and frequently used": its hits times the iterations it saves). Items in use by a request are pinned.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# (minimum cosine similarity, share of the steps skipped), most similar first: NIRVANA's K ∈ {5, 10,
# 15, 20, 25} of 50 steps, by similarity band
SKIP_BY_SIMILARITY = ((0.95, 0.5), (0.90, 0.4), (0.85, 0.3), (0.80, 0.2), (0.75, 0.1))
DEFAULT_CAPACITY_BYTES = 256 * 2**20


def candidate_skips(steps: int, iterations: int, repeats: int = 0) -> list[int]:
    """The iteration counts K after which a request of `steps` steps leaves a latent others could
    resume from. `repeats`: iterations the scheduler spends twice on one timestep at its start
    (PNDM's warm-up: 1); its latent after them is not a finished step, and a resumed loop repeats
    one again, so K must leave more than that to run."""
    skips = {round(share * steps) for _, share in SKIP_BY_SIMILARITY}
    return sorted(k for k in skips if repeats < k < iterations - repeats)


def allowed_skip(similarity: float, steps: int) -> int:
    """The most iterations a request may skip from a latent whose prompt is this similar (0: none)."""
    for minimum, share in SKIP_BY_SIMILARITY:
        if similarity >= minimum:
            return round(share * steps)
    return 0


def unit(signature: Sequence[float]) -> np.ndarray:
    """The signature scaled to length 1 (zeros stay zeros: similar to nothing)."""
    vector = np.asarray(signature, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


@dataclass
class ApproxStats:
    lookups: int = 0
    hits: int = 0
    iterations_reused: int = 0  # of the donors' loops, by the hits (their latents after K)
    inserted: int = 0  # items
    evicted: int = 0


# The shell's handle of a tensor on a data engine, opaque to the core. A named alias, not `object`
# in the fields: compiled with mypyc (lego.native), a dataclass field annotated `object` fails to load.
Handle = object


@dataclass
class _Item:
    key: int
    donor: str  # the request whose latent it is (its Free must spare it)
    skip: int
    handle: Handle
    nbytes: int
    host: str
    hits: int = 0
    pins: int = 0


@dataclass(eq=False)  # entries are told apart by identity
class _Entry:
    context: str
    signature: np.ndarray  # unit length
    items: dict[int, _Item] = field(default_factory=dict)  # skip → item


@dataclass(frozen=True)
class Hit:
    item: int  # pinned: `unpin` it when the request no longer needs it
    skip: int
    similarity: float
    handle: Handle
    nbytes: int
    host: str


class ApproxCache:
    def __init__(self, capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"approximate cache capacity must be positive, got {capacity_bytes} bytes")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.stats = ApproxStats()
        self._entries: list[_Entry] = []
        self._items: dict[int, tuple[_Entry, _Item]] = {}
        self._keys = itertools.count()
        self._dead: list[object] = []

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, context: str, signature: Sequence[float], steps: int) -> Hit | None:
        """The entry of the same context that saves the most (the largest skip its similarity
        allows and it holds; the more similar among equals); the item is pinned."""
        self.stats.lookups += 1
        query = unit(signature)
        best: tuple[int, float, _Item] | None = None
        for entry in self._entries:
            if entry.context != context or entry.signature.shape != query.shape:
                continue
            similarity = float(query @ entry.signature)
            usable = [skip for skip in entry.items if skip <= allowed_skip(similarity, steps)]
            if usable and (best is None or (max(usable), similarity) > best[:2]):
                best = (max(usable), similarity, entry.items[max(usable)])
        if best is None:
            return None
        _, similarity, item = best
        item.hits += 1
        item.pins += 1
        self.stats.hits += 1
        self.stats.iterations_reused += item.skip
        return Hit(item.key, item.skip, similarity, item.handle, item.nbytes, item.host)

    def unpin(self, key: int) -> None:
        if key in self._items:
            self._items[key][1].pins -= 1

    def insert(
        self,
        context: str,
        signature: Sequence[float],
        donor: str,
        latents: dict[int, tuple[object, int, str]],  # skip → (handle, bytes, host)
    ) -> None:
        """Keep a finished request's latents (those that fit once items worth less are evicted)."""
        entry = _Entry(context, unit(signature))
        for skip, (handle, nbytes, host) in sorted(latents.items()):
            if not self._make_room(nbytes, entry):
                continue  # not kept: the donor's Free frees it
            item = _Item(next(self._keys), donor, skip, handle, nbytes, host)
            entry.items[skip] = item
            self._items[item.key] = (entry, item)
            self.used_bytes += nbytes
            self.stats.inserted += 1
        if entry.items:
            self._entries.append(entry)

    def _make_room(self, nbytes: int, building: _Entry) -> bool:
        """Evict until `nbytes` fit, never an item of the entry being built nor a pinned one."""
        while self.used_bytes + nbytes > self.capacity_bytes:
            unpinned = [
                item for entry, item in self._items.values() if item.pins == 0 and entry is not building
            ]
            if not unpinned:
                return False
            # LCBFU: the fewest iterations saved over its lifetime, the oldest among equals
            evicted = min(unpinned, key=lambda item: ((item.hits + 1) * item.skip, item.key))
            self._remove(evicted)
            self.stats.evicted += 1
            self._dead.append(evicted.handle)
        return True

    def _remove(self, item: _Item) -> None:
        entry, _ = self._items.pop(item.key)
        del entry.items[item.skip]
        if not entry.items:
            self._entries.remove(entry)
        self.used_bytes -= item.nbytes

    def drop_host(self, host: str) -> None:
        """Forget the latents a host holds: its last worker left, and its data engine may have gone
        with it (or stayed: the handles are freed all the same, which costs nothing where it went)."""
        for _, item in list(self._items.values()):
            if item.host == host and item.pins == 0:  # a pinned one goes once its reader is done
                self._remove(item)
                self._dead.append(item.handle)

    def retained(self, donor: str) -> list[object]:
        """The handles of `donor`'s tensors the cache keeps: its request's Free must spare them."""
        return [item.handle for _, item in self._items.values() if item.donor == donor]

    def take_dead(self) -> list[object]:
        """Handles of evicted latents: the shell frees them on the data engines."""
        dead, self._dead = self._dead, []
        return dead
