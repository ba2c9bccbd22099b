"""The exact text-embedding cache: hits equal the computation, only misses run, LRU by bytes."""

from __future__ import annotations

import numpy as np
import pytest
from lego.profiles import ProfileSet, default_profile_dir
from lego_worker.embedding_cache import EmbeddingCache
from lego_worker.emulated_backend import EmulatedBackend
from lego_worker.executor import Executor
from lego_worker.torch_backend import TorchBackend

ENCODER = "tiny-sd15:text_encoder"


def test_a_hit_returns_exactly_what_the_encoder_computes_and_skips_it() -> None:
    plain = Executor(TorchBackend(), memory_budget_bytes=10**10)
    cached = Executor(TorchBackend(), memory_budget_bytes=10**10, embeddings=EmbeddingCache(2**24))
    [expected] = plain.run("text_encoder", ENCODER, "encode", [{"text": "a red circle"}])
    [first] = cached.run("text_encoder", ENCODER, "encode", [{"text": "a red circle"}])
    [again] = cached.run("text_encoder", ENCODER, "encode", [{"text": "a red circle"}])
    assert np.array_equal(first["embeddings"], expected["embeddings"])
    assert np.array_equal(again["embeddings"], expected["embeddings"])
    assert cached.metrics.batches == 1 and cached.last_execution_s == 0.0  # the hit ran nothing
    stats = cached.embeddings.stats if cached.embeddings else None
    assert stats is not None and (stats.hits, stats.misses) == (1, 1) and stats.saved_s > 0
    assert not again["embeddings"].flags.writeable  # a hit's arrays cannot be changed by a caller


def test_a_batch_runs_only_its_misses_and_keeps_item_order() -> None:
    cached = Executor(TorchBackend(), memory_budget_bytes=10**10, embeddings=EmbeddingCache(2**24))
    cached.run("text_encoder", ENCODER, "encode", [{"text": "blue"}])
    texts = [{"text": "red"}, {"text": "blue"}, {"text": ""}]
    outputs = cached.run("text_encoder", ENCODER, "encode", texts)
    assert cached.metrics.batch_sizes[2] == 1  # "red" and "" ran together, "blue" was a hit
    for item, output in zip(texts, outputs, strict=True):
        [alone] = Executor(TorchBackend(), 10**10).run("text_encoder", ENCODER, "encode", [item])
        assert np.array_equal(output["embeddings"], alone["embeddings"])


def test_entries_are_keyed_by_model_mode_patches_and_text() -> None:
    cache = EmbeddingCache(2**20)
    item = {"text": "a cat", "state_key": "r1/te"}
    key = EmbeddingCache.key("text_encoder", ENCODER, "encode", (), item)
    assert key == EmbeddingCache.key(
        "text_encoder", ENCODER, "encode", (), {"text": "a cat", "state_key": "r2/te"}
    )
    assert key != EmbeddingCache.key("text_encoder", ENCODER, "encode", (("lora.safetensors", 1.0),), item)
    assert key != EmbeddingCache.key("text_encoder", "tiny-sdxl:text_encoder", "encode", (), item)
    assert EmbeddingCache.key("vae", "tiny-sd15:vae", "decode", (), item) is None
    assert key is not None and cache.get(key) is None and cache.stats.misses == 1


def test_least_recently_used_entries_leave_once_the_bytes_are_full() -> None:
    entry = {"embeddings": np.zeros(256, np.float32)}  # 1 KiB
    cache = EmbeddingCache(3 * 1024)
    keys = [("m", "encode", (), text) for text in "abcd"]
    for key in keys[:3]:
        cache.put(key, entry, 0.1)
    assert cache.get(keys[0]) is not None  # "a" is now the most recently used
    cache.put(keys[3], entry, 0.1)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None
    assert (len(cache), cache.used_bytes, cache.stats.evictions) == (3, 3 * 1024, 1)
    cache.put(("m", "encode", (), "huge"), {"embeddings": np.zeros(4096, np.float32)}, 0.1)
    assert len(cache) == 3  # larger than the whole cache: not kept, nothing evicted for it


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity must be positive, got -1 bytes"):
        EmbeddingCache(-1)


async def test_an_emulated_hit_takes_no_device_time_and_saves_the_profiled_time() -> None:
    backend = EmulatedBackend(ProfileSet(default_profile_dir()), time_scale=10)
    executor = Executor(backend, 80 * 10**9, embeddings=EmbeddingCache(2**24))
    await executor.run_async("text_encoder", ENCODER, "encode", [{"text": "x"}])  # loads, then runs
    miss_s = executor.last_execution_s
    await executor.run_async("text_encoder", ENCODER, "encode", [{"text": "x"}])
    assert miss_s > 0 and executor.last_execution_s == 0.0 and executor.metrics.batches == 1
    assert executor.embeddings is not None and executor.embeddings.stats.saved_s == pytest.approx(miss_s)
