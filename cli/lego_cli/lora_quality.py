"""What bounded asynchronous LoRA loading costs in image quality, measured with real tiny models.

The emulated cluster that measures the speed-up makes no pixels, so the quality figure comes from
the tiny SD 1.5 preset on the CPU with a LoRA made from a seed: the same prompt, seed and step
count three ways on a one-worker embedded cluster whose LoRA store is slow (every fetch takes
seconds, far longer than K tiny steps, so exactly the bound's K steps run without the LoRA, the
worst case it allows): synchronous loading (the reference), the loop's first K steps without the
LoRA, and no LoRA at all. Reported: the pixel MSE of each against the reference, and the share of
the LoRA's effect on the image that the late patch keeps (1 - late MSE / no-LoRA MSE).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from lego.builtin_workflows import sd15_txt2img
from lego.client import AsyncGatewayClient
from lego.grpc_server import channel
from lego.v1 import compiler_pb2_grpc
from lego.values import Scalar
from lego.workflow import LoRA
from lego_worker.agent import WorkerConfig
from lego_worker.presets import make_tiny_lora

from lego_cli.cluster import EmbeddedCluster

SLOW_STORE_S = 3.0
SIZE = 128
PROMPT: dict[str, Scalar] = {"prompt": "a yellow square", "negative_prompt": "", "seed": 7}


def pixels(png: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


async def _generate(lora: Path | None, steps: int, async_steps: int) -> tuple[np.ndarray, int]:
    """One image on a fresh cluster (its worker holds no LoRA yet) and its unpatched calls."""
    loras = [LoRA(str(lora))] if lora is not None else []
    spec = sd15_txt2img("quality", "tiny-sd15", default_size=SIZE, loras=loras, lora_async_steps=async_steps)
    async with EmbeddedCluster(workers=1, worker=WorkerConfig(lora_fetch_s=SLOW_STORE_S)) as cluster:
        async with channel(cluster.compiler_address) as chan:
            await compiler_pb2_grpc.CompilerStub(chan).RegisterWorkflow(spec)
        async with AsyncGatewayClient(cluster.gateway_address, timeout_s=600) as client:
            image = await client.generate("quality", {**PROMPT, "steps": steps})
    return pixels(image.png), image.unpatched_calls


async def measure(steps: int, bounds: list[int]) -> dict[str, Any]:
    """The figures for each bound K in `bounds` (each on its own fresh cluster)."""
    with tempfile.TemporaryDirectory() as directory:
        lora = make_tiny_lora(Path(directory) / "lora", seed=3)
        synchronous, _ = await _generate(lora, steps, 0)
        plain, _ = await _generate(None, steps, 0)
        late = {k: await _generate(lora, steps, k) for k in bounds}
    plain_mse = float(np.mean((plain - synchronous) ** 2))
    by_bound = []
    for k, (image, unpatched) in late.items():
        late_mse = float(np.mean((image - synchronous) ** 2))
        by_bound.append(
            {
                "async_steps": k,
                "unpatched_calls": unpatched,
                "pixel_mse_late_vs_sync": round(late_mse, 3),
                "lora_effect_kept": round(1 - late_mse / plain_mse, 4) if plain_mse else None,
            }
        )
    return {
        "model": "tiny-sd15 (CPU, random weights from a seed) with a tiny LoRA",
        "steps": steps,
        "pixel_mse_no_lora_vs_sync": round(plain_mse, 3),
        "by_async_steps": by_bound,
    }
