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
    assert optimisations_of("embed-cache") == ("embed-cache",)
    with pytest.raises(argparse.ArgumentTypeError, match="async-lora is not implemented yet"):
        optimisations_of("embed-cache,async-lora")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown optimisation 'fast'"):
        optimisations_of("fast")
