"""The built-in workflows, for `lego workflows register deploy/workflows.py` (what `lego up` registers)."""

from lego.builtin_workflows import builtin_workflows

for _index, _spec in enumerate(builtin_workflows()):
    globals()[f"builtin_{_index}"] = _spec
