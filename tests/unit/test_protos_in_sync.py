"""The committed stubs must equal freshly generated ones (run `make protos` after editing protos/)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_generated(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-protos"), str(tmp_path)],
        check=True,
        cwd=ROOT,
        env={"PY": sys.executable, "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
        capture_output=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "lego" / "v1").iterdir())
    committed_dir = ROOT / "libs"
    assert generated, "the generator produced nothing"
    for relative in generated:
        committed = committed_dir / relative
        assert committed.exists(), f"{relative} is generated but not committed"
        assert committed.read_bytes() == (tmp_path / relative).read_bytes(), (
            f"{relative} is stale: make protos"
        )
    committed_files = sorted(
        p.relative_to(committed_dir)
        for p in (committed_dir / "lego" / "v1").iterdir()
        if p.name != "__pycache__"
    )
    assert committed_files == generated
