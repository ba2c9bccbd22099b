"""Partial outputs on a live cluster: an SD3 ControlNet publishes its block samples through the data
engine while it runs, the transformer placed beside it on another worker consumes them part by part,
and the image stays within the documented bound of diffusers' StableDiffusion3ControlNetPipeline."""

from __future__ import annotations

import numpy as np
from lego import metrics
from lego.builtin_workflows import sd3_txt2img
from lego.data_uri import encode_data_uri

from tests.integration.test_deferred_inputs import node_order, run_watched
from tests.integration.test_families import SETTINGS, SIZE, sd3_controlnet_reference
from tests.integration.test_sd15_adapters import pattern


def partial_outputs(direction: str) -> float:
    return sum(
        sample.value
        for metric in metrics.PARTIAL_OUTPUTS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["direction"] == direction
    )


ATTEMPTS = 3  # a run whose transformers all start after their ControlNet's one block consumes none


async def test_sd3_controlnet_samples_reach_a_transformer_on_another_worker_part_by_part() -> None:
    control = encode_data_uri(pattern(96, 8))
    spec = sd3_txt2img("sd3-cn", "tiny-sd3", default_size=SIZE, controlnet="controlnet_canny")
    inputs = {**SETTINGS, "guidance_scale": 5.0, "control_image": control, "controlnet_scale": 0.8}
    for _ in range(ATTEMPTS):
        published, consumed = partial_outputs("published"), partial_outputs("consumed")
        events, image = await run_watched(spec, inputs)
        order = node_order(events)
        worker = {
            e.node_started.node_id: e.node_started.worker_id for e in events if e.HasField("node_started")
        }
        controlnets = [
            node for kind, node in order if kind == "node_started" and node.endswith("/controlnet")
        ]
        assert len(controlnets) == 2 * int(SETTINGS["steps"])  # one per step and CFG branch
        beside = [  # transformers placed on another worker while their ControlNet still ran
            node
            for node in (controlnet.removesuffix("/controlnet") for controlnet in controlnets)
            if worker[node] != worker[f"{node}/controlnet"]
            and order.index(("node_started", node)) < order.index(("node_finished", f"{node}/controlnet"))
        ]
        assert beside, "no transformer ran beside its ControlNet"
        # the tiny ControlNet has one block: one part per ControlNet call, whoever reads it
        assert partial_outputs("published") - published == len(controlnets)
        # the CFG branches ran as batches of one here, not as the pipeline's batch of two: float sums
        # in another order, so the bound of test_deferred_inputs (the parts themselves are bit-exact:
        # tests/unit/test_block_parts.py)
        reference = sd3_controlnet_reference("controlnet_canny", 5.0, control, 0.8)
        difference = np.abs(image.astype(int) - reference.astype(int))
        assert difference.max() <= 1 and np.count_nonzero(difference) <= 0.01 * difference.size
        # a transformer placed beside its ControlNet reads parts only if its call starts before the
        # ControlNet's one block ends (a busy host can make every one of them start later)
        if partial_outputs("consumed") - consumed >= 1:
            return
    raise AssertionError(f"no transformer consumed a part as it arrived in {ATTEMPTS} runs")
