"""Train the `lego-shapes` preset (run by `scripts/train-demo-model`): fixed seeds, CPU, one thread.

1. the VAE (AutoencoderKL, scale factor 8) on training images: reconstruction + a small KL term;
2. freeze it, encode the training set, set the VAE's scaling factor to 1 / (the latents' std);
   then train the decoder alone on those (fixed) latents for sharper edges;
3. the text encoder + UNet jointly with SD's epsilon-prediction DDPM loss (SD 1.5's noise schedule),
   the caption dropped 10% of the time (the empty prompt) for classifier-free guidance; an EMA of
   the weights is what is saved;
4. sample the held-out combinations with diffusers' StableDiffusionPipeline and score them with the
   fidelity checker.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from lego.builtin_workflows import LEGO_SHAPES_GUIDANCE
from safetensors.torch import save_file

from lego_worker import presets
from lego_worker.shapes import dataset, fidelity, model

SEED = 1234
CAPTION_DROPOUT = 0.1


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(images: np.ndarray, steps: int, batch: int, lr: float) -> Any:
    torch.manual_seed(SEED)
    vae = model.new_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(SEED)
    start = time.time()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:  # cosine decay to 10%
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = to_tensor(images[rng.integers(0, len(images), size=batch)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss_rec = torch.nn.functional.mse_loss(recon, x) + 0.5 * (recon - x).abs().mean()
        loss = loss_rec + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            log(f"vae step {step}/{steps} recon {loss_rec.item():.4f} ({time.time() - start:.0f}s)")
    return vae.eval().requires_grad_(False)


def finetune_decoder(vae: Any, images: np.ndarray, latents: torch.Tensor, steps: int, batch: int) -> Any:
    """The decoder alone on the frozen encoder's latents (unscaled): the latents do not change."""
    torch.manual_seed(SEED + 3)
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for param in params:
        param.requires_grad_(True)
    lr = 1e-3
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(SEED + 3)
    start = time.time()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        pick = rng.integers(0, len(images), size=batch)
        x = to_tensor(images[pick])
        recon = vae.decode(latents[torch.from_numpy(pick)]).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 0.5 * (recon - x).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            log(f"decoder step {step}/{steps} recon {loss.item():.4f} ({time.time() - start:.0f}s)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(vae: Any, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    return torch.cat(
        [vae.encode(to_tensor(images[i : i + batch])).latent_dist.mean for i in range(0, len(images), batch)]
    )


def train_diffusion(
    latents: torch.Tensor, combos: list[dataset.Combo], steps: int, batch: int, lr: float, out: Path, vae: Any
) -> tuple[Any, Any]:
    tokenizer = presets.build_tiny_tokenizer()
    torch.manual_seed(SEED + 1)
    text_encoder = model.new_text_encoder(len(tokenizer))
    unet = model.new_unet()
    ema_te = model.new_text_encoder(len(tokenizer)).requires_grad_(False)
    ema_unet = model.new_unet().requires_grad_(False)
    ema_te.load_state_dict(text_encoder.state_dict())
    ema_unet.load_state_dict(unet.state_dict())
    captions = sorted({combo.caption for combo in combos})
    index = {caption: i + 1 for i, caption in enumerate(captions)}  # 0: the empty prompt
    ids = tokenizer(
        ["", *captions], padding="max_length", max_length=presets.TOKENIZER_MAX_LENGTH, return_tensors="pt"
    ).input_ids
    labels = torch.tensor([index[combo.caption] for combo in combos])
    noise_scheduler = DDPMScheduler.from_config(presets.build_sd15_scheduler().config)
    alphas = noise_scheduler.alphas_cumprod
    params = [*text_encoder.parameters(), *unet.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(SEED + 2)
    ema_params = [*ema_te.parameters(), *ema_unet.parameters()]
    start = time.time()
    running = 0.0
    for step in range(1, steps + 1):
        warm = min(1.0, step / 200)
        for group in optimizer.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        pick = torch.randint(0, len(latents), (batch,), generator=generator)
        x0 = latents[pick]
        label = labels[pick]
        drop = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
        label = torch.where(drop, torch.zeros_like(label), label)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        embeds = text_encoder(ids[label])[0]
        predicted = unet(noisy, t, embeds).sample
        loss = torch.nn.functional.mse_loss(predicted, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in zip(ema_params, params, strict=True):
                ema.lerp_(live, 1 - decay)
        running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps:
            log(f"diffusion step {step}/{steps} loss {running:.4f} ({time.time() - start:.0f}s)")
        if step % 1000 == 0 and step != steps:
            save_weights(out, ema_te, ema_unet, vae)
    return ema_te.eval(), ema_unet.eval()


def save_weights(out: Path, text_encoder: Any, unet: Any, vae: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, module in (("text_encoder", text_encoder), ("unet", unet)):
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(out / f"{name}.safetensors"))
    vae_state = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    metadata = {"scaling_factor": repr(float(vae.config.scaling_factor))}
    save_file(vae_state, str(out / "vae.safetensors"), metadata=metadata)
    log(f"saved weights to {out}")


def pipeline(parts: presets.SD15Components) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=parts.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], steps: int, guidance: float
) -> np.ndarray:
    """uint8 NHWC images, one per prompt, each with its own seeded generator (as the cluster does)."""
    images = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        out = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=dataset.IMAGE_SIZE,
            width=dataset.IMAGE_SIZE,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images
        images.append((out[0] * 255).round().astype("uint8"))
    return np.stack(images)


def evaluate(
    weights: Path, per_combo: int, steps: int, guidance: float, seed_base: int = 1000, held_out: bool = True
) -> dict[str, Any]:
    """Fidelity of `per_combo` samples of each held-out (or each training) combination."""
    pipe = pipeline(model.build_lego_shapes(weights))
    chosen = dataset.HELD_OUT if held_out else dataset.train_combos()
    combos = [combo for combo in chosen for _ in range(per_combo)]
    seeds = list(range(seed_base, seed_base + len(combos)))
    images = generate(pipe, [c.caption for c in combos], seeds, steps, guidance)
    scores = [fidelity.score(image, combo) for image, combo in zip(images, combos, strict=True)]
    return {"n": len(combos), "steps": steps, "guidance_scale": guidance, **fidelity.rates(scores)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=model.WEIGHTS_DIR)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--decoder-steps", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-per-combo", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.time()
    images, combos = dataset.make_dataset(dataset.train_combos(), args.images, SEED)
    log(f"dataset: {len(images)} images of {len(dataset.train_combos())} combinations")
    checked = fidelity.rates([fidelity.score(i, c) for i, c in zip(images[:500], combos[:500], strict=True)])
    log(f"fidelity checker on dataset images: {checked}")
    vae = train_vae(images, args.vae_steps, args.vae_batch, 2e-3)
    latents = encode(vae, images)
    scale = 1.0 / float(latents.std())
    vae.register_to_config(scaling_factor=scale)
    vae = finetune_decoder(vae, images, latents, args.decoder_steps, args.vae_batch)
    latents = latents * scale
    log(f"latents {tuple(latents.shape)}, scaling factor {scale:.4f}")
    text_encoder, unet = train_diffusion(latents, combos, args.steps, args.batch, args.lr, args.out, vae)
    save_weights(args.out, text_encoder, unet, vae)
    trained = time.time() - began
    log(f"training took {trained:.0f}s; held-out fidelity (20 steps):")
    for guidance in (LEGO_SHAPES_GUIDANCE, 7.5):
        log(json.dumps(evaluate(args.out, args.eval_per_combo, 20, guidance)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
