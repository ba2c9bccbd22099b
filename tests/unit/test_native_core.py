"""The coordinator's core compiled with mypyc (lego.native, scripts/build-native) simulates exactly
as its Python sources do, and a build older than its sources is refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lego import native

SIMULATION = [
    "sim",
    "--trace",
    "poisson:rate=2,duration=30,seed=1",
    "--family",
    "flux-schnell,sd3-medium",
    "--gpus",
    "8",
    "--policy",
    "lego,static",
]


def _simulate(compiled: bool) -> tuple[dict[str, Any], str]:
    """The simulation's figures, and the file its scheduler was imported from."""
    script = (
        "import sys; from lego_cli.main import main; main(sys.argv[1:]); "
        "import lego_coordinator.scheduler as s; print(s.__file__)"
    )
    env = {**os.environ, "LEGO_NATIVE": "1" if compiled else "0"}
    run = subprocess.run(
        [sys.executable, "-c", script, *SIMULATION], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    text, _, scheduler_file = run.stdout.rstrip().rpartition("\n")
    return json.loads(text), scheduler_file


@pytest.mark.skipif(
    not (native.BUILD_DIR / native.MANIFEST).is_file(), reason="no native build (make native)"
)
def test_the_compiled_core_simulates_exactly_as_its_sources() -> None:
    pure, pure_file = _simulate(compiled=False)
    compiled, compiled_file = _simulate(compiled=True)
    assert pure_file.endswith(".py") and compiled_file.endswith(".so")
    assert (pure.pop("compiled_core"), compiled.pop("compiled_core")) == (False, True)
    pure.pop("simulation_wall_s")
    compiled.pop("simulation_wall_s")
    assert compiled == pure


def test_a_missing_or_stale_build_is_refused_and_a_fresh_one_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    sources, build = tmp_path / "src", tmp_path / "build"
    sources.mkdir()
    build.mkdir()
    (sources / "costs.py").write_text("x = 1\n")
    with pytest.raises(native.StaleNativeBuild, match="holds no build"):
        native.prefer_native([], "pkg", sources, build)
    (build / native.MANIFEST).write_text(json.dumps({"pkg.costs": hashlib.sha256(b"x = 0\n").hexdigest()}))
    with pytest.raises(native.StaleNativeBuild, match=r"pkg\.costs changed"):
        native.prefer_native([], "pkg", sources, build)
    (build / native.MANIFEST).write_text(json.dumps({"pkg.costs": hashlib.sha256(b"x = 1\n").hexdigest()}))
    package_path = [str(sources)]
    native.prefer_native(package_path, "pkg", sources, build)
    assert package_path == [str(build / "pkg"), str(sources)]
    assert sys.path[-1] == str(build)
