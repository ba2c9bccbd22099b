"""The `tiny-sd3` preset: Stable Diffusion 3's architecture (CLIP-L and CLIP-G with projections, T5,
SD3Transformer2DModel with 2x2 patches, a shifted AutoencoderKL, FlowMatchEulerDiscreteScheduler
with shift 3, SD3ControlNetModels) at a tiny size, seeded weights, local tokenizers. SD 3.5 has the
same layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3ControlNetModel,
    SD3Transformer2DModel,
)
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedTokenizerFast, T5EncoderModel

from lego_worker.presets import _BUILD_LOCK, build_tiny_tokenizer, tiny_clip_config
from lego_worker.presets_flux import (
    T5_MAX_LENGTH,
    build_tiny_flux_vae,
    build_tiny_t5,
    build_tiny_t5_tokenizer,
)

TINY_SD3 = "tiny-sd3"
CLIP_HIDDEN, CLIP_PROJECTION, T5_HIDDEN = 32, 32, 64  # CLIP-L + CLIP-G hidden states pad to T5's 64


@dataclass(frozen=True)
class SD3Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModelWithProjection
    tokenizer_2: CLIPTokenizer
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer_3: PreTrainedTokenizerFast
    text_encoder_3: T5EncoderModel
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler
    max_sequence_length: int = T5_MAX_LENGTH


_TRANSFORMER_CONFIG = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": T5_HIDDEN,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 2 * CLIP_PROJECTION,
    "out_channels": 4,
}
# component → (seed offset, force_zeros_for_pooled_projection): canny in InstantX's SD3 layout (zero
# pooled projections, control latents without the VAE shift), pose as SD3.5's (both used)
SD3_CONTROLNETS = {"controlnet_canny": (30, True), "controlnet_pose": (31, False)}


def build_sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """SD3 medium's and SD3.5's configuration."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def build_tiny_sd3(seed: int = 0) -> SD3Components:
    tokenizer, t5_tokenizer = build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    config = tiny_clip_config(len(tokenizer), hidden_size=CLIP_HIDDEN, projection_dim=CLIP_PROJECTION)
    with _BUILD_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed)
        clip_l = CLIPTextModelWithProjection(config).eval()
        torch.manual_seed(seed + 1)
        clip_g = CLIPTextModelWithProjection(config).eval()
        t5 = build_tiny_t5(seed + 2, len(t5_tokenizer), d_model=T5_HIDDEN)
        torch.manual_seed(seed + 3)
        # two layers: the last block of an SD3 transformer takes no ControlNet residual
        transformer = SD3Transformer2DModel(num_layers=2, **_TRANSFORMER_CONFIG).eval()
        return SD3Components(
            tokenizer=tokenizer,
            text_encoder=clip_l,
            tokenizer_2=build_tiny_tokenizer(),
            text_encoder_2=clip_g,
            tokenizer_3=t5_tokenizer,
            text_encoder_3=t5,
            transformer=transformer,
            vae=build_tiny_flux_vae(seed + 4, scaling_factor=1.5305, shift_factor=0.0609),
            scheduler=build_sd3_scheduler(),
        )


def build_tiny_sd3_controlnet(component: str, seed: int = 0) -> SD3ControlNetModel:
    """An SD3 ControlNet for the tiny transformer; its zero-initialised projections get seeded
    weights so it steers."""
    if component not in SD3_CONTROLNETS:
        raise ValueError(f"tiny-sd3 has no ControlNet {component!r} (known: {sorted(SD3_CONTROLNETS)})")
    offset, zero_pooled = SD3_CONTROLNETS[component]
    with _BUILD_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed + offset)
        model = SD3ControlNetModel(
            num_layers=1, force_zeros_for_pooled_projection=zero_pooled, **_TRANSFORMER_CONFIG
        )
        for linear in [*model.controlnet_blocks, model.pos_embed_input.proj]:
            torch.nn.init.normal_(linear.weight, std=0.1)
            torch.nn.init.normal_(linear.bias, std=0.1)
        return model.eval()
