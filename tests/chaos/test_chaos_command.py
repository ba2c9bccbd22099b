"""`lego chaos` end to end, bounded: 20 s of load on its own process cluster and etcd with seeded
faults of every kind; nothing is lost, answered twice or left in the data engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lego_cli.chaos import FAULTS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_lego_chaos_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: run `bash scripts/ensure-etcd` (make test does)")
    out = tmp_path / "chaos.json"
    command = [
        *(sys.executable, "-m", "lego_cli", "chaos", "--duration", "20", "--json", str(out)),
        *("--seed", "10", "--rate", "2", "--fault-interval", "3.5", "--workdir", str(tmp_path / "work")),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=280)
    assert out.exists(), run.stderr[-3000:]
    result = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "faults"}))
    for fault in result["faults"]:
        print(json.dumps(fault))
    assert result["lost"] == 0, result
    assert result["duplicated"] == 0, result
    assert result["leaked_tensors"] == 0, result
    assert result["serves_after"], result
    assert result["sent"] == result["completed"] + result["failed_explicit"] > 20
    faults = result["faults"]  # seed 10: etcd_restart, dataengine_kill, leader_kill, then worker_kill
    assert len(faults) >= 3 and {f["kind"] for f in faults} <= set(FAULTS)
    assert {"etcd_restart", "dataengine_kill", "leader_kill"} <= {f["kind"] for f in faults}
    assert all(f["target"] and "note" not in f for f in faults), faults
    assert run.returncode == 0, run.stderr[-3000:]
