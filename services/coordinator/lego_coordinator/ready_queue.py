"""The ready queue: a set of (request, node) entries that also lists them in priority order.

A scheduling round walks the ready entries in priority order. Sorting the whole set at every round
(a Python key call per entry) was a large share of the simulator's time on big clusters, where
hundreds of entries wait; here each entry's priority is computed once, when it becomes ready, and
the order is kept in a list that is re-sorted only when entries were added since (timsort on a
nearly sorted list) and swept of removed entries as it is read.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Entry = tuple[str, str]  # (request id, node id)


class ReadyQueue:
    def __init__(self, priority: Callable[[Entry], tuple[Any, ...]]) -> None:
        self._priority = priority  # must not change while the entry is queued
        self._members: dict[Entry, int] = {}  # entry → the token of its item in _order
        self._order: list[tuple[tuple[Any, ...], int, Entry]] = []  # may hold items of removed entries
        self._stale = 0  # items in _order whose entry was removed since
        self._tokens = itertools.count()
        self._sorted = True

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
        if self._members.pop(entry, None) is not None:
            self._stale += 1

    def difference_update(self, entries: Iterable[Entry]) -> None:
        for entry in entries:
            self.discard(entry)

    def ordered(self) -> list[Entry]:
        """The entries, highest priority (lowest key) first."""
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
