"""The trained `lego-shapes` demo model: served through an embedded cluster, it draws what held-out
prompts say (scored by the colour / fill-ratio checker, which is first checked on dataset images),
and the cluster's image is diffusers' StableDiffusionPipeline's on the same components."""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from lego.builtin_workflows import LEGO_SHAPES_GUIDANCE, LEGO_SHAPES_TXT2IMG
from lego.client import AsyncGatewayClient
from lego_cli.cluster import EmbeddedCluster
from lego_worker.shapes import dataset, fidelity
from lego_worker.shapes.model import build_lego_shapes
from lego_worker.shapes.train import generate, pipeline

from tests.pipeline_reference import decode_png

STEPS = 15
GUIDANCE = LEGO_SHAPES_GUIDANCE  # the workflow's default


def test_the_checker_reads_every_dataset_image_right() -> None:
    images, combos = dataset.make_dataset(dataset.all_combos(), 300, seed=7)
    scores = [fidelity.score(image, combo) for image, combo in zip(images, combos, strict=True)]
    assert fidelity.rates(scores) == {"shape": 1.0, "colour": 1.0, "background": 1.0, "all": 1.0}


def test_the_checker_tells_a_wrong_caption() -> None:
    images, combos = dataset.make_dataset(dataset.all_combos(), 30, seed=8)
    wrong = [dataset.Combo(c.shape, c.background, c.colour) for c in combos]  # colours swapped
    scores = [fidelity.score(image, combo) for image, combo in zip(images, wrong, strict=True)]
    assert fidelity.rates(scores)["colour"] == 0.0


async def _generate_all(prompts: list[str]) -> list[np.ndarray]:
    async with EmbeddedCluster(workers=1) as cluster, AsyncGatewayClient(cluster.gateway_address) as client:
        first = await client.generate(  # alone: its CFG branches batch as the pipeline's do
            LEGO_SHAPES_TXT2IMG, {"prompt": prompts[0], "seed": 0, "steps": STEPS}
        )
        rest = await asyncio.gather(
            *(
                client.generate(LEGO_SHAPES_TXT2IMG, {"prompt": prompt, "seed": seed, "steps": STEPS})
                for seed, prompt in enumerate(prompts[1:], start=1)
            )
        )
    return [decode_png(image.png) for image in (first, *rest)]


async def test_held_out_prompts_come_out_as_asked_through_the_cluster() -> None:
    combos = list(dataset.HELD_OUT)  # 12 combinations never seen in training
    images = await _generate_all([combo.caption for combo in combos])
    assert all(image.shape == (64, 64, 3) for image in images)
    # the first request ran alone: exactly diffusers' pipeline on the preset's components
    with torch.random.fork_rng():
        reference = generate(pipeline(build_lego_shapes()), [combos[0].caption], [0], STEPS, GUIDANCE)[0]
    assert np.array_equal(images[0], reference)
    rates = fidelity.rates([fidelity.score(i, c) for i, c in zip(images, combos, strict=True)])
    assert rates["colour"] >= 0.9, rates
    assert rates["background"] >= 0.9, rates
    assert rates["shape"] >= 0.7, rates
