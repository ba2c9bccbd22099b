"""LegoDiffusion SDK: the workflow API, the IR and its passes, the cluster store and the client.

`import lego` never imports torch or diffusers: a client needs neither.
"""

from pathlib import Path

from lego import native

if native.requested():  # lego.graph compiled with mypyc, with the coordinator's core (scripts/build-native)
    native.prefer_native(__path__, __name__, Path(__file__).parent)

from lego.workflow import (  # after the compiled modules' path is set
    VAE,
    ControlNet,
    Handle,
    LoRA,
    NoiseScheduler,
    TextEncoder,
    Transformer,
    UNet,
    Workflow,
    denoise_loop,
    load_control_image,
    load_image,
)

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "ControlNet",
    "Handle",
    "LoRA",
    "NoiseScheduler",
    "TextEncoder",
    "Transformer",
    "UNet",
    "Workflow",
    "denoise_loop",
    "load_control_image",
    "load_image",
]
