"""Partial outputs, measured: one step of an SD3 ControlNet workflow, the ControlNet and the
transformer each on a "device" of its own (one CPU core each: torch runs single-threaded here), three
ways. `sequential`: both on one device, one after the other. `beside_whole`: the transformer starts
beside its ControlNet but waits for the whole residuals (what deferred inputs alone give).
`beside_streamed`: the ControlNet's block samples go through a real data engine part by part while it
runs, and the transformer's blocks consume them as they arrive (lego_worker.parts).

The models are random SD3 blocks at a width where compute, not Python, dominates on a CPU: a
transformer of 12 blocks and a ControlNet of 4 (each sample feeds 3 blocks), about the ratio of SD3
medium's 24 blocks to a ControlNet of 6-8.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import numpy as np
import torch
from diffusers import SD3ControlNetModel, SD3Transformer2DModel
from lego.dataplane import DataPlane
from lego.v1 import common_pb2, dataengine_pb2
from lego_dataengine.service import serve
from lego_worker.parts import ArrivingParts, PartPublisher, receive
from lego_worker.sd3 import controlnet_residuals_sd3, transformer_denoise_sd3

TRANSFORMER_LAYERS, CONTROLNET_LAYERS = 12, 4
WIDTH = 256  # 8 heads x 32
CONFIG = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 8,
    "joint_attention_dim": WIDTH,
    "caption_projection_dim": WIDTH,
    "pooled_projection_dim": WIDTH,
    "out_channels": 4,
}
CPU = torch.device("cpu")
MODES = ("sequential", "beside_whole", "beside_streamed")
Models = tuple[SD3Transformer2DModel, SD3ControlNetModel]


def _models() -> Models:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(num_layers=TRANSFORMER_LAYERS, **CONFIG).eval()
        torch.manual_seed(1)
        controlnet = SD3ControlNetModel(
            num_layers=CONTROLNET_LAYERS, force_zeros_for_pooled_projection=False, **CONFIG
        ).eval()
        for linear in controlnet.controlnet_blocks:
            torch.nn.init.normal_(linear.weight, std=0.02)
    return transformer, controlnet


def _inputs() -> tuple[dict[str, Any], dict[str, Any]]:
    """The ControlNet's item and the transformer's (block samples still to add)."""
    rng = np.random.default_rng(0)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    common = {
        "sample": normal(1, 4, 64, 64),
        "timestep": np.array(700.0, np.float32),
        "encoder_hidden_states": normal(1, 77, WIDTH),
        "pooled_embeds": normal(1, WIDTH),
    }
    control = {
        "control_samples": normal(1, 4, 64, 64),
        "control_row": 0,
        "control_scaling": np.array([[1.0, 0.0, 1.0]]),
        "conditioning_scale": 0.8,
    }
    return {**common, **control}, common


async def _step(mode: str, models: Models, data: DataPlane, request: str) -> tuple[float, np.ndarray]:
    """One ControlNet + transformer call pair; returns seconds and the noise prediction."""
    transformer, controlnet = models
    control_item, item = _inputs()
    tensor_id = f"{request}/controlnet/block_samples"
    pending = common_pb2.TensorHandle(tensor_id=tensor_id)

    def denoise(samples: Any) -> np.ndarray:
        [output] = transformer_denoise_sd3(transformer, [{**item, "block_samples": samples}], CPU)
        return output["noise_pred"]

    def residuals(sink: Any = None) -> np.ndarray:
        return controlnet_residuals_sd3(controlnet, [control_item], CPU, sink)[0]["block_samples"]

    started = time.perf_counter()
    if mode == "sequential":
        noise = await asyncio.to_thread(lambda: denoise(residuals()))
    elif mode == "beside_whole":

        async def produce() -> None:
            await data.put(tensor_id, await asyncio.to_thread(residuals))

        async def consume() -> np.ndarray:
            whole = await data.get(pending)
            return await asyncio.to_thread(denoise, whole)

        _, noise = await asyncio.gather(produce(), consume())
    else:
        publisher = PartPublisher(data, [{"block_samples": tensor_id}])

        async def produce() -> None:
            samples = await asyncio.to_thread(residuals, publisher)
            await publisher.close()
            await data.put(tensor_id, samples)

        async def consume() -> np.ndarray:
            arriving = ArrivingParts(tensor_id)
            receiver = asyncio.create_task(receive(data, pending, arriving))
            try:
                return await asyncio.to_thread(denoise, arriving)
            finally:
                receiver.cancel()

        _, noise = await asyncio.gather(produce(), consume())
    seconds = time.perf_counter() - started
    await data._stub.Free(dataengine_pb2.FreeRequest(request_id=request))
    return seconds, np.array(noise)


async def _measure(repeats: int) -> dict[str, Any]:
    models = _models()
    engine = await serve(None, arena_mib=64)
    data = DataPlane(engine.address)
    try:
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        noises: dict[str, np.ndarray] = {}
        for index in range(repeats + 1):  # the first round warms up
            for mode in MODES:
                elapsed, noises[mode] = await _step(mode, models, data, f"{mode}-{index}")
                if index:
                    seconds[mode].append(elapsed)
    finally:
        data.close()
        await engine.stop()
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    return {
        "transformer_layers": TRANSFORMER_LAYERS,
        "controlnet_layers": CONTROLNET_LAYERS,
        **{f"{mode}_s": round(value, 4) for mode, value in median.items()},
        "streamed_vs_whole_speedup": round(median["beside_whole"] / median["beside_streamed"], 3),
        "streamed_vs_sequential_speedup": round(median["sequential"] / median["beside_streamed"], 3),
        "identical_outputs": all(np.array_equal(noises["sequential"], noise) for noise in noises.values()),
    }


def partial_outputs(repeats: int) -> dict[str, Any]:
    """The figures of `lego bench worker`'s `partial_outputs` key (one torch thread per device)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return asyncio.run(_measure(repeats))
    finally:
        torch.set_num_threads(before)
