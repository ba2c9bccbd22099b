"""ControlNet residuals as deferred inputs on a live cluster: a denoiser call starts while its
ControlNet still runs (on another worker), waits for the residuals on the data engine, and the image
stays within the documented bound of diffusers' pipeline."""

from __future__ import annotations

import numpy as np
from lego.builtin_workflows import sd15_controlnet
from lego.dataplane import DataPlane
from lego.grpc_server import channel
from lego.v1 import compiler_pb2, compiler_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc
from lego.values import Scalar, to_values
from lego_cli.cluster import EmbeddedCluster

from tests.integration.test_sd15_adapters import CONTROL, SETTINGS, SIZE, controlnet_reference


async def run_watched(
    spec: compiler_pb2.WorkflowSpec, inputs: dict[str, Scalar], workers: int = 4
) -> tuple[list[coordinator_pb2.WatchEvent], np.ndarray]:
    """One request on a fresh cluster: its events (node events included) and its image."""
    async with EmbeddedCluster(workers=workers) as cluster:
        async with channel(cluster.compiler_address) as chan:
            await compiler_pb2_grpc.CompilerStub(chan).RegisterWorkflow(spec)
        async with channel(cluster.coordinator_address) as chan:
            stub = coordinator_pb2_grpc.CoordinatorStub(chan)
            await stub.Submit(
                coordinator_pb2.SubmitRequest(request_id="r", workflow=spec.name, inputs=to_values(inputs))
            )
            watch = coordinator_pb2.WatchRequest(request_id="r", node_events=True)
            events = [event async for event in stub.Watch(watch)]
            assert events[-1].WhichOneof("event") == "done"
            handle = events[-1].done.outputs["image"].tensor
            image = np.array(await DataPlane(handle.locations[0]).get(handle))[0]
            await stub.Release(coordinator_pb2.ReleaseRequest(request_id="r"))
    return events, image


def node_order(events: list[coordinator_pb2.WatchEvent]) -> list[tuple[str, str]]:
    """("node_started" | "node_finished", node id) in the order the events came."""
    return [
        (kind, getattr(event, kind).node_id)
        for event in events
        if (kind := event.WhichOneof("event")) in ("node_started", "node_finished")
    ]


async def test_a_denoiser_starts_before_its_controlnet_finishes_and_the_image_holds() -> None:
    spec = sd15_controlnet("cn", "tiny-sd15", default_size=SIZE)
    inputs = {**SETTINGS, "control_image": CONTROL, "controlnet_scale": 0.8}
    events, image = await run_watched(spec, inputs)
    order = node_order(events)
    early = [
        step
        for step in range(int(SETTINGS["steps"]) + 1)
        for branch in ("uncond", "cond")
        if order.index(("node_started", f"denoise_loop_3/step{step}/{branch}"))
        < order.index(("node_finished", f"denoise_loop_3/step{step}/{branch}/controlnet"))
    ]
    assert early, "no denoiser started before its ControlNet finished"
    difference = np.abs(image.astype(int) - controlnet_reference(CONTROL, 0.8).astype(int))
    assert difference.max() <= 1 and np.count_nonzero(difference) <= 0.01 * difference.size
