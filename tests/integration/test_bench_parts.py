"""`lego bench worker`'s partial-outputs figures: the three ways of running a ControlNet step, each
measured, giving the same noise prediction bit for bit (timings are the bench's, not checked here)."""

from __future__ import annotations

from lego_cli.bench_parts import MODES, partial_outputs


def test_the_partial_outputs_bench_measures_three_ways_to_one_identical_result() -> None:
    figures = partial_outputs(repeats=1)
    assert figures["identical_outputs"] is True
    assert all(figures[f"{mode}_s"] > 0 for mode in MODES)
    ratio = figures["beside_whole_s"] / figures["beside_streamed_s"]
    assert abs(figures["streamed_vs_whole_speedup"] - ratio) < 0.01
