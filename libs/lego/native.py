"""The coordinator's pure core and lego.graph compiled with mypyc (scripts/build-native), used where
LEGO_NATIVE=1.

The compiled modules are built from the same sources into build/native/, beside a manifest of those
sources' hashes. `prefer_native` puts them ahead of the sources on the package's import path, and
refuses a build whose sources have changed since: a stale extension would silently run old code.
The simulator runs about twice as fast compiled (README: Simulator), with the same dispatches."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib.util import find_spec, module_from_spec, spec_from_file_location
from pathlib import Path

NATIVE_MODULES = (
    "lego.graph",  # the request graphs the scheduler reads all the time
    "lego_coordinator.approx_cache",
    "lego_coordinator.costs",
    "lego_coordinator.demand",
    "lego_coordinator.placement",
    "lego_coordinator.ready_queue",
    "lego_coordinator.scheduler",
    "lego_coordinator.simulator",
)
BUILD_DIR = Path(__file__).resolve().parents[2] / "build" / "native"
MANIFEST = "manifest.json"


class StaleNativeBuild(RuntimeError):
    pass


def requested() -> bool:
    return os.environ.get("LEGO_NATIVE", "") == "1"


def source_of(module: str) -> Path:
    package, _, name = module.rpartition(".")
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(package)
    for location in spec.submodule_search_locations:
        path = Path(location) / f"{name}.py"
        if path.is_file():
            return path
    raise ModuleNotFoundError(module)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(build_dir: str | Path) -> None:
    hashes = {module: _digest(source_of(module)) for module in NATIVE_MODULES}
    (Path(build_dir) / MANIFEST).write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")


def check_build(package: str, sources: Path, build_dir: Path = BUILD_DIR) -> None:
    """Raise StaleNativeBuild unless `build_dir` holds `package`'s modules built from `sources`."""
    manifest = build_dir / MANIFEST
    if not manifest.is_file():
        raise StaleNativeBuild(f"{build_dir} holds no build: run scripts/build-native")
    built = json.loads(manifest.read_text())
    for module, digest in built.items():
        name = module.rpartition(".")[2]
        if module.startswith(package + ".") and _digest(sources / f"{name}.py") != digest:
            raise StaleNativeBuild(f"{module} changed since {build_dir} was built: run scripts/build-native")


def prefer_native(package_path: list[str], package: str, sources: Path, build_dir: Path = BUILD_DIR) -> None:
    """Import `package`'s compiled modules from `build_dir` instead of their sources in `sources`."""
    try:
        check_build(package, sources, build_dir)
    except StaleNativeBuild as error:
        raise StaleNativeBuild(f"LEGO_NATIVE=1, but {error}") from None
    _load_runtime(build_dir)
    package_path.insert(0, str(build_dir / package))


def _load_runtime(build_dir: Path) -> None:
    """The compiled modules' shared library (a top-level module, `<hash>__mypyc`), loaded from its
    file: putting `build_dir` on sys.path instead would make its package folders namespace
    packages that shadow the real ones (whose __init__ then never checks the build)."""
    for library in build_dir.glob("*__mypyc.*"):
        name = library.name.partition(".")[0]
        if name in sys.modules:
            continue
        spec = spec_from_file_location(name, library)
        if spec is None or spec.loader is None:
            raise StaleNativeBuild(f"{library} cannot be loaded: run scripts/build-native")
        sys.modules[name] = module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
