"""`realsize-*` model sources: the published architectures of SD 1.5, SDXL, SD3 medium and FLUX.1
at their real size with random weights (bundled configs, nothing downloaded), for profiling real
compute and memory without the checkpoints. Tokenizers are the tiny presets' local ones (no
vocabulary files): the token ids differ from the real tokenizers', the sequence lengths do not.

Weights are float32, as the worker runs every model: SDXL's UNet alone is ~10 GB on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lego_worker.realsize.architectures import ARCHITECTURES, build, config_of, parameter_count

REALSIZE_SD15 = "realsize-sd15"
REALSIZE_SDXL = "realsize-sdxl"
REALSIZE_SD3 = "realsize-sd3"
REALSIZE_FLUX_DEV = "realsize-flux-dev"
REALSIZE_FLUX_SCHNELL = "realsize-flux-schnell"
SD3_T5_LENGTH, FLUX_DEV_T5_LENGTH, FLUX_SCHNELL_T5_LENGTH = 256, 512, 256  # the pipelines' defaults

__all__ = ["ARCHITECTURES", "SOURCES", "build", "config_of", "load", "parameter_count", "t5_length"]


def _clip_tokenizer() -> Any:
    from lego_worker.presets import build_tiny_tokenizer

    return build_tiny_tokenizer()


def _t5_tokenizer() -> Any:
    from lego_worker.presets_flux import build_tiny_t5_tokenizer

    return build_tiny_t5_tokenizer()


def _sd15_text_encoder(device: str) -> Any:
    from lego_worker.sources import TextEncoderBundle

    return TextEncoderBundle(_clip_tokenizer(), build("clip_l", device))


def _sdxl_text_encoders(device: str) -> Any:
    from lego_worker.sources import TextEncoderStack

    return TextEncoderStack(
        [_clip_tokenizer(), _clip_tokenizer()], [build("clip_l", device), build("clip_g", device)]
    )


def _sd3_text_encoders(device: str) -> Any:
    from lego_worker.sd3 import SD3TextEncoders

    clips = [build("clip_l_projection", device), build("clip_g", device)]
    t5 = build("t5_xxl_encoder", device)
    return SD3TextEncoders([_clip_tokenizer(), _clip_tokenizer()], clips, _t5_tokenizer(), t5, SD3_T5_LENGTH)


def _flux_text_encoders(length: int) -> Callable[[str], Any]:
    def make(device: str) -> Any:
        from lego_worker.flux import FluxTextEncoders

        clip, t5 = build("clip_l", device), build("t5_xxl_encoder", device)
        return FluxTextEncoders(_clip_tokenizer(), clip, _t5_tokenizer(), t5, length)

    return make


def _scheduler(family: str) -> Callable[[str], Any]:
    def make(device: str) -> Any:
        from lego_worker import presets, presets_flux, presets_sd3

        builders: dict[str, Callable[[], Any]] = {
            "sd15": presets.build_sd15_scheduler,
            "sdxl": presets.build_sdxl_scheduler,
            "sd3": presets_sd3.build_sd3_scheduler,
            "flux-dev": lambda: presets_flux.build_flux_scheduler(dev=True),
            "flux-schnell": lambda: presets_flux.build_flux_scheduler(dev=False),
        }
        return builders[family]()

    return make


def _model(architecture: str, **overrides: Any) -> Callable[[str], Any]:
    return lambda device: build(architecture, device, **overrides)


# source → component → builder(device)
SOURCES: dict[str, dict[str, Callable[[str], Any]]] = {
    REALSIZE_SD15: {
        "text_encoder": _sd15_text_encoder,
        "unet": _model("sd15_unet"),
        "vae": _model("sd15_vae"),
        "scheduler": _scheduler("sd15"),
    },
    REALSIZE_SDXL: {
        "text_encoders": _sdxl_text_encoders,
        "unet": _model("sdxl_unet"),
        "vae": _model("sdxl_vae"),
        "scheduler": _scheduler("sdxl"),
    },
    REALSIZE_SD3: {
        "text_encoders": _sd3_text_encoders,
        "transformer": _model("sd3_medium_transformer"),
        "vae": _model("sd3_vae"),
        "scheduler": _scheduler("sd3"),
    },
    REALSIZE_FLUX_DEV: {
        "text_encoders": _flux_text_encoders(FLUX_DEV_T5_LENGTH),
        "transformer": _model("flux1_dev_transformer"),
        "vae": _model("flux1_vae"),
        "scheduler": _scheduler("flux-dev"),
    },
    REALSIZE_FLUX_SCHNELL: {
        "text_encoders": _flux_text_encoders(FLUX_SCHNELL_T5_LENGTH),
        "transformer": _model("flux1_dev_transformer", guidance_embeds=False),
        "vae": _model("flux1_vae"),
        "scheduler": _scheduler("flux-schnell"),
    },
}


def load(source: str, component: str, device: str = "cpu") -> Any:
    """A component of a real-size source, its weights created on `device` ("meta": no memory)."""
    if source not in SOURCES:
        raise ValueError(f"unknown real-size source {source!r} (known: {sorted(SOURCES)})")
    if component not in SOURCES[source]:
        raise ValueError(f"{source} has no component {component!r} (known: {sorted(SOURCES[source])})")
    return SOURCES[source][component](device)


def t5_length(source: str) -> int | None:
    """The T5 sequence length a real-size source's pipeline uses (None: it has no T5)."""
    return {
        REALSIZE_SD3: SD3_T5_LENGTH,
        REALSIZE_FLUX_DEV: FLUX_DEV_T5_LENGTH,
        REALSIZE_FLUX_SCHNELL: FLUX_SCHNELL_T5_LENGTH,
    }.get(source)
