"""The whole cluster as separate processes against a real etcd, driven by the `lego` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lego_worker.shapes import fidelity

from tests.conftest import EtcdProcess, free_port
from tests.pipeline_reference import decode_png

LEGO = [sys.executable, "-m", "lego_cli"]


def _wait_for_json_line(process: subprocess.Popen[bytes], timeout_s: float) -> dict:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    os.set_blocking(process.stdout.fileno(), False)
    buffer = b""
    while time.monotonic() < deadline:
        chunk = process.stdout.read()
        if chunk:
            buffer += chunk
            if b"\n" in buffer:
                return json.loads(buffer.split(b"\n", 1)[0])
        if process.poll() is not None:
            raise AssertionError(f"lego up exited with {process.returncode}")
        time.sleep(0.1)
    raise AssertionError("lego up did not announce itself")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_lego_up_with_etcd_serves_lego_generate(etcd: EtcdProcess, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "cluster.log").open("w")
    up = subprocess.Popen(
        [*LEGO, "up", "--store", etcd.url, "--workers", "2", "--grpc-port", str(port)],
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        announced = _wait_for_json_line(up, 180)
        assert announced["gateway"] == f"127.0.0.1:{port}" and announced["workers"] == 2
        children = subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 5 + 1  # data engine, compiler, coordinator, 2 workers, gateway

        out = tmp_path / "image.png"
        generated = subprocess.run(
            [
                *LEGO,
                "generate",
                "--prompt",
                "a green square",
                "--steps",
                "4",
                "--gateway",
                f"127.0.0.1:{port}",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert generated.returncode == 0, generated.stderr
        summary = json.loads(generated.stdout.strip().splitlines()[-1])
        assert summary["out"] == str(out) and summary["nodes_executed"] == 3 * 5 + 4
        assert decode_png(out.read_bytes()).shape == (128, 128, 3)

        bad = subprocess.run(
            [
                *LEGO,
                "generate",
                "--prompt",
                "x",
                "--height",
                "3000",
                "--gateway",
                f"127.0.0.1:{port}",
                "--out",
                str(tmp_path / "bad.png"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2
        assert "height must be" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        log.close()
    assert all(not _alive(int(pid)) for pid in children)


def test_lego_up_with_unreachable_etcd_names_the_address() -> None:
    port = free_port()
    result = subprocess.run(
        [*LEGO, "up", "--store", f"etcd://127.0.0.1:{port}"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"cannot reach etcd at 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_lego_demo_draws_its_prompt_and_prints_a_json_summary_last(tmp_path: Path) -> None:
    out = tmp_path / "demo.png"
    prompt = "a yellow square on a black background"
    result = subprocess.run(
        [*LEGO, "demo", "--out", str(out), "--prompt", prompt], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) >= {"out", "latency_s", "nodes_executed"}
    assert summary["nodes_executed"] == 3 * 21 + 4  # 20 PNDM steps + 1, CFG: micro-served
    image = decode_png(out.read_bytes())
    assert image.shape == (64, 64, 3)
    reading = fidelity.read(image)  # the checker is not the model
    assert (reading.shape, reading.colour, reading.background) == ("square", "yellow", "black"), reading
