"""DESIGN.md §7 dependency rules, checked on the source."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["gateway", "compiler", "coordinator", "worker", "dataengine"]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_import_lego_needs_neither_torch_nor_diffusers() -> None:
    code = (
        "import sys, lego, lego.client, lego.graph\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sdk_imports_no_service_and_services_import_no_other_service() -> None:
    packages = {f"lego_{s}" for s in SERVICES} | {"lego_cli"}
    for path in (ROOT / "libs" / "lego").rglob("*.py"):
        assert not imported_modules(path) & packages, path
    for service in SERVICES:
        own = f"lego_{service}"
        for path in (ROOT / "services" / service).rglob("*.py"):
            assert not imported_modules(path) & (packages - {own}), path


def test_pure_cores_do_no_io() -> None:
    forbidden = {"grpc", "aetcd", "socket", "asyncio", "subprocess", "time"}
    cores = [
        ROOT / "libs/lego/graph.py",
        ROOT / "libs/lego/allocator.py",
        ROOT / "libs/lego/request_inputs.py",
        ROOT / "libs/lego/operators.py",
        ROOT / "services/coordinator/lego_coordinator/scheduler.py",
    ]
    for path in cores:
        assert not imported_modules(path) & forbidden, path


def test_no_pickle_anywhere() -> None:
    for folder in ("libs", "services", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not imported_modules(path) & {"pickle", "cloudpickle", "dill"}, path
            text = path.read_text()
            for unsafe in (
                "torch.load(",
                "allow_pickle=True",
                "pd.read_pickle",
                "marshal.loads",
                "yaml.load(",
            ):
                assert unsafe not in text, (path, unsafe)
