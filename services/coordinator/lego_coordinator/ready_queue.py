"""The ready queue: a set of (request, node) entries that also lists them in priority order.

A scheduling round walks the ready entries in priority order. Sorting the whole set at every round
(a Python key call per entry) was a large share of the simulator's time on big clusters, where
hundreds of entries wait; here each entry's priority is computed once, when it becomes ready, and
the order is kept in a list that is re-sorted only when entries were added since (timsort on a
nearly sorted list) and swept of removed entries as it is read.

An entry can be parked on a worker: it stays ready (counted, contained) but is left out of the
order until that worker is unparked. The scheduler parks the noise-scheduler nodes that must run
on a worker with no room, which under load are most of the queue, and unparks them when it frees.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Entry = tuple[str, str]  # (request id, node id)
PARKED = -1  # the token of a parked entry: none of the order's items is its own


class ReadyQueue:
    def __init__(self, priority: Callable[[Entry], tuple[Any, ...]]) -> None:
        self._priority = priority  # must not change while the entry is queued
        self._members: dict[Entry, int] = {}  # entry → the token of its item in _order
        self._order: list[tuple[tuple[Any, ...], int, Entry]] = []  # may hold items of removed entries
        self._stale = 0  # items in _order whose entry was removed or parked since
        self._tokens = itertools.count()
        self._sorted = True
        self._parked: dict[str, set[Entry]] = {}  # worker → entries parked on it
        self._parked_count = 0

    def add(self, entry: Entry) -> None:
        if entry not in self._members:
            self._enqueue(entry)

    def _enqueue(self, entry: Entry) -> None:
        token = next(self._tokens)
        self._members[entry] = token
        self._order.append((self._priority(entry), token, entry))
        self._sorted = False

    def update(self, entries: Iterable[Entry]) -> None:
        for entry in entries:
            self.add(entry)

    def discard(self, entry: Entry) -> None:
        token = self._members.pop(entry, None)
        if token == PARKED:
            self._parked_count -= 1
            for entries in self._parked.values():
                entries.discard(entry)
        elif token is not None:
            self._stale += 1

    def difference_update(self, entries: Iterable[Entry]) -> None:
        for entry in entries:
            self.discard(entry)

    def park(self, entry: Entry, worker: str) -> None:
        """Leave a queued entry out of the order until `unpark(worker)`."""
        if self._members.get(entry, PARKED) != PARKED:
            self._members[entry] = PARKED
            self._stale += 1
            self._parked.setdefault(worker, set()).add(entry)
            self._parked_count += 1

    def unpark(self, worker: str) -> None:
        entries = self._parked.pop(worker, set())
        self._parked_count -= len(entries)
        for entry in entries:
            self._enqueue(entry)

    def parked(self) -> int:
        return self._parked_count

    def ordered(self) -> list[Entry]:
        """The entries not parked, highest priority (lowest key) first."""
        if not self._sorted:
            self._order.sort()  # (priority, token) is unique: entries themselves are never compared
            self._sorted = True
        if self._stale:
            members = self._members
            self._order = [item for item in self._order if members.get(item[2]) == item[1]]
            self._stale = 0
        return [entry for _, _, entry in self._order]

    def __contains__(self, entry: object) -> bool:
        return entry in self._members

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __bool__(self) -> bool:
        return bool(self._members)
