"""deploy/healthcheck.py against a real gRPC server: SERVING → 0, nothing there → 1."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from lego.grpc_server import start_server

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "deploy" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_healthcheck_reads_the_ready_file_and_asks_the_health_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(lambda s: None, [], "127.0.0.1", 0)
    check = healthcheck()
    try:
        ready = tmp_path / "ready.json"
        monkeypatch.setenv("LEGO_READY_FILE", str(ready))
        assert await asyncio.to_thread(check.main, ["healthcheck"]) == 1  # not written yet
        ready.write_text(json.dumps({"service": "x", "address": server.address}))
        assert await asyncio.to_thread(check.main, ["healthcheck"]) == 0
        assert await asyncio.to_thread(check.main, ["healthcheck", f"127.0.0.1:{free_port()}"]) == 1
    finally:
        await server.stop()
