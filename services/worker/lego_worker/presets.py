"""Built-in ``tiny-*`` model presets: real diffusers/transformers architectures at a tiny size.

Weights are drawn deterministically from a seed and the tokenizer is built locally, so nothing is
ever downloaded. The same preset built twice (same torch version) gives bit-identical weights.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_SD15 = "tiny-sd15"
TOKENIZER_MAX_LENGTH = 77
# Seeded construction uses torch's global RNG: two workers of one process must not interleave.
_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class SD15Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: PNDMScheduler


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer: every byte is a token, there are no merges."""
    chars = sorted(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKENIZER_MAX_LENGTH)


def build_tiny_text_encoder(seed: int, vocab_size: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config).eval()


def build_tiny_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def build_tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
    ).eval()


def build_sd15_scheduler() -> PNDMScheduler:
    """SD 1.5's own noise-scheduler configuration."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_sd15(seed: int = 0) -> SD15Components:
    tokenizer = build_tiny_tokenizer()
    with _BUILD_LOCK, torch.random.fork_rng():
        return SD15Components(
            tokenizer=tokenizer,
            text_encoder=build_tiny_text_encoder(seed, len(tokenizer)),
            unet=build_tiny_unet(seed + 1),
            vae=build_tiny_vae(seed + 2),
            scheduler=build_sd15_scheduler(),
        )


def make_tiny_lora(directory: Path, seed: int = 0, rank: int = 4) -> Path:
    """Write a LoRA for tiny-sd15's UNet (diffusers' format, random non-zero weights from `seed`)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet = build_tiny_unet(1)  # the architecture of tiny-sd15's UNet; its base weights are not saved
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    with _BUILD_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed)
        unet.add_adapter(config)
    directory.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=get_peft_model_state_dict(unet))
    return directory / "pytorch_lora_weights.safetensors"
