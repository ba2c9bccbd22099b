"""The coordinator's core compiled with mypyc (lego.native, scripts/build-native) simulates exactly
as its Python sources do, and a build older than its sources is refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib.util import find_spec
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
    """The simulation's figures, and the files its scheduler and its package were imported from."""
    script = (
        "import sys; from lego_cli.main import main; main(sys.argv[1:]); "
        "import lego_coordinator as package, lego_coordinator.scheduler as s; "
        "print(s.__file__, package.__file__)"
    )
    env = {**os.environ, "LEGO_NATIVE": "1" if compiled else "0"}
    run = subprocess.run(
        [sys.executable, "-c", script, *SIMULATION], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    text, _, files = run.stdout.rstrip().rpartition("\n")
    return json.loads(text), files


def _stale_build() -> str:
    """Why the build cannot be used (sources edited since it was made, or none made), or ""."""
    try:
        for package in ("lego", "lego_coordinator"):
            spec = find_spec(package)
            assert spec is not None and spec.origin is not None
            native.check_build(package, Path(spec.origin).parent)
    except native.StaleNativeBuild as error:
        return str(error)
    return ""


UNUSABLE_BUILD = _stale_build()


@pytest.mark.skipif(bool(UNUSABLE_BUILD), reason=f"no fresh native build (make native): {UNUSABLE_BUILD}")
def test_the_compiled_core_simulates_exactly_as_its_sources() -> None:
    pure, pure_files = _simulate(compiled=False)
    compiled, compiled_files = _simulate(compiled=True)
    package = str(Path("services/coordinator/lego_coordinator/__init__.py"))
    assert pure_files.endswith(package) and pure_files.split()[0].endswith("scheduler.py")
    # the compiled scheduler, in the real package (whose __init__ checked the build is fresh)
    assert compiled_files.endswith(package) and compiled_files.split()[0].endswith(".so")
    assert (pure.pop("compiled_core"), compiled.pop("compiled_core")) == (False, True)
    pure.pop("simulation_wall_s")
    compiled.pop("simulation_wall_s")
    assert compiled == pure


def test_a_missing_or_stale_build_is_refused_and_a_fresh_one_used(tmp_path: Path) -> None:
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
    assert str(build) not in sys.path  # its folders would shadow the real packages
