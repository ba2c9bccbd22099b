"""Model sources and the worker's model pool.

A model id is `<source>:<component>`: `tiny-sd15:unet` (a built-in preset, no download) or
`/models/sd15:unet` / `<hub id>:unet` (diffusers `from_pretrained` with that subfolder).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from lego_worker import presets

PRESET_BUILDERS = {presets.TINY_SD15: presets.build_tiny_sd15}


@dataclass
class TextEncoderBundle:
    tokenizer: CLIPTokenizer
    encoder: CLIPTextModel


def split_model_id(model_id: str) -> tuple[str, str]:
    source, sep, component = model_id.rpartition(":")
    if not sep or not source or not component:
        raise ValueError(f"model id must be '<source>:<component>', got {model_id!r}")
    return source, component


def _load_pretrained(source: str, component: str) -> Any:
    if component == "text_encoder":
        return TextEncoderBundle(
            CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
            CLIPTextModel.from_pretrained(source, subfolder="text_encoder").eval(),
        )
    if component == "unet":
        return diffusers.UNet2DConditionModel.from_pretrained(source, subfolder="unet").eval()
    if component == "vae":
        return diffusers.AutoencoderKL.from_pretrained(source, subfolder="vae").eval()
    if component == "scheduler":
        config = diffusers.PNDMScheduler.load_config(source, subfolder="scheduler")
        return getattr(diffusers, str(config["_class_name"])).from_config(config)
    raise ValueError(f"unknown model component {component!r}")


class ModelPool:
    """Loaded models by id: one resident copy each, shared by every workflow that uses it."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self._models: dict[str, Any] = {}
        self._presets: dict[str, presets.SD15Components] = {}
        self._lock = threading.Lock()
        self.load_seconds: dict[str, float] = {}

    def loaded(self) -> list[str]:
        return sorted(self._models)

    def get(self, model_id: str) -> Any:
        with self._lock:
            if model_id not in self._models:
                started = time.perf_counter()
                self._models[model_id] = self._load(model_id)
                self.load_seconds[model_id] = time.perf_counter() - started
            return self._models[model_id]

    def unload(self, model_id: str) -> bool:
        with self._lock:
            return self._models.pop(model_id, None) is not None

    def _load(self, model_id: str) -> Any:
        source, component = split_model_id(model_id)
        if source in PRESET_BUILDERS:
            if source not in self._presets:
                self._presets[source] = PRESET_BUILDERS[source]()
            bundle = self._presets[source]
            if component == "text_encoder":
                return TextEncoderBundle(bundle.tokenizer, bundle.text_encoder.to(self.device))
            if component in ("unet", "vae"):
                return getattr(bundle, component).to(self.device)
            if component == "scheduler":
                return bundle.scheduler
            raise ValueError(f"preset {source} has no component {component!r}")
        if source.startswith("tiny-"):
            raise ValueError(f"unknown preset {source!r} (known: {sorted(PRESET_BUILDERS)})")
        return _load_pretrained(source, component)
