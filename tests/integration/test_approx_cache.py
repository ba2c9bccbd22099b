"""Approximate caching on a live cluster with real tiny models: a request whose prompt matches a
finished one's starts from that one's cached latent (kept in the data engine after the first
request was released) and skips exactly the steps its similarity allows; a miss runs whole and
equals the diffusers pipeline."""

from __future__ import annotations

import numpy as np
from lego.builtin_workflows import sd15_txt2img
from lego.values import Scalar
from lego_cli.cluster import EmbeddedCluster

from tests.integration.test_async_lora import generate, mse
from tests.integration.test_gateway_rest import rest
from tests.integration.test_worker_runtime import register
from tests.pipeline_reference import decode_png, reference_image

PROMPT = "a yellow square on a blue floor"
STEPS = 10
# identical prompts (cosine 1): from the first request's latent after half the steps (5 of 11
# iterations); PNDM spends its first timestep twice again there, so 4 iterations are skipped
SKIPPED = 4
PER_ITERATION = 3  # two UNet branches (CFG) and the scheduler's step


def settings(**changed: Scalar) -> dict[str, Scalar]:
    return {"prompt": PROMPT, "negative_prompt": "", "seed": 7, "steps": STEPS} | changed


async def test_a_repeated_prompt_resumes_from_the_cached_latent_and_skips_exactly_k_steps() -> None:
    async with EmbeddedCluster(workers=1, http_port=0) as cluster:
        await register(cluster, sd15_txt2img("approx", "tiny-sd15", default_size=128, approx_cache=True))
        first = await generate(cluster, "approx", settings())
        second = await generate(cluster, "approx", settings(seed=8))  # the first was released meanwhile
        again = await generate(cluster, "approx", settings())  # the first's prompt and seed
        async with rest(cluster) as http:
            body = {"workflow": "approx", "inputs": settings(seed=9), "response_format": "b64_json"}
            third = await http.post("/v1/generate", json=body)
        other_steps = await generate(cluster, "approx", settings(steps=6))  # no latent of 6-step requests

    donor = decode_png(first.png)
    assert first.skipped_steps == 0
    assert np.array_equal(donor, reference_image(PROMPT, "", 7, STEPS, 7.5))  # a miss is exact
    assert second.skipped_steps == SKIPPED
    assert second.nodes_executed == first.nodes_executed - SKIPPED * PER_ITERATION
    resumed, exact = decode_png(second.png), reference_image(PROMPT, "", 8, STEPS, 7.5)
    assert resumed.shape == exact.shape and not np.array_equal(resumed, exact)
    # it carries the first request's latent: closer to that image than its own exact one is
    assert mse(resumed, donor) < mse(exact, donor)
    # resumed on the first's own trajectory, it ends where the first did, but for PNDM's multistep
    # history, which a resumed scheduler starts anew
    assert again.skipped_steps == SKIPPED
    assert mse(decode_png(again.png), donor) < 1.0  # 0.12 here (8-bit pixels)
    assert other_steps.skipped_steps == 0
    assert third.status_code == 200 and third.json()["skipped_steps"] == SKIPPED
    assert third.headers["X-Skipped-Steps"] == str(SKIPPED)
