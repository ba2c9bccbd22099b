"""The `tiny-flux-dev` and `tiny-flux-schnell` presets: FLUX.1's architecture (CLIP-L for the pooled
embedding, T5 for the sequence, FluxTransformer2DModel, a 16-channel-style AutoencoderKL with a shift
factor, FlowMatchEulerDiscreteScheduler) at a tiny size, seeded weights, local tokenizers."""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxTransformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from lego_worker.presets import _BUILD_LOCK, build_tiny_tokenizer, tiny_clip_config

TINY_FLUX_DEV = "tiny-flux-dev"
TINY_FLUX_SCHNELL = "tiny-flux-schnell"
T5_MAX_LENGTH = 32  # the tiny presets' T5 sequence (FLUX.1 uses 512 for dev, 256 for schnell)
FLUX_LATENT_CHANNELS = 4  # FLUX.1 uses 16; packing 2x2 patches gives the transformer 4x this


@dataclass(frozen=True)
class FluxComponents:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    tokenizer_2: PreTrainedTokenizerFast
    text_encoder_2: T5EncoderModel
    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler
    max_sequence_length: int = T5_MAX_LENGTH


def build_tiny_t5_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level Unigram tokenizer in T5's layout: pad 0, eos 1, unk 2; appends </s>."""
    pieces = [*string.ascii_letters, *string.digits, *string.punctuation, "▁"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(piece, -1.0) for piece in pieces]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=T5_MAX_LENGTH,
    )


def build_tiny_t5(seed: int, vocab_size: int, d_model: int = 32) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def build_tiny_flux_vae(
    seed: int, scaling_factor: float = 0.3611, shift_factor: float = 0.1159
) -> AutoencoderKL:
    """A VAE with a shift factor and no quant convs, as FLUX.1's and SD3's are (4 latent channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=FLUX_LATENT_CHANNELS,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def build_flux_scheduler(dev: bool) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's (dynamic shifting) or FLUX.1-schnell's (fixed shift 1) configuration."""
    if dev:
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def build_tiny_flux(seed: int = 0, dev: bool = True) -> FluxComponents:
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    with _BUILD_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(tiny_clip_config(len(tokenizer))).eval()
        text_encoder_2 = build_tiny_t5(seed + 1, len(tokenizer_2))
        torch.manual_seed(seed + 2)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * FLUX_LATENT_CHANNELS,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5's d_model
            pooled_projection_dim=32,  # CLIP's hidden size
            guidance_embeds=dev,
            axes_dims_rope=(4, 6, 6),
        ).eval()
        return FluxComponents(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            tokenizer_2=tokenizer_2,
            text_encoder_2=text_encoder_2,
            transformer=transformer,
            vae=build_tiny_flux_vae(seed + 3),
            scheduler=build_flux_scheduler(dev),
        )


FLUX_CONTROLNETS = {"controlnet_canny": 20, "controlnet_depth": 21}  # component → seed offset


def build_tiny_flux_controlnet(component: str, seed: int = 0, dev: bool = True) -> FluxControlNetModel:
    """A FLUX.1 ControlNet (the InstantX layout: conditioned on the control image's VAE latents) for
    the tiny transformer; its zero-initialised projections get seeded weights so it steers."""
    if component not in FLUX_CONTROLNETS:
        raise ValueError(f"tiny-flux has no ControlNet {component!r} (known: {sorted(FLUX_CONTROLNETS)})")
    with _BUILD_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed + FLUX_CONTROLNETS[component])
        model = FluxControlNetModel(
            patch_size=1,
            in_channels=4 * FLUX_LATENT_CHANNELS,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=dev,
            axes_dims_rope=[4, 6, 6],
        )
        for linear in [
            *model.controlnet_blocks,
            *model.controlnet_single_blocks,
            model.controlnet_x_embedder,
        ]:
            torch.nn.init.normal_(linear.weight, std=0.1)
            torch.nn.init.normal_(linear.bias, std=0.1)
        return model.eval()


def build_tiny_flux_dev(seed: int = 0) -> FluxComponents:
    return build_tiny_flux(seed, dev=True)


def build_tiny_flux_schnell(seed: int = 0) -> FluxComponents:
    return build_tiny_flux(seed + 10, dev=False)
