"""LegoDiffusion SDK: the workflow API, the IR and its passes, the cluster store and the client.

`import lego` never imports torch or diffusers: a client needs neither.
"""

from lego.workflow import (
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
