"""`lego watch`, `lego status` and `lego generate` flags, and the SDK's parsing of REST answers
(Server-Sent Events, error bodies) without a server."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from lego.client import InvalidInput, LegoError, Progress
from lego.client.errors import from_http_error
from lego.client.models import cluster_info_json, generated_image_json, request_info_json
from lego.client.rest_client import EventStream
from lego_cli.main import DEFAULT_GATEWAY, build_parser


def test_watch_and_status_take_a_gateway_and_an_api_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEGO_API_KEY", "from-env")
    watch = build_parser().parse_args(["watch", "abc", "--node-events"])
    assert (watch.request_id, watch.gateway, watch.api_key, watch.node_events) == (
        "abc",
        DEFAULT_GATEWAY,
        "from-env",
        True,
    )
    status = build_parser().parse_args(["status", "--gateway", "h:1", "--api-key", "flag"])
    assert (status.gateway, status.api_key) == ("h:1", "flag")
    monkeypatch.delenv("LEGO_API_KEY")
    generate = build_parser().parse_args(["generate", "--prompt", "p", "--progress"])
    assert generate.progress and generate.api_key is None
    assert not build_parser().parse_args(["generate", "--prompt", "p"]).progress


def test_a_simulation_imports_no_torch() -> None:
    """`lego sim` (and every command but `bench` and a torch worker) starts without importing torch
    or diffusers, which took ~4 s of each run's start."""
    script = (
        "import sys; from lego_cli.main import main; "
        "main(['sim', '--trace', 'poisson:rate=1,duration=2,seed=1', '--gpus', '1', '--rs', '1']); "
        "print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "[]"


def test_server_sent_events_parse_into_progress() -> None:
    stream = EventStream()
    lines = [
        ": a comment",
        "event: step",
        'data: {"request_id": "r", "kind": "step", "time_s": 0.5, "step": 3, "total": 8}',
        "",
        "",
        "event: failed",
        'data: {"request_id": "r", "kind": "failed", "code": 13, "message": "boom", "extra": 1}',
        "",
    ]
    parsed = [event for event in map(stream.feed, lines) if event is not None]
    assert parsed == [
        Progress("r", "step", time_s=0.5, step=3, total=8),
        Progress("r", "failed", code=grpc.StatusCode.INTERNAL, message="boom"),
    ]
    assert parsed[1].final and not parsed[0].final
    assert parsed[1].as_dict()["code"] == "INTERNAL"


def test_http_errors_map_to_grpc_codes_by_name() -> None:
    error = from_http_error(400, {"error": {"code": "INVALID_ARGUMENT", "message": "bad", "field": "steps"}})
    assert (
        isinstance(error, InvalidInput) and error.field == "steps" and str(error) == "INVALID_ARGUMENT: bad"
    )
    assert from_http_error(429, {"error": {"code": "RESOURCE_EXHAUSTED", "message": "full"}}).code == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert from_http_error(503, "<html>").code == grpc.StatusCode.UNAVAILABLE
    assert from_http_error(500, {"detail": "x"}).code == grpc.StatusCode.INTERNAL
    assert LegoError(grpc.StatusCode.ABORTED, "the first client's form").code == grpc.StatusCode.ABORTED
    assert LegoError("NOT_FOUND", "by name").code == grpc.StatusCode.NOT_FOUND


def test_rest_json_converts_like_the_protos() -> None:
    state = {
        "request_id": "r",
        "workflow": "w",
        "state": "cancelled",
        "step": 2,
        "total_steps": 9,
        "latency_s": 1.5,
        "slo_s": 0,
        "estimate_s": 0.7,
        "error": {"code": "CANCELLED", "message": "by the client"},
        "events_url": "/v1/requests/r/events",
        "image_url": "/v1/requests/r/image",
    }
    info = request_info_json(state)
    assert info.finished and info.error_code == grpc.StatusCode.CANCELLED and info.estimate_s == 0.7
    image = generated_image_json(
        {"request_id": "r", "b64_json": "iVBORw==", "width": 8, "height": 4, "latency_s": 0.25}
    )
    assert (image.png, image.width, image.height, image.latency_s) == (b"\x89PNG", 8, 4, 0.25)
    cluster = cluster_info_json(
        {
            "workers": [{"worker_id": "w0", "address": "a", "busy": True, "loaded_models": ["m"]}],
            "requests_in_flight": 3,
            "ready_tasks": 1,
            "policy": "slo",
            "epoch": 4,
            "slo": {"window_s": 300.0, "answered": 2, "met": 1, "attainment": 0.5},
        }
    )
    assert cluster.workers[0].loaded_models == ("m",) and cluster.workers[0].busy
    assert (cluster.requests_in_flight, cluster.epoch, cluster.slo.attainment) == (3, 4, 0.5)
