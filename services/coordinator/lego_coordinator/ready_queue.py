"""The ready queue: a set of (request, node) entries, also listed in priority order per group.

A scheduling round walks the ready entries in priority order, a batch at a time, and a batch takes
entries of one group (one batch key). Sorting and grouping the whole set at every round (Python
calls per entry) was most of the simulator's time on big clusters, where hundreds of entries wait;
here each entry's priority and group are computed once, when it becomes ready, and each group's
order is kept in a list that is re-sorted only when entries were added since (timsort on a nearly
sorted list) and swept of removed entries as it is read.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

Entry = tuple[str, str]  # (request id, node id)
COMPACT_AT = 64  # stale items an order may hold before sweeping them is worth its pass
Item = tuple[tuple[Any, ...], int, Entry]  # (priority, token, entry)


class _Order:
    """Items kept sorted lazily; items of removed entries swept on reading."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.stale = 0  # items whose entry was removed since the last sweep
        self.sorted = True

    def append(self, item: Item) -> None:
        self.items.append(item)
        self.sorted = False

    def live(self, members: dict[Entry, int]) -> list[Item]:
        """The items of entries still queued, in order (the list itself: not to be changed)."""
        if not self.sorted:
            self.items.sort()  # (priority, token) is unique: entries themselves are never compared
            self.sorted = True
        if self.stale:
            self.items = [item for item in self.items if members.get(item[2]) == item[1]]
            self.stale = 0
        return self.items


class ReadyQueue:
    """`group` names each entry's group (entries that may share a batch); `lane` marks the entries
    also listed apart (the side lane's: a round with no room for anything else looks at those alone).
    Both, like the priority, must not change while the entry is queued."""

    def __init__(
        self,
        priority: Callable[[Entry], tuple[Any, ...]],
        group: Callable[[Entry], Hashable] = lambda _: None,
        lane: Callable[[Entry], bool] = lambda _: False,
    ) -> None:
        self._priority = priority
        self._group = group
        self._lane = lane
        self._members: dict[Entry, int] = {}  # entry → the token of its items
        self._group_of: dict[Entry, Hashable] = {}
        self._groups: dict[Hashable, _Order] = {}
        self._in_lane: set[Entry] = set()
        self._lane_order = _Order()
        self._tokens = itertools.count()

    def add(self, entry: Entry) -> None:
        if entry not in self._members:
            token = next(self._tokens)
            self._members[entry] = token
            item = (self._priority(entry), token, entry)
            group = self._group_of[entry] = self._group(entry)
            order = self._groups.get(group)
            if order is None:
                order = self._groups[group] = _Order()
            order.append(item)
            if self._lane(entry):
                self._in_lane.add(entry)
                self._lane_order.append(item)

    def update(self, entries: Iterable[Entry]) -> None:
        for entry in entries:
            self.add(entry)

    def discard(self, entry: Entry) -> None:
        if self._members.pop(entry, None) is not None:
            self._forget(self._groups[self._group_of.pop(entry)])
            if entry in self._in_lane:
                self._in_lane.discard(entry)
                self._forget(self._lane_order)

    def _forget(self, order: _Order) -> None:
        """One of the order's items is stale now; swept here once most are, so that an order nobody
        reads (the monolithic baselines read none) stays as small as its live entries."""
        order.stale += 1
        if order.stale > COMPACT_AT and 2 * order.stale > len(order.items):
            order.live(self._members)

    def difference_update(self, entries: Iterable[Entry]) -> None:
        for entry in entries:
            self.discard(entry)

    def groups(self) -> list[list[Item]]:
        """Each non-empty group's items, highest priority (lowest key) first; copies, which stay as
        they are while the queue changes."""
        listed = []
        for group, order in list(self._groups.items()):
            items = order.live(self._members)
            if items:
                listed.append(items[:])
            else:
                del self._groups[group]
        return listed

    def lane_items(self) -> list[Item]:
        """The lane's items, highest priority first (a copy)."""
        return self._lane_order.live(self._members)[:]

    def ordered(self, lane_only: bool = False) -> list[Entry]:
        """The entries (or only the lane's), highest priority first."""
        items: Iterator[Item] | list[Item] = self.lane_items() if lane_only else heapq.merge(*self.groups())
        return [entry for _, _, entry in items]

    def __contains__(self, entry: object) -> bool:
        return entry in self._members

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __bool__(self) -> bool:
        return bool(self._members)
