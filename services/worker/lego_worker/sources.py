"""Where a model's weights come from.

A model id is `<source>:<component>`: `tiny-sd15:unet` (a built-in preset, no download) or
`/models/sd15:unet` / `<hub id>:unet` (diffusers `from_pretrained` with that subfolder).
A `#tag` after the source (`tiny-sd15#b:unet`) names a private copy of the same weights: a distinct
model to the cache and the scheduler (how a monolithic deployment would hold it).
ControlNets: `tiny-sd15:controlnet_canny` / `:controlnet_depth` (preset components; `tiny-sd3`:
`controlnet_canny` / `controlnet_pose`), and
`<hub id or directory>:controlnet` (a ControlNet repository: `from_pretrained` without a subfolder).
`builtin:image` is the image preprocessor (no weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from lego.model_sources import SourcePolicy
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lego_worker import presets, presets_flux, presets_sd3
from lego_worker.flux import FluxTextEncoders
from lego_worker.sd3 import SD3TextEncoders
from lego_worker.shapes.model import LEGO_SHAPES, build_lego_shapes

PRESET_BUILDERS: dict[str, Any] = {
    presets.TINY_SD15: presets.build_tiny_sd15,
    presets.TINY_SDXL: presets.build_tiny_sdxl,
    presets_flux.TINY_FLUX_DEV: presets_flux.build_tiny_flux_dev,
    presets_flux.TINY_FLUX_SCHNELL: presets_flux.build_tiny_flux_schnell,
    presets_sd3.TINY_SD3: presets_sd3.build_tiny_sd3,
    LEGO_SHAPES: build_lego_shapes,  # trained demo model: committed weights (lego_worker/shapes)
}


@dataclass
class TextEncoderBundle:
    tokenizer: CLIPTokenizer
    encoder: CLIPTextModel


class TextEncoderStack(torch.nn.Module):
    """A family's text encoders called as one model (SDXL: CLIP-L then CLIP-G): each encodes the
    text with its own tokenizer; hidden states are concatenated, the pooled embedding is the first
    2-D output (CLIP-G's projection), as diffusers' SDXL pipeline does."""

    def __init__(self, tokenizers: list[Any], encoders: list[torch.nn.Module]) -> None:
        super().__init__()
        self.tokenizers = tokenizers
        self.encoders = torch.nn.ModuleList(encoders)


def _preset_component(bundle: Any, component: str) -> Any:
    if component == "text_encoder" and hasattr(bundle, "text_encoder"):
        return TextEncoderBundle(bundle.tokenizer, bundle.text_encoder)
    if component == "text_encoders" and isinstance(bundle, presets_sd3.SD3Components):
        return SD3TextEncoders(
            [bundle.tokenizer, bundle.tokenizer_2],
            [bundle.text_encoder, bundle.text_encoder_2],
            bundle.tokenizer_3,
            bundle.text_encoder_3,
            bundle.max_sequence_length,
        )
    if component == "text_encoders" and isinstance(bundle, presets_flux.FluxComponents):
        return FluxTextEncoders(
            bundle.tokenizer,
            bundle.text_encoder,
            bundle.tokenizer_2,
            bundle.text_encoder_2,
            bundle.max_sequence_length,
        )
    if component == "text_encoders" and hasattr(bundle, "text_encoder_2"):
        return TextEncoderStack(
            [bundle.tokenizer, bundle.tokenizer_2], [bundle.text_encoder, bundle.text_encoder_2]
        )
    if component in ("unet", "transformer", "vae", "scheduler") and hasattr(bundle, component):
        return getattr(bundle, component)
    return None


class ImagePreprocessor:
    """The `image` operator's model: nothing to load (images are decoded and resized per call)."""


def split_model_id(model_id: str) -> tuple[str, str]:
    source, sep, component = model_id.rpartition(":")
    if not sep or not source or not component:
        raise ValueError(f"model id must be '<source>:<component>', got {model_id!r}")
    return source, component


def _pipeline_class(source: str) -> str:
    return str(diffusers.DiffusionPipeline.load_config(source)["_class_name"])


def _load_pretrained(source: str, component: str) -> Any:
    if component == "text_encoders" and "Flux" in _pipeline_class(source):
        from transformers import AutoTokenizer, T5EncoderModel

        return FluxTextEncoders(
            CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
            CLIPTextModel.from_pretrained(source, subfolder="text_encoder").eval(),
            AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
            T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2").eval(),
            512,
        )
    if component == "text_encoders" and "StableDiffusion3" in _pipeline_class(source):
        from transformers import AutoTokenizer, T5EncoderModel

        return SD3TextEncoders(
            [CLIPTokenizer.from_pretrained(source, subfolder=f"tokenizer{s}") for s in ("", "_2")],
            [
                CLIPTextModelWithProjection.from_pretrained(source, subfolder=f"text_encoder{s}").eval()
                for s in ("", "_2")
            ],
            AutoTokenizer.from_pretrained(source, subfolder="tokenizer_3"),
            T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3").eval(),
            256,
        )
    if component == "transformer":  # FluxTransformer2DModel or SD3Transformer2DModel
        config = diffusers.FluxTransformer2DModel.load_config(source, subfolder="transformer")
        model_class = getattr(diffusers, str(config["_class_name"]))
        return model_class.from_pretrained(source, subfolder="transformer").eval()
    if component == "text_encoders":  # SDXL
        return TextEncoderStack(
            [
                CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
                CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
            ],
            [
                CLIPTextModel.from_pretrained(source, subfolder="text_encoder").eval(),
                CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2").eval(),
            ],
        )
    if component == "text_encoder":
        return TextEncoderBundle(
            CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
            CLIPTextModel.from_pretrained(source, subfolder="text_encoder").eval(),
        )
    if component == "unet":
        return diffusers.UNet2DConditionModel.from_pretrained(source, subfolder="unet").eval()
    if component == "vae":
        return diffusers.AutoencoderKL.from_pretrained(source, subfolder="vae").eval()
    if component == "controlnet":  # a ControlNet repository: its class from its config
        config = diffusers.ControlNetModel.load_config(source)
        return getattr(diffusers, str(config["_class_name"])).from_pretrained(source).eval()
    if component.startswith("controlnet"):  # e.g. a pipeline directory with a controlnet/ subfolder
        config = diffusers.ControlNetModel.load_config(source, subfolder=component)
        model_class = getattr(diffusers, str(config["_class_name"]))
        return model_class.from_pretrained(source, subfolder=component).eval()
    if component == "scheduler":
        config = diffusers.PNDMScheduler.load_config(source, subfolder="scheduler")
        return getattr(diffusers, str(config["_class_name"])).from_config(config)
    raise ValueError(f"unknown model component {component!r}")


class SourceLoader:
    """Builds a component on the CPU (disk → host memory); presets are built once per source."""

    def __init__(self, policy: SourcePolicy | None = None) -> None:
        self._presets: dict[str, Any] = {}
        self.policy = policy or SourcePolicy()

    def load(self, model_id: str) -> Any:
        tagged_source, component = split_model_id(model_id)
        self.policy.check(tagged_source)
        source = tagged_source.partition("#")[0]
        if source == "builtin":
            if component != "image":
                raise ValueError(f"unknown builtin component {component!r} (known: ['image'])")
            return ImagePreprocessor()
        if source == presets.TINY_SD15 and component in presets.SD15_CONTROLNETS:
            return presets.build_tiny_sd15_controlnet(component)
        if source == presets.TINY_SDXL and component in presets.SD15_CONTROLNETS:
            return presets.build_tiny_sdxl_controlnet(component)
        if source.startswith("tiny-flux-") and component in presets_flux.FLUX_CONTROLNETS:
            return presets_flux.build_tiny_flux_controlnet(
                component, dev=source == presets_flux.TINY_FLUX_DEV
            )
        if source == presets_sd3.TINY_SD3 and component in presets_sd3.SD3_CONTROLNETS:
            return presets_sd3.build_tiny_sd3_controlnet(component)
        if source in PRESET_BUILDERS:
            if tagged_source not in self._presets:
                self._presets[tagged_source] = PRESET_BUILDERS[source]()
            found = _preset_component(self._presets[tagged_source], component)
            if found is None:
                raise ValueError(f"preset {source} has no component {component!r}")
            return found
        if source.startswith("realsize-"):  # published architectures, random weights
            from lego_worker import realsize

            return realsize.load(source, component)
        if source.startswith("tiny-"):
            raise ValueError(f"unknown preset {source!r} (known: {sorted(PRESET_BUILDERS)})")
        return _load_pretrained(source, component)
