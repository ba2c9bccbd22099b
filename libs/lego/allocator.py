"""An arena allocator: carves one fixed range into aligned blocks. Pure: offsets only, no memory.

The data engine carves its shared-memory arena with it; the NVSHMEM transport its symmetric heap."""

from __future__ import annotations

import bisect

ALIGNMENT = 64


class ArenaFull(MemoryError):
    """No free block is large enough; maps to RESOURCE_EXHAUSTED."""

    def __init__(self, requested: int, free_bytes: int, largest_free: int) -> None:
        super().__init__(
            f"arena full: {requested} bytes requested, {free_bytes} bytes free "
            f"(largest free block {largest_free} bytes)"
        )
        self.requested = requested
        self.free_bytes = free_bytes
        self.largest_free = largest_free


def aligned(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """`nbytes` rounded up to the alignment; at least one alignment unit, so every block has an offset."""
    return max(alignment, -(-nbytes // alignment) * alignment)


class ArenaAllocator:
    """First-fit over a free list sorted by offset; freeing coalesces with both neighbours."""

    def __init__(self, capacity: int, alignment: int = ALIGNMENT) -> None:
        if capacity <= 0 or capacity % alignment:
            raise ValueError(f"capacity must be a positive multiple of {alignment}, got {capacity}")
        self.capacity = capacity
        self.alignment = alignment
        self._free_offsets: list[int] = [0]  # sorted; parallel to _free_sizes
        self._free_sizes: list[int] = [capacity]
        self._used: dict[int, int] = {}  # offset -> block size

    @property
    def used_bytes(self) -> int:
        return self.capacity - self.free_bytes

    @property
    def free_bytes(self) -> int:
        return sum(self._free_sizes)

    @property
    def largest_free(self) -> int:
        return max(self._free_sizes, default=0)

    def __len__(self) -> int:
        return len(self._used)

    def allocate(self, nbytes: int) -> int:
        if nbytes < 0:
            raise ValueError(f"nbytes must be ≥ 0, got {nbytes}")
        size = aligned(nbytes, self.alignment)
        for index, block in enumerate(self._free_sizes):
            if block >= size:
                offset = self._free_offsets[index]
                if block == size:
                    del self._free_offsets[index], self._free_sizes[index]
                else:
                    self._free_offsets[index] += size
                    self._free_sizes[index] -= size
                self._used[offset] = size
                return offset
        raise ArenaFull(nbytes, self.free_bytes, self.largest_free)

    def free(self, offset: int) -> None:
        size = self._used.pop(offset, None)
        if size is None:
            raise KeyError(f"offset {offset} is not an allocated block")
        index = bisect.bisect_left(self._free_offsets, offset)
        following = index < len(self._free_offsets) and self._free_offsets[index] == offset + size
        preceding = index > 0 and self._free_offsets[index - 1] + self._free_sizes[index - 1] == offset
        if preceding and following:
            self._free_sizes[index - 1] += size + self._free_sizes[index]
            del self._free_offsets[index], self._free_sizes[index]
        elif preceding:
            self._free_sizes[index - 1] += size
        elif following:
            self._free_offsets[index] = offset
            self._free_sizes[index] += size
        else:
            self._free_offsets.insert(index, offset)
            self._free_sizes.insert(index, size)
