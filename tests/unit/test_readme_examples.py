"""The README's programming-model examples are valid workflows (the docs cannot drift silently)."""

from __future__ import annotations

import re
from pathlib import Path

from lego.graph import validate_spec
from lego.workflow import collect_workflows

README = Path(__file__).parents[2] / "README.md"


def test_every_family_example_in_the_readme_compiles() -> None:
    section = README.read_text().split("### One example per family", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None
    with collect_workflows() as built:
        exec(compile(code.group(1), "README.md", "exec"), {})  # the README's own example code
    specs = [workflow.to_spec() for workflow in built]
    assert [spec.name for spec in specs] == ["sd15-canny", "sdxl-img2img", "sd3", "flux-dev"]
    assert all(validate_spec(spec) == [] for spec in specs)
