"""`lego profile` on the CPU for tiny-sd15's components: files in the H800 profiles' format that the
emulated backend then follows instead of the H800 figures; bad flags are named."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from lego.profiles import ProfileSet, default_profile_dir, load_batch_sizes, parse_profile
from lego_cli.main import main
from lego_worker.emulated_backend import EmulatedBackend
from lego_worker.profiler import Measured, batch_modes, split_stack

MODELS = {
    "tiny-sd15:unet": "StableDiffusion15",
    "tiny-sd15:text_encoder": "CLIP_SD15",
    "tiny-sd15:vae": "StableDiffusion15VAE",
    "tiny-sd15:scheduler": "PNDMScheduler",
    "tiny-sd15:controlnet_canny": "StableDiffusion15ControlNetCanny",
}
SIZE = 64


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("profiles")
    threads = torch.get_num_threads()
    try:
        args = ["profile", "--models", ",".join(MODELS), "--device", "cpu", "--sizes", str(SIZE)]
        args += ["--batch", "1,2", "--runs", "1", "--threads", "1", "--out", str(out), "--no-progress"]
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    yield out


def _keys(data: dict[str, object]) -> set[str]:
    return set(data)


def test_files_have_the_h800_format_and_parse(profiled: Path) -> None:
    reference = json.loads((default_profile_dir() / "StableDiffusion15VAE.json").read_text())
    for name in MODELS.values():
        data = json.loads((profiled / f"{name}.json").read_text())
        assert _keys(data) == _keys(reference)
        assert data["model_name"] == name and data["gpu_type"].startswith("CPU")
        assert _keys(data["loading"]) == _keys(reference["loading"])
        profile = parse_profile(data)
        assert profile.memory_bytes > 0 or name == "PNDMScheduler"
        for execution in data["execution"]:
            assert [r["batch_size"] for r in execution["results"]] == [1, 2]
            for result in execution["results"]:
                assert result["execution_time"] > 0
                assert result["gpu_memory_used"] >= data["loading"]["gpu_memory_required"]
                if name != "CLIP_SD15":  # text encoders are profiled without a resolution
                    assert (result["height"], result["width"]) == (SIZE, SIZE)
    modes = {name: sorted(ProfileSet(profiled).get(name).modes) for name in MODELS.values()}
    assert modes["StableDiffusion15VAE"] == ["decode_latents", "prepare_image"]
    assert modes["PNDMScheduler"] == ["init", "step", "step_classifier_free_guidance"]
    assert set(load_batch_sizes(profiled)) == {
        "StableDiffusion15",
        "CLIP_SD15",
        "StableDiffusion15ControlNetCanny",
    }


def _unet_items(batch: int) -> list[dict[str, object]]:
    rng = np.random.default_rng(0)
    return [
        {
            "sample": rng.standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32),
            "timestep": np.array(500),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32),
        }
        for _ in range(batch)
    ]


def test_emulated_backend_follows_the_measured_profile(profiled: Path) -> None:
    measured = json.loads((profiled / "StableDiffusion15.json").read_text())
    h800 = ProfileSet(default_profile_dir()).for_model("tiny-sd15:unet")
    expected = measured["execution"][0]["results"][1]["execution_time"]  # batch 2 at 64 px
    slept: list[float] = []
    recorded = EmulatedBackend(ProfileSet(profiled), time_scale=1, sleep=slept.append)
    recorded.load("tiny-sd15:unet")
    recorded.run("unet", "tiny-sd15:unet", "denoise", _unet_items(2), ())
    assert slept == [
        pytest.approx(measured["loading"]["disk_to_host_mem_time"]),
        pytest.approx(measured["loading"]["host_mem_to_gpu_time"]),
        pytest.approx(expected),
    ]
    assert expected != pytest.approx(h800.execution_s("default", 2, SIZE * SIZE), rel=0.01)
    profile = ProfileSet(profiled).get("StableDiffusion15")
    assert recorded.footprint("tiny-sd15:unet") == profile.memory_bytes

    real = EmulatedBackend(ProfileSet(profiled), time_scale=1)
    started = time.perf_counter()
    real.run("unet", "tiny-sd15:unet", "denoise", _unet_items(2), ())
    wall = time.perf_counter() - started
    assert expected * 0.95 <= wall <= expected + 0.05


def test_a_text_encoder_stack_splits_into_members_that_sum_back() -> None:
    profile = {
        "gpu_type": "CPU",
        "gpu_memory_total": 1,
        "model_name": "CLIP_L+CLIP_G+T5",
        "loading": {"disk_to_host_mem_time": 1.0, "host_mem_to_gpu_time": 0.5, "gpu_memory_required": 600.0},
        "execution": [
            {
                "mode": "default",
                "results": [{"batch_size": 1, "execution_time": 0.3, "gpu_memory_used": 900.0}],
            }
        ],
    }
    parts = split_stack(Measured(profile, [100, 200, 300]))
    assert list(parts) == ["CLIP_L", "CLIP_G", "T5"]
    assert sum(p["loading"]["gpu_memory_required"] for p in parts.values()) == pytest.approx(600)
    times = [p["execution"][0]["results"][0]["execution_time"] for p in parts.values()]
    assert sum(times) == pytest.approx(0.3)
    assert parts["T5"]["loading"]["disk_to_host_mem_time"] == pytest.approx(0.5)


def test_batch_modes_rule() -> None:
    times = {1: 1.0, 2: 1.2, 4: 2.0, 8: 4.1}  # batch 2 is ~free; batch 8 gives no more items/s than 4
    results = [{"batch_size": b, "height": 64, "width": 64, "execution_time": s} for b, s in times.items()]
    loading = {"disk_to_host_mem_time": 1.0, "host_mem_to_gpu_time": 0.5, "gpu_memory_required": 10**9}

    def profile(mode: str) -> dict[str, object]:
        return {"model_name": "M", "loading": loading, "execution": [{"mode": mode, "results": results}]}

    assert batch_modes(profile("default")) == (2, 4)
    assert batch_modes(profile("decode_latents")) is None


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--models", "tiny-sd15:nothing"),
        ("--models", "no-such-model"),
        ("--sizes", "60"),
        ("--sizes", "0"),
        ("--batch", "0"),
        ("--batch", "two"),
        ("--runs", "0"),
    ],
)
def test_bad_flags_exit_with_an_error_naming_the_flag(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = {"--models": "tiny-sd15:unet", "--out": str(tmp_path), flag: value}
    with pytest.raises(SystemExit) as raised:
        main(["profile", *[part for pair in args.items() for part in pair]])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert flag in error and value in error


@pytest.mark.parametrize("device", ["tpu", "cuda:7" if torch.cuda.is_available() else "cuda:0"])
def test_an_unknown_or_absent_device_is_named(
    device: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["profile", "--models", "tiny-sd15:unet", "--device", device, "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "--device" in error and device in error
    assert not list(tmp_path.iterdir())
