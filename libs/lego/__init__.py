"""LegoDiffusion SDK: the workflow API, the IR and its passes, the cluster store and the client.

`import lego` never imports torch or diffusers: a client needs neither.
"""

from lego.workflow import VAE, Handle, LoRA, NoiseScheduler, TextEncoder, UNet, Workflow, denoise_loop

__version__ = "0.1.0"

__all__ = ["VAE", "Handle", "LoRA", "NoiseScheduler", "TextEncoder", "UNet", "Workflow", "denoise_loop"]
