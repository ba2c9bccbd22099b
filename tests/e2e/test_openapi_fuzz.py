"""Schemathesis, driven by the gateway's own OpenAPI description, finds no server error (5xx) in any
HTTP operation. Workers are emulated (profiled timings, 1000x faster) so fuzzed requests that are
valid run in milliseconds."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from lego_cli.cluster import EmbeddedCluster
from lego_worker.agent import WorkerConfig

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


async def test_fuzzing_the_openapi_spec_finds_no_server_error(tmp_path: Path) -> None:
    worker = WorkerConfig(backend="emulated", time_scale=1000)
    async with EmbeddedCluster(workers=2, http_port=0, worker=worker) as cluster:
        process = await asyncio.create_subprocess_exec(
            str(SCHEMATHESIS),
            "run",
            f"http://{cluster.http_address}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "25",
            "--max-time",
            "60",
            "--seed",
            "1",
            "--generation-database",
            "none",
            "--request-timeout",
            "30",
            "--workers",
            "2",
            "--no-color",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
        output, _ = await process.communicate()
    report = output.decode(errors="replace")
    assert process.returncode == 0, report[-6000:]
    summary = re.search(r"(\d+) generated, (\d+) passed", report)
    assert summary is not None and summary.group(1) == summary.group(2), report[-6000:]
    assert int(summary.group(1)) > 500
