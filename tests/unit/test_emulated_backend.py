"""The emulated backend: profiled time (scaled), profiled memory, correctly shaped placeholders."""

import asyncio
import threading
import time

import numpy as np
import pytest
from lego.device_cache import CacheFull
from lego.profiles import ProfileSet, default_profile_dir
from lego_worker.emulated_backend import EmulatedBackend
from lego_worker.executor import Executor

PROFILES = ProfileSet(default_profile_dir())


class FakeClock:
    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def unet_items(batch: int) -> list[dict]:
    return [
        {
            "sample": np.zeros((1, 4, 64, 64), np.float32),
            "timestep": np.array(1),
            "encoder_hidden_states": None,
        }
    ] * batch


def test_execution_sleeps_the_profiled_time_divided_by_the_time_scale() -> None:
    clock = FakeClock()
    backend = EmulatedBackend(PROFILES, time_scale=10, sleep=clock.sleep)
    outputs = backend.run("unet", "tiny-sd15:unet", "denoise", unet_items(3), ())
    expected = PROFILES.get("StableDiffusion15").execution_s("default", 4, 512 * 512) / 10
    assert clock.slept == [pytest.approx(expected)]
    assert [o["noise_pred"].shape for o in outputs] == [(1, 4, 64, 64)] * 3


def test_placeholders_have_the_shapes_consumers_expect() -> None:
    backend = EmulatedBackend(PROFILES, sleep=lambda s: None)
    init = backend.run(
        "noise_scheduler",
        "tiny-sd15:scheduler",
        "init",
        [
            {
                "seed": 1,
                "height": 512,
                "width": 768,
                "steps": 4,
                "iterations": 5,
                "latent_channels": 4,
                "vae_scale_factor": 8,
            }
        ],
        (),
    )[0]
    assert init["latents"].shape == (1, 4, 64, 96)
    image = backend.run("vae", "tiny-sd15:vae", "decode", [{"latents": init["latents"]}], ())[0]["image"]
    assert image.shape == (1, 512, 768, 3) and image.dtype == np.uint8
    text = backend.run("text_encoder", "tiny-sd15:text_encoder", "encode", [{"text": "x"}] * 2, ())
    assert [t["embeddings"].shape for t in text] == [(1, 77, 768)] * 2


def test_loading_costs_disk_then_host_to_device_time_and_profiled_memory() -> None:
    clock = FakeClock()
    executor = Executor(EmulatedBackend(PROFILES, sleep=clock.sleep), memory_budget_bytes=80 * 10**9)
    executor.load("tiny-sd15:unet")
    unet = PROFILES.get("StableDiffusion15")
    assert clock.slept == [pytest.approx(unet.disk_to_host_s), pytest.approx(unet.host_to_device_s)]
    assert executor.cache.used_bytes == unet.peak_bytes()
    assert [e.kind for e in executor.drain_events()] == ["prefetch", "load"]


def test_emulated_memory_budget_evicts_lru_and_refuses_what_cannot_fit() -> None:
    budget = (
        PROFILES.get("StableDiffusion15").peak_bytes() + PROFILES.get("StableDiffusion15VAE").peak_bytes()
    )
    executor = Executor(EmulatedBackend(PROFILES, sleep=lambda s: None), memory_budget_bytes=budget)
    executor.load("tiny-sd15:unet")
    executor.load("tiny-sd15:vae")
    executor.load("tiny-sd15#copy:unet")  # a second UNet does not fit beside both: the LRU one goes
    assert executor.cache.resident() == ["tiny-sd15:vae", "tiny-sd15#copy:unet"]
    assert executor.metrics.evictions == 1
    with pytest.raises(CacheFull):
        executor.load("profile:Flux1Schnell")


def test_real_time_execution_is_within_ten_percent_of_the_profile() -> None:
    """A bounded timing check of the real sleep path at time-scale 1 (VAE decode ≈ 0.1 s)."""
    executor = Executor(EmulatedBackend(PROFILES), memory_budget_bytes=80 * 10**9)
    executor.load("tiny-sd15:vae")
    items = [{"latents": np.zeros((1, 4, 64, 64), np.float32)}]
    expected = PROFILES.get("StableDiffusion15VAE").execution_s("decode_latents", 1, 512 * 512)
    measured = []
    for _ in range(3):
        started = time.perf_counter()
        executor.run("vae", "tiny-sd15:vae", "decode", items)
        measured.append(time.perf_counter() - started)
    assert abs(min(measured) - expected) <= 0.1 * expected


def test_time_scale_must_be_positive() -> None:
    with pytest.raises(ValueError, match="time_scale must be > 0, got 0"):
        EmulatedBackend(PROFILES, time_scale=0)


async def test_on_the_event_loop_execution_also_takes_the_profiled_time() -> None:
    executor = Executor(EmulatedBackend(PROFILES), memory_budget_bytes=80 * 10**9)
    items = [{"latents": np.zeros((1, 4, 64, 64), np.float32)}]
    expected = PROFILES.get("StableDiffusion15VAE").execution_s("decode_latents", 1, 512 * 512)
    await executor.run_async("vae", "tiny-sd15:vae", "decode", items)  # loads first (disk, host → device)
    measured = []
    for _ in range(3):
        started = time.perf_counter()
        outputs = await executor.run_async("vae", "tiny-sd15:vae", "decode", items)
        measured.append(time.perf_counter() - started)
    assert abs(min(measured) - expected) <= 0.1 * expected
    assert outputs[0]["image"].shape == (1, 512, 512, 3)
    assert executor.metrics.batches == 4 and executor.metrics.loads == 1


async def test_a_batch_waiting_for_a_model_move_does_not_block_the_event_loop() -> None:
    moving = threading.Event()
    done_moving = threading.Event()

    def move(seconds: float) -> None:  # a model move that lasts until the test ends it (or 5 s)
        if moving.is_set():
            done_moving.wait(5)

    executor = Executor(EmulatedBackend(PROFILES, sleep=move), memory_budget_bytes=80 * 10**9)
    executor.load("tiny-sd15:vae")
    moving.set()
    loading = asyncio.ensure_future(asyncio.to_thread(executor.load, "tiny-sd15:unet"))
    await asyncio.sleep(0.05)  # the move now holds the device
    items = [{"latents": np.zeros((1, 4, 8, 8), np.float32)}]
    batch = asyncio.ensure_future(executor.run_async("vae", "tiny-sd15:vae", "decode", items))
    started = time.perf_counter()
    await asyncio.sleep(0.05)  # the loop still runs: the batch waits for the device off the loop
    assert time.perf_counter() - started < 1.0 and not batch.done()
    done_moving.set()
    await asyncio.gather(loading, batch)
    assert batch.result()[0]["image"].shape[0] == 1
