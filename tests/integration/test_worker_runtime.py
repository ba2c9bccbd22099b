"""The worker runtime through the whole cluster: LoRA switching on a shared model, sharing across
workflows, LRU eviction under a memory budget, explicit model RPCs, and the emulated backend."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from lego.builtin_workflows import TINY_SD15_TXT2IMG, sd15_txt2img
from lego.grpc_server import channel
from lego.v1 import common_pb2, compiler_pb2_grpc, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from lego.values import Scalar, to_values
from lego.workflow import LoRA
from lego_cli.cluster import EmbeddedCluster
from lego_worker.agent import WorkerConfig
from lego_worker.presets import make_tiny_lora

from tests.pipeline_reference import decode_png, reference_image

SETTINGS: dict[str, Scalar] = {"prompt": "a yellow square", "negative_prompt": "", "seed": 7, "steps": 4}


async def generate(cluster: EmbeddedCluster, workflow: str, **inputs: Scalar) -> np.ndarray:
    async with channel(cluster.gateway_address) as chan:
        reply = await gateway_pb2_grpc.GatewayStub(chan).Generate(
            gateway_pb2.GenerateRequest(workflow=workflow, inputs=to_values(inputs))
        )
    return decode_png(reply.png)


async def register(cluster: EmbeddedCluster, spec) -> None:  # type: ignore[no-untyped-def]
    async with channel(cluster.compiler_address) as chan:
        await compiler_pb2_grpc.CompilerStub(chan).RegisterWorkflow(spec)


async def worker_status(cluster: EmbeddedCluster, index: int = 0) -> worker_pb2.WorkerStatusReply:
    workers = [s for s in cluster.services if type(s).__name__ == "WorkerService"]
    async with channel(workers[index].address) as chan:
        status: worker_pb2.WorkerStatusReply = await worker_pb2_grpc.WorkerStub(chan).GetStatus(
            common_pb2.Empty()
        )
        return status


async def test_lora_switches_on_and_off_on_one_shared_unet_exactly_as_diffusers(tmp_path: Path) -> None:
    lora_file = make_tiny_lora(tmp_path / "lora", seed=3)
    with_lora = reference_image(str(SETTINGS["prompt"]), "", 7, 4, 7.5, lora_dir=tmp_path / "lora")
    without = reference_image(str(SETTINGS["prompt"]), "", 7, 4, 7.5)
    assert not np.array_equal(with_lora, without), "the LoRA must change the image for this test to mean much"

    async with EmbeddedCluster(workers=1) as cluster:
        await register(
            cluster,
            sd15_txt2img("tiny-sd15-lora", "tiny-sd15", default_size=128, loras=[LoRA(str(lora_file), 1.0)]),
        )
        first = await generate(cluster, "tiny-sd15-lora", **SETTINGS)
        plain = await generate(cluster, TINY_SD15_TXT2IMG, **SETTINGS)
        again = await generate(cluster, "tiny-sd15-lora", **SETTINGS)
        status = await worker_status(cluster)
    assert np.array_equal(first, with_lora)
    assert np.array_equal(plain, without)  # the patch came off the shared copy exactly
    assert np.array_equal(again, with_lora)
    assert (
        list(status.loaded_models).count("tiny-sd15:unet") == 1 and status.loads == 4
    )  # one copy of each model


async def test_two_workflows_share_one_copy_of_each_common_model(tmp_path: Path) -> None:
    lora_file = make_tiny_lora(tmp_path / "lora", seed=5)
    async with EmbeddedCluster(workers=1) as cluster:
        await register(
            cluster, sd15_txt2img("wf-b", "tiny-sd15", default_size=128, loras=[LoRA(str(lora_file))])
        )
        await generate(cluster, TINY_SD15_TXT2IMG, prompt="one", steps=2)
        await generate(cluster, "wf-b", prompt="two", steps=2)
        shared = await worker_status(cluster)
    assert shared.loads == 4  # text encoder, unet, vae, scheduler: loaded once, used by both workflows
    assert sorted(shared.loaded_models) == sorted(
        f"tiny-sd15:{c}" for c in ("text_encoder", "unet", "vae", "scheduler")
    )


async def test_lru_eviction_under_a_memory_budget_keeps_serving() -> None:
    budget = 4_000_000  # bytes: the UNet (3.2 MB) fits beside the text encoder, not beside the VAE (1.3 MB)
    async with EmbeddedCluster(workers=1, worker=WorkerConfig(memory_bytes=budget)) as cluster:
        image = await generate(cluster, TINY_SD15_TXT2IMG, **SETTINGS)
        status = await worker_status(cluster)
    assert np.array_equal(image, reference_image(str(SETTINGS["prompt"]), "", 7, 4, 7.5))
    assert status.evictions > 0
    assert status.memory_used_bytes <= budget == status.memory_budget_bytes


async def test_explicit_prefetch_load_and_unload_rpcs() -> None:
    async with EmbeddedCluster(workers=1) as cluster:
        workers = [s for s in cluster.services if type(s).__name__ == "WorkerService"]
        async with channel(workers[0].address) as chan:
            stub = worker_pb2_grpc.WorkerStub(chan)
            await stub.PrefetchModel(worker_pb2.ModelRequest(model="tiny-sd15:vae"))
            status = await stub.GetStatus(common_pb2.Empty())
            assert "tiny-sd15:vae" in status.host_models and "tiny-sd15:vae" not in status.loaded_models
            await stub.LoadModel(worker_pb2.ModelRequest(model="tiny-sd15:vae"))
            assert "tiny-sd15:vae" in (await stub.GetStatus(common_pb2.Empty())).loaded_models
            await stub.UnloadModel(worker_pb2.ModelRequest(model="tiny-sd15:vae"))
            assert "tiny-sd15:vae" not in (await stub.GetStatus(common_pb2.Empty())).loaded_models
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.LoadModel(worker_pb2.ModelRequest(model="tiny-nope:vae"))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unknown preset 'tiny-nope'" in (caught.value.details() or "")


async def test_emulated_workers_serve_the_same_workflow_with_profiled_timing() -> None:
    config = WorkerConfig(backend="emulated", time_scale=50)
    async with EmbeddedCluster(workers=2, worker=config) as cluster:
        image = await generate(cluster, TINY_SD15_TXT2IMG, prompt="emulated", steps=4)
        status = await worker_status(cluster, 0)
    assert image.shape == (128, 128, 3)
    assert status.backend == "emulated"
    assert status.memory_budget_bytes == 80 * 10**9
