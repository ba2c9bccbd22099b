"""Which model sources a cluster may load (pure). With no roots configured every source is allowed;
with roots (`--model-roots` on the compiler and the workers, or LEGO_MODEL_ROOTS, comma-separated)
a source must be a built-in preset (`tiny-*`, `builtin`), a path inside one of the root directories
(entries starting with `/`), or a hub id equal to an entry or under an entry ending in `/`
(`stabilityai/`). Registration refuses others, and workers refuse to load them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

MODEL_ROOTS_ENV = "LEGO_MODEL_ROOTS"


# Sources built inside the worker (seeded presets, bundled configs, committed weights): always allowed.
BUNDLED_PREFIXES = ("tiny-", "realsize-")
BUNDLED_SOURCES = ("builtin", "lego-shapes")


@dataclass(frozen=True)
class SourcePolicy:
    roots: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> SourcePolicy:
        return cls(tuple(entry.strip() for entry in (text or "").split(",") if entry.strip()))

    @classmethod
    def from_env(cls, given: str | None = None, environ: Mapping[str, str] = os.environ) -> SourcePolicy:
        return cls.parse(given if given is not None else environ.get(MODEL_ROOTS_ENV))

    def refusal(self, source: str) -> str | None:
        """Why `source` (a model id's source, or a LoRA path) may not be loaded; None when it may."""
        base = source.partition("#")[0]
        if not self.roots or base.startswith(BUNDLED_PREFIXES) or base in BUNDLED_SOURCES:
            return None
        resolved = os.path.realpath(base)
        for root in self.roots:
            if root.startswith("/"):
                real_root = os.path.realpath(root)
                if resolved == real_root or resolved.startswith(real_root.rstrip(os.sep) + os.sep):
                    return None
            elif base == root or (root.endswith("/") and base.startswith(root)):
                return None
        return f"model source {source!r} is outside the configured model roots ({', '.join(self.roots)})"

    def check(self, source: str) -> None:
        refusal = self.refusal(source)
        if refusal is not None:
            raise PermissionError(refusal)
