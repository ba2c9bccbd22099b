"""tiny-* presets: deterministic from a seed, even when several workers of a process build at once."""

from concurrent.futures import ThreadPoolExecutor

import torch
from lego_worker.presets import build_tiny_sd15, build_tiny_tokenizer


def _state(seed: int) -> dict[str, torch.Tensor]:
    parts = build_tiny_sd15(seed)
    return {
        f"{name}.{key}": value
        for name in ("text_encoder", "unet", "vae")
        for key, value in getattr(parts, name).state_dict().items()
    }


def test_same_seed_same_weights_even_when_built_concurrently() -> None:
    with ThreadPoolExecutor(4) as pool:
        states = list(pool.map(_state, [0, 0, 0, 0]))
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[k], states[0][k]) for k in state)


def test_different_seed_different_weights_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = _state(0), _state(1)
    assert torch.rand(1) == expected_next  # building a preset does not consume the caller's RNG
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_is_local_and_character_level() -> None:
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer("a cat").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 2 + 4  # "a", "c", "a", "t</w>"
    assert tokenizer.model_max_length == 77
