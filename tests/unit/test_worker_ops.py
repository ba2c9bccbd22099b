"""Operator implementations against diffusers' own calls; batches equal their items run alone."""

import numpy as np
import pytest
import torch
from lego_worker.executor import Executor
from lego_worker.torch_backend import TorchBackend


@pytest.fixture(scope="module")
def executor() -> Executor:
    return Executor(TorchBackend(), memory_budget_bytes=10**10)


def test_text_encoder_batch_equals_single_calls(executor: Executor) -> None:
    texts = [{"text": "a red circle"}, {"text": ""}, {"text": "blue"}]
    batched = executor.run("text_encoder", "tiny-sd15:text_encoder", "encode", texts)
    for item, out in zip(texts, batched, strict=True):
        alone = executor.run("text_encoder", "tiny-sd15:text_encoder", "encode", [item])[0]
        assert np.array_equal(out["embeddings"], alone["embeddings"])
        assert out["embeddings"].shape == (1, 77, 32)


def test_unet_batch_matches_single_calls_within_float_tolerance(executor: Executor) -> None:
    rng = np.random.default_rng(0)
    items = [
        {
            "sample": rng.standard_normal((1, 4, 16, 16), dtype=np.float32),
            "timestep": np.array(t, dtype=np.int64),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32),
        }
        for t in (901, 901, 501)  # mixed timesteps in one batch
    ]
    batched = executor.run("unet", "tiny-sd15:unet", "denoise", items)
    for item, out in zip(items, batched, strict=True):
        alone = executor.run("unet", "tiny-sd15:unet", "denoise", [item])[0]["noise_pred"]
        np.testing.assert_allclose(out["noise_pred"], alone, rtol=0, atol=1e-5)


def test_scheduler_refuses_a_loop_length_that_does_not_match_its_timesteps(executor: Executor) -> None:
    item = {
        "seed": 1,
        "height": 64,
        "width": 64,
        "steps": 4,
        "iterations": 4,
        "latent_channels": 4,
        "vae_scale_factor": 8,
        "state_key": "r/loop",
    }
    with pytest.raises(ValueError, match="PNDMScheduler makes 5 timesteps for 4 steps"):
        executor.run("noise_scheduler", "tiny-sd15:scheduler", "init", [item])


def test_scheduler_state_is_per_request_and_released(executor: Executor) -> None:
    base = {
        "height": 64,
        "width": 64,
        "steps": 2,
        "iterations": 3,
        "latent_channels": 4,
        "vae_scale_factor": 8,
    }
    first = executor.run(
        "noise_scheduler", "tiny-sd15:scheduler", "init", [{**base, "seed": 1, "state_key": "a/l"}]
    )
    second = executor.run(
        "noise_scheduler", "tiny-sd15:scheduler", "init", [{**base, "seed": 2, "state_key": "b/l"}]
    )
    assert first[0]["latents"].shape == (1, 4, 8, 8)
    assert not np.array_equal(first[0]["latents"], second[0]["latents"])
    executor.release("a")
    with pytest.raises(LookupError, match="a/l"):
        executor.backend.states.get("a/l")  # type: ignore[attr-defined]
    executor.backend.states.get("b/l")  # type: ignore[attr-defined]


def test_vae_decode_gives_uint8_pixels(executor: Executor) -> None:
    latents = torch.zeros(1, 4, 8, 8).numpy()
    image = executor.run("vae", "tiny-sd15:vae", "decode", [{"latents": latents}])[0]["image"]
    assert image.dtype == np.uint8 and image.shape == (1, 64, 64, 3)


def test_unknown_preset_and_bad_model_id_are_named(executor: Executor) -> None:
    with pytest.raises(ValueError, match="unknown preset 'tiny-nothing'"):
        executor.run("vae", "tiny-nothing:vae", "decode", [{}])
    with pytest.raises(ValueError, match="'<source>:<component>'"):
        executor.run("vae", "no-component", "decode", [{}])


def test_a_resumed_pndm_loop_warms_up_again_on_the_rest_of_the_exact_schedule() -> None:
    """PNDM (SD 1.5) spends its first timestep twice; resumed after K iterations from the latent
    the exact run had there, it does so again: the exact schedule from index K, the timestep after
    K repeated."""
    from lego_worker.ops import SchedulerStates, scheduler_init_from_latents
    from lego_worker.presets import build_sd15_scheduler

    template, states = build_sd15_scheduler(), SchedulerStates()
    exact = template.__class__.from_config(template.config)
    exact.set_timesteps(10)
    latent = np.zeros((1, 4, 8, 8), dtype=np.float32)
    item = {
        "state_key": "r/loop",
        "steps": 10,
        "iterations": 11 - 5 + 1,
        "first_index": 5,
        "cached_latents": latent,
    }
    outputs = scheduler_init_from_latents(template, item, states)
    resumed = states.get("r/loop").timesteps
    expected = [*exact.timesteps[5:7].tolist(), *exact.timesteps[6:].tolist()]
    assert resumed[5:].tolist() == expected and int(outputs["timestep"]) == int(exact.timesteps[5])
    with pytest.raises(ValueError, match="resumed at index 5 makes 7 timesteps, but the resumed loop has 6"):
        scheduler_init_from_latents(template, {**item, "iterations": 6, "state_key": "r2/loop"}, states)
