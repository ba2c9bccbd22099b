"""LoRA patches on a shared, resident model, switched per batch (diffusers/peft adapters).

Adapters are loaded once into the one copy of the base model and enabled with their scales for the
batches that ask for them; the base weights are never modified or copied, so switching is exact.
A LoRA's file is read into host memory first (`fetch`, safe on a side thread while the model runs:
lego_worker.lora_loads), then injected into the model on the device thread when a batch uses it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from lego.model_sources import SourcePolicy

from lego_worker.backend import PatchSet

LORA_FILE = "pytorch_lora_weights.safetensors"  # the file diffusers looks for in a LoRA directory
METADATA_KEY = "lora_adapter_metadata"  # diffusers' adapter config in the safetensors header


def lora_prefix(model: Any) -> str:
    """The key prefix of a denoiser's layers in a diffusers LoRA file: `unet.` or `transformer.`."""
    return "transformer" if "Transformer" in type(model).__name__ else "unet"


def adapter_name(source: str) -> str:
    return "lora_" + hashlib.sha256(source.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FetchedLoRA:
    """A LoRA file read into host memory: its tensors and diffusers' adapter metadata."""

    state: dict[str, torch.Tensor]
    metadata: dict[str, Any] | None


def read_lora(source: str, policy: SourcePolicy) -> FetchedLoRA:
    """What diffusers' `load_lora_adapter` reads from a safetensors file or a directory holding one."""
    policy.check(source)
    path = Path(source)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"LoRA {source} does not exist")
    with safetensors.safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    raw = header.get(METADATA_KEY)
    return FetchedLoRA(safetensors.torch.load_file(str(path)), json.loads(raw) if raw else None)


class PatchState:
    """The LoRAs read into host memory, the adapters loaded into each model, and the patch set
    active on each model."""

    def __init__(self, policy: SourcePolicy | None = None) -> None:
        self.policy = policy or SourcePolicy()
        self._fetched: dict[str, FetchedLoRA] = {}
        self._fetch_lock = threading.Lock()
        self._models: dict[int, Any] = {}
        self._loaded: dict[int, set[str]] = {}
        self._active: dict[int, PatchSet] = {}

    def fetch(self, source: str) -> float:
        """Read a LoRA into host memory (any thread); seconds spent, 0 when already there."""
        with self._fetch_lock:
            if source in self._fetched:
                return 0.0
        started = time.perf_counter()
        fetched = read_lora(source, self.policy)
        with self._fetch_lock:
            self._fetched[source] = fetched
        return time.perf_counter() - started

    def drop(self, source: str) -> None:
        """Forget a LoRA: its host copy and its adapter in every model (the device thread)."""
        with self._fetch_lock:
            self._fetched.pop(source, None)
        name = adapter_name(source)
        for key, loaded in self._loaded.items():
            if name in loaded:
                self._models[key].delete_adapters(name)
                loaded.discard(name)
                self._active.pop(key, None)  # the active set may have named it: set it again

    def apply(self, model: Any, patches: PatchSet) -> None:
        key = id(model)
        if key in self._active and self._active[key] == patches:
            return
        self._models[key] = model
        loaded = self._loaded.setdefault(key, set())
        for source, _ in patches:
            name = adapter_name(source)
            if name not in loaded:
                self.fetch(source)
                with self._fetch_lock:
                    fetched = self._fetched[source]
                prefix = lora_prefix(model)
                state, metadata = dict(fetched.state), fetched.metadata
                model.load_lora_adapter(state, prefix=prefix, adapter_name=name, metadata=metadata)
                loaded.add(name)
        if patches:
            model.enable_lora()
            model.set_adapters([adapter_name(s) for s, _ in patches], weights=[scale for _, scale in patches])
        elif loaded:
            model.disable_lora()
        self._active[key] = patches
