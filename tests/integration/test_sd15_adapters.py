"""SD 1.5 ControlNet and img2img through the whole cluster, against diffusers' own pipelines with the
same tiny weights: identical 8-bit pixels when the CFG branches are batched as the pipeline batches
them; within one level on a handful of pixels when they are split over two workers."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline
from lego.builtin_workflows import sd15_controlnet, sd15_img2img
from lego.data_uri import decode_image, encode_data_uri
from lego.grpc_server import channel
from lego.v1 import (
    common_pb2,
    compiler_pb2,
    compiler_pb2_grpc,
    coordinator_pb2,
    coordinator_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
)
from lego.values import Scalar, to_values
from lego_cli.cluster import EmbeddedCluster
from lego_worker.presets import build_tiny_sd15, build_tiny_sd15_controlnet

from tests.pipeline_reference import decode_png

SIZE = 64
SETTINGS: dict[str, Scalar] = {
    "prompt": "a house by a lake",
    "negative_prompt": "blurry",
    "seed": 7,
    "steps": 3,
    "guidance_scale": 6.0,
    "height": SIZE,
    "width": SIZE,
}


def pattern(size: int, seed: int) -> np.ndarray:
    """A canny-like conditioning picture: white edges of a few rectangles on black."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    for _ in range(4):
        top, left = rng.integers(0, size - 8, size=2)
        pixels[top : top + 8, left, :] = 255
        pixels[top, left : left + 8, :] = 255
    return pixels + rng.integers(0, 30, size=pixels.shape, dtype=np.uint8)


async def run(
    spec: compiler_pb2.WorkflowSpec, inputs: dict[str, Scalar], workers: int = 1
) -> tuple[np.ndarray, gateway_pb2.GenerateReply, coordinator_pb2.ClusterStatusReply]:
    async with EmbeddedCluster(workers=workers) as cluster:
        async with channel(cluster.compiler_address) as chan:
            await compiler_pb2_grpc.CompilerStub(chan).RegisterWorkflow(spec)
        async with channel(cluster.gateway_address) as chan:
            reply = await gateway_pb2_grpc.GatewayStub(chan).Generate(
                gateway_pb2.GenerateRequest(workflow=spec.name, inputs=to_values(inputs))
            )
        async with channel(cluster.coordinator_address) as chan:
            status = await coordinator_pb2_grpc.CoordinatorStub(chan).ClusterStatus(common_pb2.Empty())
    return decode_png(reply.png), reply, status


def _pipeline_kwargs(steps: int) -> dict[str, object]:
    return {
        "prompt": SETTINGS["prompt"],
        "negative_prompt": SETTINGS["negative_prompt"],
        "num_inference_steps": steps,
        "guidance_scale": SETTINGS["guidance_scale"],
        "generator": torch.Generator().manual_seed(int(SETTINGS["seed"])),
        "output_type": "np",
    }


def _components() -> dict[str, object]:
    parts = build_tiny_sd15(0)
    return {
        "vae": parts.vae,
        "text_encoder": parts.text_encoder,
        "tokenizer": parts.tokenizer,
        "unet": parts.unet,
        "scheduler": parts.scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def controlnet_reference(control: str, scale: float) -> np.ndarray:
    pipe = StableDiffusionControlNetPipeline(
        **_components(), controlnet=build_tiny_sd15_controlnet("controlnet_canny", 0)
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        image=decode_image(control),
        height=SIZE,
        width=SIZE,
        controlnet_conditioning_scale=scale,
        **_pipeline_kwargs(int(SETTINGS["steps"])),
    ).images
    return (images[0] * 255).round().astype("uint8")


def img2img_reference(image: str, strength: float, steps: int) -> np.ndarray:
    pipe = StableDiffusionImg2ImgPipeline(**_components())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(image=decode_image(image), strength=strength, **_pipeline_kwargs(steps)).images
    return (images[0] * 255).round().astype("uint8")


CONTROL = encode_data_uri(pattern(96, 1))  # resized to the request's 64x64 like the pipeline does


async def test_controlnet_gives_the_pipelines_image_exactly_and_runs_a_node_per_step_and_branch() -> None:
    spec = sd15_controlnet("cn", "tiny-sd15", default_size=SIZE)
    inputs = {**SETTINGS, "control_image": CONTROL, "controlnet_scale": 0.8}
    image, reply, _ = await run(spec, inputs)
    iterations = int(SETTINGS["steps"]) + 1
    # image + 2 encodes + init + per iteration (2 ControlNets, 2 denoisers, 1 scheduler step) + decode
    assert reply.nodes_executed == 1 + 2 + 1 + 5 * iterations + 1
    reference = controlnet_reference(CONTROL, 0.8)
    assert np.array_equal(image, reference)
    # the ControlNet changes the picture (the test can fail if the adapter is ignored)
    plain, _, _ = await run(spec, {**inputs, "controlnet_scale": 0.0})
    assert not np.array_equal(plain, reference)


async def test_controlnet_on_two_workers_stays_within_one_level() -> None:
    """Two workers: the scheduler may split the branches (and the ControlNet from its denoiser)."""
    spec = sd15_controlnet("cn", "tiny-sd15", default_size=SIZE)
    inputs = {**SETTINGS, "control_image": CONTROL, "controlnet_scale": 0.8}
    image, _, status = await run(spec, inputs, workers=2)
    assert len(status.workers) == 2
    difference = np.abs(image.astype(int) - controlnet_reference(CONTROL, 0.8).astype(int))
    assert difference.max() <= 1
    assert np.count_nonzero(difference) <= 0.01 * difference.size


async def test_img2img_gives_the_pipelines_image_exactly() -> None:
    spec = sd15_img2img("i2i", "tiny-sd15", default_size=SIZE)
    source = encode_data_uri(pattern(SIZE, 2))
    settings = {**SETTINGS, "steps": 4}
    image, reply, _ = await run(spec, {**settings, "image": source, "strength": 0.5})
    # strength 0.5 of 4 steps: 2 steps (+1 PNDM repeat); image + encode + 2 text + init + 3x3 + decode
    assert reply.nodes_executed == 1 + 1 + 2 + 1 + 3 * 3 + 1
    assert np.array_equal(image, img2img_reference(source, 0.5, steps=4))
    weaker, _, _ = await run(spec, {**settings, "image": source, "strength": 0.25})
    assert not np.array_equal(weaker, image)
