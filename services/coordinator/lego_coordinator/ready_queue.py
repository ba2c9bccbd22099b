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


class _Order:
    """Items (priority, token, entry) kept sorted lazily; items of removed entries swept on reading."""

    def __init__(self) -> None:
        self.items: list[tuple[tuple[Any, ...], int, Entry]] = []
        self.stale = 0  # items whose entry was removed since the last sweep
        self.sorted = True

    def append(self, item: tuple[tuple[Any, ...], int, Entry]) -> None:
        self.items.append(item)
        self.sorted = False

    def entries(self, members: dict[Entry, int]) -> list[Entry]:
        if not self.sorted:
            self.items.sort()  # (priority, token) is unique: entries themselves are never compared
            self.sorted = True
        if self.stale:
            self.items = [item for item in self.items if members.get(item[2]) == item[1]]
            self.stale = 0
        return [entry for _, _, entry in self.items]


class ReadyQueue:
    """`lane` marks the entries also listed apart (the side lane's: a round with no room for
    anything else looks at those alone)."""

    def __init__(
        self, priority: Callable[[Entry], tuple[Any, ...]], lane: Callable[[Entry], bool] = lambda _: False
    ) -> None:
        self._priority = priority  # must not change while the entry is queued
        self._lane = lane
        self._members: dict[Entry, int] = {}  # entry → the token of its items
        self._all = _Order()
        self._in_lane: set[Entry] = set()
        self._lane_order = _Order()
        self._tokens = itertools.count()

    def add(self, entry: Entry) -> None:
        if entry not in self._members:
            token = next(self._tokens)
            self._members[entry] = token
            item = (self._priority(entry), token, entry)
            self._all.append(item)
            if self._lane(entry):
                self._in_lane.add(entry)
                self._lane_order.append(item)

    def update(self, entries: Iterable[Entry]) -> None:
        for entry in entries:
            self.add(entry)

    def discard(self, entry: Entry) -> None:
        if self._members.pop(entry, None) is not None:
            self._all.stale += 1
            if entry in self._in_lane:
                self._in_lane.discard(entry)
                self._lane_order.stale += 1

    def difference_update(self, entries: Iterable[Entry]) -> None:
        for entry in entries:
            self.discard(entry)

    def ordered(self, lane_only: bool = False) -> list[Entry]:
        """The entries (or only the lane's), highest priority (lowest key) first."""
        return (self._lane_order if lane_only else self._all).entries(self._members)

    def __contains__(self, entry: object) -> bool:
        return entry in self._members

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __bool__(self) -> bool:
        return bool(self._members)
