"""`lego bench slo`: a trace replayed open loop on a live emulated cluster, with the simulator's keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lego_cli.cluster import ProcessCluster
from lego_cli.main import main

from tests.conftest import EtcdProcess

# two at once, then one every 4 s of emulated time (twice the workflows' standalone latency):
# a light load, met whatever the machine's speed, since the SLOs are measured on it
LIGHT_TRACE = "A 0.0\nB 0.0\nA 4.0\nC 4.0\nA 4.0\nB 4.0\n"


def light_bench(tmp_path: Path) -> tuple[list[str], Path]:
    """`lego bench slo` on LIGHT_TRACE with the sd15 family on 2 workers, and its JSON's path."""
    trace = tmp_path / "trace.txt"
    trace.write_text(LIGHT_TRACE)
    argv = ["bench", "slo", "--trace", str(trace), "--family", "sd15", "--workers", "2", "--time-scale", "2"]
    return argv, tmp_path / "slo.json"


def prompt_bench(tmp_path: Path, opt: str) -> dict[str, Any]:
    """The light bench replayed without and with `opt`, its requests' prompts from a set of two."""
    argv, out = light_bench(tmp_path)
    options = ["--warmup", "1", "--opt", opt, "--prompts", "zipf:distinct=2,s=1", "--json", str(out)]
    assert main([*argv, *options]) == 0
    figures: dict[str, Any] = json.loads(out.read_text())
    assert [run["opt"] for run in figures["runs"]] == ["none", opt]
    return figures


def test_a_short_trace_replays_on_time_and_reports_slo_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.txt"
    trace.write_text(LIGHT_TRACE)
    out = tmp_path / "slo.json"
    argv = ["bench", "slo", "--trace", str(trace), "--family", "sd15", "--workers", "2", "--policy", "lego"]
    assert main([*argv, "--time-scale", "2", "--warmup", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["requests"] == 6 and figures["warmup_requests"] == 3  # A, B in the first second; C
    assert figures["completed"] + figures["rejected"] + figures["dropped"] == 6, figures
    assert figures["completed"] >= 4 and figures["slo_attainment"] >= 0.5, figures
    assert figures["prefetched"] == 2 * 6  # sd15: encoder, UNet, VAE, scheduler, two ControlNets
    assert figures["generator_lag_p99_ms"] < 100  # requests left on time: an open loop
    assert set(figures["standalone_s"]) == {"sd15-txt2img", "sd15-canny", "sd15-depth"}
    assert all(seconds > 0 for seconds in figures["standalone_s"].values())
    for key in ("slo_attainment", "requests", "rejected", "p50_s", "p99_s", "max_rs_at_90"):
        assert key in figures


def test_the_embedding_cache_is_measured_against_a_baseline_in_the_same_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = prompt_bench(tmp_path, "embed-cache")
    assert figures["runs"][0]["embedding_cache"] is None
    [speedup] = figures["speedup"]
    assert (
        speedup["embedding_cache"]["hit_rate"] > 0 and speedup["embedding_cache"]["encoder_seconds_saved"] > 0
    )
    assert 0 < speedup["prompt_repeat_share"] < 1 and speedup["p50_speedup"] > 0
    assert speedup["gpu_seconds"]["baseline"] > 0 and speedup["gpu_seconds"]["optimised"] > 0


def test_async_lora_loading_is_measured_against_synchronous_loading_with_its_quality_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, out = light_bench(tmp_path)
    options = ["--warmup", "1", "--opt", "async-lora", "--loras", "zipf:distinct=50,s=0"]
    bound = ["--lora-capacity", "1", "--lora-async-steps", "10", "--lora-fetch-s", "2", "--json", str(out)]
    assert main([*argv, *options, *bound]) == 0
    figures = json.loads(out.read_text())
    assert [run["opt"] for run in figures["runs"]] == ["none", "async-lora"]
    [speedup] = figures["speedup"]
    synchronous, asynchronous = speedup["lora"]["baseline"], speedup["lora"]["optimised"]
    # requests drew LoRAs the workers did not hold: synchronous loading waited for them ...
    assert synchronous["fetches"] > 0 and synchronous["waiting_batches"] > 0
    assert synchronous["requests_unpatched"] == 0 and synchronous["unpatched_batches"] == 0
    # ... asynchronous loading ran up to K steps of each branch without them meanwhile
    assert asynchronous["async_steps"] == 10 and asynchronous["requests_unpatched"] > 0
    assert 0 < asynchronous["unpatched_calls_per_request"] <= 2 * 10
    quality = figures["lora_quality"]
    assert quality["steps"] == 50 and quality["pixel_mse_no_lora_vs_sync"] > 0
    assert [entry["async_steps"] for entry in quality["by_async_steps"]] == [2, 5, 10]
    for entry in quality["by_async_steps"]:
        assert entry["unpatched_calls"] == 2 * entry["async_steps"]  # the slow store: the whole bound
        assert entry["pixel_mse_late_vs_sync"] > 0


def test_approximate_caching_is_measured_against_the_exact_path_with_its_quality_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = prompt_bench(tmp_path, "approx-cache")
    assert figures["runs"][0]["approx_cache"] is None
    [speedup] = figures["speedup"]
    # tenant A (text-to-image) repeats or neighbours its first prompt: the later ones resume from it
    resumed = speedup["approx_cache"]
    assert resumed["requests_resumed"] >= 1, figures
    # 30-50 % of 50 steps by shared words, less the one PNDM repeats (SD 1.5)
    assert 14 <= resumed["skipped_steps_per_resumed_request"] <= 24
    quality = figures["approx_quality"]
    assert quality["steps"] == 50 and len(quality["by_pair"]) == 5
    same = quality["by_pair"][0]
    assert same["pair"] == "same prompt" and same["pixel_mse_donor_vs_exact"] == 0
    assert same["pixel_mse_vs_exact"] < 1.0  # resumed on its own trajectory
    assert all(pair["skipped_steps"] > 0 and pair["pixel_mse_vs_exact"] >= 0 for pair in quality["by_pair"])


def test_approximate_caching_needs_prompts_that_resemble_each_other() -> None:
    argv = [
        "bench",
        "slo",
        "--trace",
        "poisson:rate=1,duration=5",
        "--family",
        "sd15",
        "--opt",
        "approx-cache",
    ]
    with pytest.raises(SystemExit, match="--opt approx-cache needs --prompts"):
        main(argv)


def test_async_lora_needs_requests_that_use_loras() -> None:
    argv = ["bench", "slo", "--trace", "poisson:rate=1,duration=5", "--family", "sd15", "--opt", "async-lora"]
    with pytest.raises(SystemExit, match="--opt async-lora needs --loras"):
        main(argv)


def test_the_bench_replays_on_a_running_process_cluster_under_its_policy(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    scale = ("--time-scale", "2")
    with (tmp_path / "cluster.log").open("w") as log:
        cluster = ProcessCluster(
            etcd.url,
            workers=2,
            log_file=log,
            worker_args=("--backend", "emulated", *scale),
            coordinator_args=("--enforce-slo", *scale),
        ).start()
        try:
            argv, out = light_bench(tmp_path)
            connect = ["--connect", cluster.gateway_address, "--store", etcd.url, "--warmup", "1"]
            assert main([*argv, *connect, "--json", str(out)]) == 0
            figures = json.loads(out.read_text())
            assert figures["policy"] == "lego" and figures["workers"] == 2
            assert figures["requests"] == 6 and figures["completed"] >= 4, figures
            assert figures["prefetched"] == 2 * 6
            assert figures["gpu_seconds"] > 0 and figures["embedding_cache"] is None  # from the workers
            # requests with LoRAs: their workflows registered on the running cluster and replayed there
            # (the workers fetch each LoRA in seconds, more than the SLO: some requests miss it)
            assert main([*argv, *connect, "--loras", "zipf:distinct=2,s=0", "--json", str(out)]) == 0
            patched = json.loads(out.read_text())
            assert patched["requests"] == 6 and patched["completed"] >= 1, patched["failures"]
            assert set(patched["failures"]) <= {"deadline", "rejected"}, patched["first_failure_messages"]
            assert (
                patched["lora"]["mix"] == "zipf:distinct=2,s=0" and patched["lora"]["requests_unpatched"] == 0
            )
            assert patched["lora"]["fetch_median_s"] is None and "fetches" not in patched["lora"]
            with pytest.raises(SystemExit, match="runs 'lego'"):
                main([*argv, *connect, "--policy", "static"])
            with pytest.raises(SystemExit, match="--opt embed-cache needs clusters"):
                main([*argv, *connect, "--opt", "embed-cache"])
        finally:
            cluster.stop()
