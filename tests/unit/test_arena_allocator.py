import random

import pytest
from lego.allocator import ArenaAllocator, ArenaFull, aligned


def test_blocks_are_aligned_disjoint_and_first_fit() -> None:
    allocator = ArenaAllocator(1024)
    first, second = allocator.allocate(10), allocator.allocate(100)
    assert (first, second) == (0, 64)  # 10 -> 64 bytes, 100 -> 128 bytes
    assert allocator.used_bytes == 192
    allocator.free(first)
    assert allocator.allocate(64) == 0  # the first hole that fits
    assert allocator.allocate(0) == 192  # an empty tensor still gets its own offset


def test_freeing_coalesces_with_both_neighbours() -> None:
    allocator = ArenaAllocator(64 * 4)
    blocks = [allocator.allocate(64) for _ in range(4)]
    with pytest.raises(ArenaFull):
        allocator.allocate(1)
    allocator.free(blocks[0])
    allocator.free(blocks[2])
    assert allocator.largest_free == 64
    allocator.free(blocks[1])  # joins the holes on both sides
    assert allocator.largest_free == 192
    assert allocator.allocate(192) == 0


def test_arena_full_names_the_request_and_the_free_bytes() -> None:
    allocator = ArenaAllocator(256)
    allocator.allocate(64)
    with pytest.raises(ArenaFull, match="1000 bytes requested, 192 bytes free"):
        allocator.allocate(1000)
    assert allocator.used_bytes == 64  # a refused request changes nothing


def test_bad_frees_and_capacities_are_refused() -> None:
    allocator = ArenaAllocator(256)
    with pytest.raises(KeyError):
        allocator.free(64)
    with pytest.raises(ValueError, match="multiple of 64"):
        ArenaAllocator(100)
    assert aligned(65) == 128


def test_random_churn_never_overlaps_and_returns_to_empty() -> None:
    rng = random.Random(7)
    allocator = ArenaAllocator(64 * 1024)
    live: dict[int, int] = {}
    for _ in range(5000):
        if live and (rng.random() < 0.5 or len(live) > 200):
            offset = rng.choice(list(live))
            allocator.free(offset)
            del live[offset]
            continue
        size = rng.randrange(0, 2000)
        try:
            offset = allocator.allocate(size)
        except ArenaFull:
            continue
        end = offset + aligned(size)
        assert end <= allocator.capacity and offset % 64 == 0
        assert all(end <= o or o + aligned(s) <= offset for o, s in live.items())
        live[offset] = size
    for offset in live:
        allocator.free(offset)
    assert allocator.free_bytes == allocator.capacity and allocator.largest_free == allocator.capacity
