"""The synthetic prompt set of the caching benchmarks: seeded, Zipf-repeating, validated."""

from __future__ import annotations

import argparse

import pytest
from lego_cli.bench_slo import optimisations_of
from lego_cli.prompts import MAX_DISTINCT, draw_prompts, prompt, repeat_share


def test_prompts_are_fixed_texts_drawn_the_same_way_every_run() -> None:
    drawn = draw_prompts("zipf:distinct=20,s=1.1,seed=3", 200)
    assert drawn == draw_prompts("zipf:distinct=20,s=1.1,seed=3", 200)
    assert set(drawn) <= {prompt(i) for i in range(20)} and len(set(drawn)) > 5
    assert (
        prompt(0) == "photograph of a red fox at dawn"
        and len({prompt(i) for i in range(MAX_DISTINCT)}) == MAX_DISTINCT
    )


def test_a_steeper_law_or_fewer_prompts_repeats_more() -> None:
    flat = repeat_share(draw_prompts("zipf:distinct=200,s=0", 300))
    steep = repeat_share(draw_prompts("zipf:distinct=200,s=1.5", 300))
    few = repeat_share(draw_prompts("zipf:distinct=5,s=0", 300))
    assert flat < steep < few
    assert repeat_share(["a", "b", "a", "a"]) == 0.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("uniform:distinct=3", "expected zipf:"),
        ("zipf:distinct=3", "s is required"),
        ("zipf:distinct=0,s=1", f"distinct must be in \\[1, {MAX_DISTINCT}\\], got 0"),
        ("zipf:distinct=3,s=-1", "s must be >= 0, got -1.0"),
        ("zipf:distinct=3,s=1,k=2", "unknown field 'k'"),
        ("zipf:distinct=x,s=1", "distinct and seed are integers"),
    ],
)
def test_a_bad_prompt_set_names_the_field(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        draw_prompts(spec, 1)


def test_only_built_optimisations_are_accepted() -> None:
    assert optimisations_of("embed-cache,approx-cache,async-lora") == (
        "embed-cache",
        "approx-cache",
        "async-lora",
    )
    with pytest.raises(argparse.ArgumentTypeError, match="unknown optimisation 'fast'"):
        optimisations_of("fast")


def test_a_lora_mix_names_its_own_limits_and_draws_the_same_variants_each_time() -> None:
    from lego_cli.loras import MAX_LORAS, assign_loras, parse_lora_mix

    assert parse_lora_mix("zipf:distinct=200,s=0.8") == 200
    with pytest.raises(ValueError, match=f"LoRA mix .*distinct must be in \\[1, {MAX_LORAS}\\], got 5000"):
        parse_lora_mix("zipf:distinct=5000,s=1")
    tenants = ["A", "B", "C"] * 20
    drawn = assign_loras("zipf:distinct=5,s=1,seed=3", tenants)
    assert drawn == assign_loras("zipf:distinct=5,s=1,seed=3", tenants)
    assert all(variant.startswith(f"{tenant}+lora") for variant, tenant in zip(drawn, tenants, strict=True))
    assert {variant.split("+")[1] for variant in drawn} <= {f"lora{rank}" for rank in range(5)}
