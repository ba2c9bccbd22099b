"""Bounded asynchronous LoRA loading on a live cluster with real tiny models: a worker whose LoRA
store is slow (every fetch takes seconds) runs a loop's first K steps without the LoRA while it
loads, then waits for it; with K = 0 it waits from the first step, and the image equals
synchronous loading (diffusers' own LoRA loading) exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lego.builtin_workflows import sd15_txt2img
from lego.grpc_server import channel
from lego.v1 import gateway_pb2, gateway_pb2_grpc
from lego.values import Scalar, to_values
from lego.workflow import LoRA
from lego_cli.cluster import EmbeddedCluster
from lego_worker.agent import WorkerConfig
from lego_worker.presets import make_tiny_lora

from tests.integration.test_worker_runtime import register
from tests.pipeline_reference import decode_png, reference_image

STEPS = 4
SETTINGS: dict[str, Scalar] = {"prompt": "a yellow square", "negative_prompt": "", "seed": 7, "steps": STEPS}
SLOW_STORE_S = 3.0  # far longer than the tiny UNet's steps (tens of ms): the first K all miss it
BRANCHES = 2  # CFG: a conditional and an unconditional UNet call per step


async def generate(
    cluster: EmbeddedCluster, workflow: str, settings: dict[str, Scalar] = SETTINGS
) -> gateway_pb2.GenerateReply:
    async with channel(cluster.gateway_address) as chan:
        reply: gateway_pb2.GenerateReply = await gateway_pb2_grpc.GatewayStub(chan).Generate(
            gateway_pb2.GenerateRequest(workflow=workflow, inputs=to_values(settings))
        )
        return reply


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


async def test_k_steps_run_while_the_lora_loads_and_k_zero_equals_synchronous_loading(tmp_path: Path) -> None:
    lora = make_tiny_lora(tmp_path / "lora", seed=3)
    with_lora = reference_image(str(SETTINGS["prompt"]), "", 7, STEPS, 7.5, lora_dir=tmp_path / "lora")
    without = reference_image(str(SETTINGS["prompt"]), "", 7, STEPS, 7.5)
    worker = WorkerConfig(lora_fetch_s=SLOW_STORE_S)
    patch = [LoRA(str(lora), 1.0)]

    async with EmbeddedCluster(workers=1, worker=worker) as cluster:
        await register(cluster, sd15_txt2img("sync", "tiny-sd15", default_size=128, loras=patch))
        synchronous = await generate(cluster, "sync")
    async with EmbeddedCluster(workers=1, worker=worker) as cluster:  # the LoRA is not held again
        await register(
            cluster, sd15_txt2img("async", "tiny-sd15", default_size=128, loras=patch, lora_async_steps=2)
        )
        late = await generate(cluster, "async")
        held = await generate(cluster, "async")  # now the worker holds it: nothing runs without

    assert synchronous.unpatched_calls == 0
    assert np.array_equal(decode_png(synchronous.png), with_lora)
    assert late.unpatched_calls == 2 * BRANCHES  # exactly the bound: the load outlasts K steps
    late_image = decode_png(late.png)
    assert not np.array_equal(late_image, with_lora)
    # applied late, the LoRA still moves the image most of the way from the unpatched one
    assert mse(late_image, with_lora) < mse(without, with_lora)
    assert held.unpatched_calls == 0
    assert np.array_equal(decode_png(held.png), with_lora)
