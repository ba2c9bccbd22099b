"""The whole request path in one process: real gRPC servers on loopback, real tiny diffusers models."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego.grpc_server import channel
from lego.v1 import (
    common_pb2,
    coordinator_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from lego.values import Scalar, to_values
from lego_cli.cluster import EmbeddedCluster

from tests.pipeline_reference import decode_png, reference_image

SETTINGS: dict[str, Scalar] = {
    "prompt": "a red circle on a blue background",
    "negative_prompt": "blurry",
    "seed": 42,
    "steps": 8,
    "guidance_scale": 7.5,
}


async def generate(cluster: EmbeddedCluster, **inputs: Scalar) -> gateway_pb2.GenerateReply:
    async with channel(cluster.gateway_address) as chan:
        stub = gateway_pb2_grpc.GatewayStub(chan)
        reply: gateway_pb2.GenerateReply = await stub.Generate(
            gateway_pb2.GenerateRequest(workflow=TINY_SD15_TXT2IMG, inputs=to_values(inputs))
        )
        return reply


def expected() -> np.ndarray:
    return reference_image(
        str(SETTINGS["prompt"]),
        str(SETTINGS["negative_prompt"]),
        int(SETTINGS["seed"]),
        int(SETTINGS["steps"]),
        float(SETTINGS["guidance_scale"]),
    )


async def test_batched_cfg_branches_give_the_pipelines_image_exactly() -> None:
    async with EmbeddedCluster(workers=1) as cluster:
        reply = await generate(cluster, **SETTINGS)
    image = decode_png(reply.png)
    assert image.shape == (128, 128, 3)
    assert reply.nodes_executed == 3 * (8 + 1) + 4  # PNDM runs steps + 1 iterations
    assert np.array_equal(image, expected())


async def test_split_cfg_branches_differ_by_at_most_one_level_on_a_handful_of_pixels() -> None:
    async with EmbeddedCluster(workers=2) as cluster:  # idle workers: the branches run side by side
        for worker in (s for s in cluster.services if type(s).__name__ == "WorkerService"):
            async with channel(worker.address) as chan:  # both hold the UNet: neither has to load it
                await worker_pb2_grpc.WorkerStub(chan).LoadModel(
                    worker_pb2.ModelRequest(model="tiny-sd15:unet")
                )
        reply = await generate(cluster, **SETTINGS)
        async with channel(cluster.coordinator_address) as chan:
            status = await coordinator_pb2_grpc.CoordinatorStub(chan).ClusterStatus(common_pb2.Empty())
    # the two branches of a step were ready together and ran as separate calls on both workers
    assert all("tiny-sd15:unet" in worker.loaded_models for worker in status.workers)
    image = decode_png(reply.png).astype(int)
    reference = expected().astype(int)
    difference = np.abs(image - reference)
    assert difference.max() <= 1
    assert np.count_nonzero(difference) <= 0.01 * difference.size  # a handful, not a pattern


async def test_cfg_off_matches_the_pipeline_too() -> None:
    settings = {**SETTINGS, "guidance_scale": 1.0, "steps": 3}
    async with EmbeddedCluster(workers=1) as cluster:
        reply = await generate(cluster, **settings)
    assert reply.nodes_executed == 2 * (3 + 1) + 3
    reference = reference_image(str(settings["prompt"]), "blurry", 42, 3, 1.0)
    assert np.array_equal(decode_png(reply.png), reference)


async def test_two_workers_and_concurrent_requests_all_complete() -> None:
    import asyncio

    async with EmbeddedCluster(workers=2) as cluster:
        replies = await asyncio.gather(
            *(generate(cluster, prompt=f"shape {i}", steps=4, seed=i) for i in range(4))
        )
        async with channel(cluster.coordinator_address) as chan:
            status = await coordinator_pb2_grpc.CoordinatorStub(chan).ClusterStatus(common_pb2.Empty())
    assert len({r.request_id for r in replies}) == 4
    assert all(decode_png(r.png).shape == (128, 128, 3) for r in replies)
    assert len(status.workers) == 2
    assert status.requests_in_flight == 0


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ({"prompt": ""}, "prompt must not be empty"),
        (
            {"prompt": "x", "height": 3000},
            "height must be an integer and a multiple of 8 and ≥ 8 and ≤ 2048, got 3000",
        ),
        ({"prompt": "x", "width": 130}, "width must be"),
        ({"prompt": "x", "steps": 0}, "steps must be an integer and ≥ 1 and ≤ 200, got 0"),
        ({"prompt": "x", "steps": 500}, "≤ 200, got 500"),
        ({"prompt": "x", "guidance_scale": -2.0}, "guidance_scale must be a number and ≥ 0"),
    ],
)
async def test_bad_input_is_invalid_argument_and_the_cluster_keeps_serving(
    inputs: dict[str, Scalar], fragment: str
) -> None:
    async with EmbeddedCluster(workers=1) as cluster:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(cluster, **inputs)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in (caught.value.details() or "")
        reply = await generate(cluster, prompt="still serving", steps=2)
        assert reply.png.startswith(b"\x89PNG")


async def test_unknown_workflow_is_not_found() -> None:
    async with EmbeddedCluster(workers=1) as cluster, channel(cluster.gateway_address) as chan:
        stub = gateway_pb2_grpc.GatewayStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(
                gateway_pb2.GenerateRequest(workflow="nope", inputs=to_values({"prompt": "x"}))
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown workflow 'nope'" in (caught.value.details() or "")
        assert TINY_SD15_TXT2IMG in (caught.value.details() or "")


async def test_every_service_answers_the_standard_health_check() -> None:
    async with EmbeddedCluster(workers=1) as cluster:
        for service in cluster.services:
            async with channel(service.address) as chan:
                reply = await health_pb2_grpc.HealthStub(chan).Check(
                    health_pb2.HealthCheckRequest(service="")
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_tensors_of_an_answered_request_are_freed() -> None:
    from lego.v1 import dataengine_pb2_grpc

    async with EmbeddedCluster(workers=1) as cluster:
        await generate(cluster, prompt="gc", steps=3)
        engine = cluster.services[0]
        async with channel(engine.address) as chan:
            stub = dataengine_pb2_grpc.DataEngineStub(chan)
            for _ in range(100):  # the gateway releases in the background, after answering
                stats = await stub.Stats(common_pb2.Empty())
                if stats.tensors == 0:
                    break
                await asyncio.sleep(0.05)
    assert stats.tensors == 0
    assert stats.bytes_stored == 0
