"""LoRA patches on a shared, resident model, switched per batch (diffusers/peft adapters).

Adapters are loaded once into the one copy of the base model and enabled with their scales for the
batches that ask for them; the base weights are never modified or copied, so switching is exact.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lego.model_sources import SourcePolicy

from lego_worker.backend import PatchSet


def lora_prefix(model: Any) -> str:
    """The key prefix of a denoiser's layers in a diffusers LoRA file: `unet.` or `transformer.`."""
    return "transformer" if "Transformer" in type(model).__name__ else "unet"


def adapter_name(source: str) -> str:
    return "lora_" + hashlib.sha256(source.encode()).hexdigest()[:16]


class PatchState:
    """The adapters loaded into each model and the patch set currently active on it."""

    def __init__(self, policy: SourcePolicy | None = None) -> None:
        self.policy = policy or SourcePolicy()
        self._loaded: dict[int, set[str]] = {}
        self._active: dict[int, PatchSet] = {}

    def apply(self, model: Any, patches: PatchSet) -> None:
        key = id(model)
        if self._active.get(key, ()) == patches:
            return
        loaded = self._loaded.setdefault(key, set())
        for source, _ in patches:
            name = adapter_name(source)
            if name not in loaded:
                self.policy.check(source)
                path = Path(source)
                if not path.exists():
                    raise FileNotFoundError(f"LoRA {source} does not exist")
                model.load_lora_adapter(str(path), prefix=lora_prefix(model), adapter_name=name)
                loaded.add(name)
        if patches:
            model.enable_lora()
            model.set_adapters([adapter_name(s) for s, _ in patches], weights=[scale for _, scale in patches])
        elif loaded:
            model.disable_lora()
        self._active[key] = patches
