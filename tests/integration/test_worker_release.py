"""A released request takes only its own tasks out of a batch shared with other requests.

The coordinator may chain one batch behind producers of several requests on a worker: D(A+B) queued
behind A's and B's scheduler inits. When A is released meanwhile, its init is answered as released
and never makes its output; D must still run B's task (it used to fail whole, and B with it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from lego.store import MemoryStore
from lego.v1 import common_pb2, coordinator_pb2
from lego.values import Scalar, to_values
from lego_dataengine.service import serve as serve_dataengine
from lego_worker.agent import RELEASED, WorkerAgent, WorkerConfig, build_executor

INIT: dict[str, Scalar] = {
    "seed": 1,
    "height": 64,
    "width": 64,
    "steps": 2,
    "iterations": 2,
    "latent_channels": 4,
    "vae_scale_factor": 8,
}


class Stream:
    """The coordinator's end of the worker's stream: what the worker wrote."""

    def __init__(self) -> None:
        self.results: dict[str, coordinator_pb2.BatchResult] = {}

    async def write(self, message: coordinator_pb2.WorkerMessage) -> None:
        self.results[message.result.batch_id] = message.result


def init_batch(request_id: str) -> coordinator_pb2.TaskBatch:
    batch = coordinator_pb2.TaskBatch(
        batch_id=f"init-{request_id}", op="noise_scheduler", model="tiny-sd15:scheduler", mode="init"
    )
    task = batch.tasks.add(task_id=f"{request_id}/init", request_id=request_id, node_id="init")
    task.outputs.extend(["latents", "model_input", "timestep"])
    task.state_key = "loop"
    for name, value in to_values(INIT).items():
        task.inputs[name].CopyFrom(value)
    return batch


def decode_batch(request_ids: list[str]) -> coordinator_pb2.TaskBatch:
    """One VAE call for the requests, each reading its init's latents by id (chained: pending)."""
    batch = coordinator_pb2.TaskBatch(batch_id="decode", op="vae", model="tiny-sd15:vae", mode="decode")
    for request_id in request_ids:
        task = batch.tasks.add(task_id=f"{request_id}/decode", request_id=request_id, node_id="decode")
        task.outputs.append("image")
        pending = common_pb2.TensorHandle(tensor_id=f"{request_id}/init/latents")
        task.inputs["latents"].tensor.CopyFrom(pending)
    return batch


async def run(
    agent: WorkerAgent, stream: Any, batches: list[coordinator_pb2.TaskBatch], released: str
) -> None:
    for batch in batches:  # what the stream does on receipt, in order
        agent._expect_outputs(batch)
    agent._release(released)
    for batch in batches:  # the queue, in order
        await agent._answer(stream, batch)


@pytest.fixture
async def agent() -> AsyncIterator[WorkerAgent]:
    host = await serve_dataengine(None)
    try:
        config = WorkerConfig(worker_id="w", backend="emulated")
        yield WorkerAgent(config, MemoryStore(), "unused", host.address, build_executor(config))
    finally:
        await host.stop()


async def test_a_shared_chained_batch_runs_for_the_requests_not_released(agent: WorkerAgent) -> None:
    stream = Stream()
    await run(agent, stream, [init_batch("A"), init_batch("B"), decode_batch(["A", "B"])], released="A")
    assert stream.results["init-A"].error == RELEASED
    assert stream.results["init-B"].error == ""
    decode = stream.results["decode"]
    assert decode.error == ""
    assert [r.task_id for r in decode.results] == ["B/decode"]
    assert list(decode.results[0].outputs["image"].shape) == [1, 64, 64, 3]


async def test_a_task_whose_request_is_released_while_it_waits_is_left_out(agent: WorkerAgent) -> None:
    stream = Stream()
    inits, decode = [init_batch("A"), init_batch("B")], decode_batch(["A", "B"])
    for batch in [*inits, decode]:
        agent._expect_outputs(batch)
    waiting = asyncio.create_task(agent._answer(stream, decode))  # beside the queue: it waits for A's
    await asyncio.sleep(0.05)
    agent._release("A")
    for batch in inits:
        await agent._answer(stream, batch)
    await asyncio.wait_for(waiting, timeout=10)
    assert [r.task_id for r in stream.results["decode"].results] == ["B/decode"]
    agent._release("B")  # now every request of a batch is released: it is answered so at once
    await agent._answer(stream, decode_batch(["A", "B"]))
    assert stream.results["decode"].error == RELEASED and not stream.results["decode"].results


async def test_a_task_released_while_an_input_is_made_here_does_not_wait_for_the_freed_ones(
    agent: WorkerAgent,
) -> None:
    # The decode reads A's init output (made here, chained) and a tensor the release freed (here:
    # never put). A is released after its init has run but before the decode has resumed: it used
    # to fetch the freed tensor then, and hold the worker's queue for the data engine's 60 s wait.
    stream = Stream()
    init, decode = init_batch("A"), decode_batch(["A"])
    freed = common_pb2.TensorHandle(tensor_id="A/text_encoder/embeddings", dtype="float32", nbytes=4)
    freed.shape.append(1)
    decode.tasks[0].inputs["embeddings"].tensor.CopyFrom(freed)
    for batch in (init, decode):
        agent._expect_outputs(batch)
    waiting = asyncio.create_task(agent._answer(stream, decode))  # waits for A's init output
    await asyncio.sleep(0.05)
    await agent._answer(stream, init)  # publishes A's latents: the decode may resume ...
    agent._release("A")  # ... but A is released first
    await asyncio.wait_for(waiting, timeout=10)
    assert stream.results["init-A"].error == ""
    assert RELEASED in stream.results["decode"].error and not stream.results["decode"].results


async def test_a_batch_released_while_it_fetches_an_input_made_elsewhere_is_answered(
    agent: WorkerAgent,
) -> None:
    # The decode waits for a tensor another worker is still making (here: never put). Its request
    # is released meanwhile (its deadline passed). The batch used to end with the fetch's
    # CancelledError instead of an answer: the worker's queue runner died with it, and the
    # coordinator counted the batch in flight for ever (a live bench lost a worker this way).
    stream = Stream()
    decode = decode_batch(["A"])
    elsewhere = common_pb2.TensorHandle(tensor_id="A/controlnet/residuals", dtype="float32", nbytes=4)
    elsewhere.shape.append(1)
    decode.tasks[0].inputs["latents"].tensor.CopyFrom(elsewhere)
    agent._expect_outputs(decode)
    waiting = asyncio.create_task(agent._answer(stream, decode))
    await asyncio.sleep(0.05)
    agent._release("A")
    await asyncio.wait_for(waiting, timeout=10)
    assert RELEASED in stream.results["decode"].error and not stream.results["decode"].results
