"""Where a model's weights come from.

A model id is `<source>:<component>`: `tiny-sd15:unet` (a built-in preset, no download) or
`/models/sd15:unet` / `<hub id>:unet` (diffusers `from_pretrained` with that subfolder).
A `#tag` after the source (`tiny-sd15#b:unet`) names a private copy of the same weights: a distinct
model to the cache and the scheduler (how a monolithic deployment would hold it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import diffusers
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


class SourceLoader:
    """Builds a component on the CPU (disk → host memory); presets are built once per source."""

    def __init__(self) -> None:
        self._presets: dict[str, presets.SD15Components] = {}

    def load(self, model_id: str) -> Any:
        tagged_source, component = split_model_id(model_id)
        source = tagged_source.partition("#")[0]
        if source in PRESET_BUILDERS:
            if tagged_source not in self._presets:
                self._presets[tagged_source] = PRESET_BUILDERS[source]()
            bundle = self._presets[tagged_source]
            if component == "text_encoder":
                return TextEncoderBundle(bundle.tokenizer, bundle.text_encoder)
            if component in ("unet", "vae", "scheduler"):
                return getattr(bundle, component)
            raise ValueError(f"preset {source} has no component {component!r}")
        if source.startswith("tiny-"):
            raise ValueError(f"unknown preset {source!r} (known: {sorted(PRESET_BUILDERS)})")
        return _load_pretrained(source, component)
