"""Approximate caching in the SLO benchmark: the workload with it on, and what it costs in quality.

`with_approx_cache` turns it on for every text-to-image loop of a workload (a ControlNet tenant's
loop keeps running whole: approximate caching is for text-to-image loops only).

`measure_quality` makes the quality figure with real tiny models, since the emulated cluster that
measures the speed-up makes no pixels: on a fresh one-worker cluster of the tiny SD 1.5 preset,
a donor request runs whole, then a recipient whose prompt is related to it in a known way
(lego_cli.prompts' set: the same prompt, a neighbour that differs in its setting, the same subject
in another style, another subject; the donor's seed, and once another one) runs with approximate
caching and once more without. Reported per pair: the steps the hit skipped, the pixel MSE of the
resumed image against the recipient's exact image and of the donor's image against it, and the
share of that difference the steps still run made (1 - the first MSE / the second; 1 is the exact
image, 0 the donor's). The tiny model's random text encoder rates prompts far more alike than a
trained one would (these pairs all come out above 0.95), so every pair here skips the most
(half); the figure is what a skip costs, not a production hit rate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lego import operators
from lego.builtin_workflows import sd15_txt2img
from lego.client import AsyncGatewayClient
from lego.grpc_server import channel
from lego.v1 import compiler_pb2, compiler_pb2_grpc
from lego.validation import validate_spec
from lego.values import Scalar

from lego_cli.cluster import EmbeddedCluster
from lego_cli.lora_quality import SIZE, pixels
from lego_cli.prompts import STYLES, prompt
from lego_cli.workloads import Workload

DONOR_SEED = 7
# (name, donor prompt index, recipient prompt index, recipient seed) in lego_cli.prompts' set
PAIRS = (
    ("same prompt", 0, 0, DONOR_SEED),
    ("neighbour: other setting", 0, 1, DONOR_SEED),
    ("same subject, other style", 0, len(STYLES), DONOR_SEED),
    ("other subject", 0, 5 * len(STYLES), DONOR_SEED),
    ("same prompt, other seed", 0, 0, DONOR_SEED + 1),
)


def with_approx_cache(chosen: Workload) -> Workload:
    """The workload whose text-to-image loops may resume from cached latents."""
    workflows = {}
    for tenant, spec in chosen.workflows.items():
        cached = compiler_pb2.WorkflowSpec()
        cached.CopyFrom(spec)
        for node in cached.nodes:
            if node.op == operators.DENOISE_LOOP and not node.adapters:
                node.attributes["approx_cache"] = "1"
        if validate_spec(cached):  # not a text-to-image loop: it runs as it was
            cached = spec
        workflows[tenant] = cached
    return Workload(workflows, chosen.inputs)


async def _pair(donor: str, recipient: str, seed: int, steps: int) -> tuple[np.ndarray, ...]:
    """(the donor's image, the recipient's resumed image, its exact image) and the steps skipped."""
    specs = [
        sd15_txt2img(name, "tiny-sd15", default_size=SIZE, approx_cache=name == "approx")
        for name in ("approx", "exact")
    ]
    async with EmbeddedCluster(workers=1) as cluster:
        async with channel(cluster.compiler_address) as chan:
            for spec in specs:
                await compiler_pb2_grpc.CompilerStub(chan).RegisterWorkflow(spec)
        async with AsyncGatewayClient(cluster.gateway_address, timeout_s=600) as client:
            common: dict[str, Scalar] = {"negative_prompt": "", "steps": steps}
            first = await client.generate("approx", {**common, "prompt": donor, "seed": DONOR_SEED})
            wanted = {**common, "prompt": recipient, "seed": seed}
            resumed = await client.generate("approx", wanted)
            exact = await client.generate("exact", wanted)
    return pixels(first.png), pixels(resumed.png), pixels(exact.png), np.array(resumed.skipped_steps)


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2))


async def measure_quality(steps: int) -> dict[str, Any]:
    """The figures for every pair of PAIRS (each on its own fresh cluster)."""
    by_pair = []
    for name, donor, recipient, seed in PAIRS:
        donor_image, resumed, exact, skipped = await _pair(prompt(donor), prompt(recipient), seed, steps)
        mse, donor_mse = _mse(resumed, exact), _mse(donor_image, exact)
        by_pair.append(
            {
                "pair": name,
                "donor": prompt(donor),
                "recipient": prompt(recipient),
                "seeds": [DONOR_SEED, seed],
                "skipped_steps": int(skipped),
                "pixel_mse_vs_exact": round(mse, 3),
                "pixel_mse_donor_vs_exact": round(donor_mse, 3),
                "difference_made": round(1 - mse / donor_mse, 4) if donor_mse else None,
            }
        )
    return {"model": "tiny-sd15 (CPU, random weights from a seed)", "steps": steps, "by_pair": by_pair}
