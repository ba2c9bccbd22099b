"""The `lego-shapes` preset: a tiny SD 1.5-architecture model trained on the shapes dataset.

The configurations are written here; the trained weights are the safetensors state dicts under
`weights/` (written by `scripts/train-demo-model`). The tokenizer is tiny-sd15's byte-level CLIP
tokenizer and the scheduler SD 1.5's own PNDM configuration.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from lego_worker import presets
from lego_worker.presets import SD15Components

LEGO_SHAPES = "lego-shapes"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHT_FILES = {"text_encoder": "text_encoder", "unet": "unet", "vae": "vae"}
HIDDEN = 64  # the text encoder's width = the UNet's cross-attention width


def text_encoder_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=presets.TOKENIZER_MAX_LENGTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=HIDDEN,
    )


def new_text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(text_encoder_config(vocab_size))


def new_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def new_vae(scaling_factor: float = 1.0) -> AutoencoderKL:
    """Four blocks (three downsamplings): the usual scale factor 8, 64x64 images to 8x8x4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _load(model: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)


def vae_scaling_factor(path: Path) -> float:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return float(metadata["scaling_factor"])


def build_lego_shapes(weights_dir: Path = WEIGHTS_DIR) -> SD15Components:
    """The preset's components from the committed weights (fp32 modules, eval mode)."""
    tokenizer = presets.build_tiny_tokenizer()
    with presets._BUILD_LOCK, torch.random.fork_rng():
        torch.manual_seed(0)  # construction draws initial weights; they are all overwritten
        text_encoder = new_text_encoder(len(tokenizer))
        unet = new_unet()
        vae_path = weights_dir / "vae.safetensors"
        vae = new_vae(vae_scaling_factor(vae_path))
    _load(text_encoder, weights_dir / "text_encoder.safetensors")
    _load(unet, weights_dir / "unet.safetensors")
    _load(vae, vae_path)
    return SD15Components(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        vae=vae.eval(),
        scheduler=presets.build_sd15_scheduler(),
    )
