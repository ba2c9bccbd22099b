"""Built-in ``tiny-*`` model presets: real diffusers/transformers architectures at a tiny size.

Weights are drawn deterministically from a seed and the tokenizer is built locally, so nothing is
ever downloaded. The same preset built twice (same torch version) gives bit-identical weights.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TINY_SD15 = "tiny-sd15"
TINY_SDXL = "tiny-sdxl"
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


def tiny_clip_config(vocab_size: int, hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=projection_dim,
    )


def build_tiny_text_encoder(seed: int, vocab_size: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(tiny_clip_config(vocab_size)).eval()


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


def build_tiny_controlnet(seed: int, sdxl: bool = False) -> ControlNetModel:
    """A ControlNet for tiny-sd15's (or tiny-sdxl's) UNet: the same down blocks, a conditioning
    embedding that brings the image (8x the latent size) down to the latents."""
    torch.manual_seed(seed)
    if sdxl:
        model = ControlNetModel(
            in_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_PROJECTION_DIM,
            cross_attention_dim=64,
            norm_num_groups=8,
            conditioning_embedding_out_channels=(8, 8, 16, 16),
        )
    else:
        model = ControlNetModel(
            in_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
            conditioning_embedding_out_channels=(8, 8, 16, 16),
        )
    # A new ControlNet's output convolutions start at zero (it adds nothing until trained): give
    # them seeded weights so the tiny ControlNet visibly steers the image.
    zero_convs = [
        *model.controlnet_down_blocks,
        model.controlnet_mid_block,
        model.controlnet_cond_embedding.conv_out,
    ]
    for conv in zero_convs:
        torch.nn.init.normal_(conv.weight, std=0.1)
        torch.nn.init.normal_(conv.bias, std=0.1)
    return model.eval()


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


@dataclass(frozen=True)
class SDXLComponents:
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: EulerDiscreteScheduler


SDXL_TIME_EMBED_DIM = 8
SDXL_PROJECTION_DIM = 32


def build_tiny_sdxl_unet(seed: int) -> UNet2DConditionModel:
    """SDXL's UNet architecture (text-time added conditioning, linear projections), tiny."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_PROJECTION_DIM,
        cross_attention_dim=64,  # CLIP-L's 32 + CLIP-G's 32, concatenated
        norm_num_groups=8,
    ).eval()


def build_sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base 1.0's own noise-scheduler configuration."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
        prediction_type="epsilon",
    )


def build_tiny_sdxl(seed: int = 0) -> SDXLComponents:
    tokenizer = build_tiny_tokenizer()
    with _BUILD_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(tiny_clip_config(len(tokenizer))).eval()
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_clip_config(len(tokenizer), projection_dim=SDXL_PROJECTION_DIM)
        ).eval()
        return SDXLComponents(
            tokenizer=tokenizer,
            tokenizer_2=build_tiny_tokenizer(),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            unet=build_tiny_sdxl_unet(seed + 2),
            vae=build_tiny_vae(seed + 3),
            scheduler=build_sdxl_scheduler(),
        )


# tiny-sd15's ControlNets (components of the preset, built on first use): name → seed offset
SD15_CONTROLNETS = {"controlnet_canny": 3, "controlnet_depth": 4}


def build_tiny_sd15_controlnet(component: str, seed: int = 0) -> ControlNetModel:
    if component not in SD15_CONTROLNETS:
        raise ValueError(f"tiny-sd15 has no ControlNet {component!r} (known: {sorted(SD15_CONTROLNETS)})")
    with _BUILD_LOCK, torch.random.fork_rng():
        return build_tiny_controlnet(seed + SD15_CONTROLNETS[component])


def build_tiny_sdxl_controlnet(component: str, seed: int = 0) -> ControlNetModel:
    if component not in SD15_CONTROLNETS:
        raise ValueError(f"tiny-sdxl has no ControlNet {component!r} (known: {sorted(SD15_CONTROLNETS)})")
    with _BUILD_LOCK, torch.random.fork_rng():
        return build_tiny_controlnet(seed + 10 + SD15_CONTROLNETS[component], sdxl=True)


def make_tiny_lora(directory: Path, seed: int = 0, rank: int = 4, preset: str = TINY_SD15) -> Path:
    """Write a LoRA for a tiny preset's denoiser (diffusers' format, random non-zero weights from
    `seed`): tiny-sd15 / tiny-sdxl UNets, tiny-sd3 / tiny-flux-* transformers."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from lego_worker.sources import PRESET_BUILDERS

    # the architecture of the preset's denoiser; its base weights are not saved
    parts = PRESET_BUILDERS[preset]()
    denoiser = getattr(parts, "unet", None) or parts.transformer
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    with _BUILD_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed)
        denoiser.add_adapter(config)
    directory.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(denoiser)
    if hasattr(parts, "unet"):
        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers)
    else:
        from diffusers import FluxPipeline

        FluxPipeline.save_lora_weights(directory, transformer_lora_layers=layers)
    return directory / "pytorch_lora_weights.safetensors"
