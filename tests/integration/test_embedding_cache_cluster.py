"""The embedding cache on a live cluster (real gRPC, tiny diffusers models): two workflows sharing a
text encoder compute a prompt once, and an image made from cached embeddings is the same image."""

from __future__ import annotations

import numpy as np
from lego.builtin_workflows import TINY_SD15_TXT2IMG, sd15_txt2img
from lego.client import AsyncGatewayClient
from lego.grpc_server import channel
from lego.v1 import compiler_pb2_grpc
from lego_cli.cluster import EmbeddedCluster
from lego_worker.agent import WorkerConfig
from prometheus_client import REGISTRY

from tests.pipeline_reference import decode_png

OTHER = "tiny-sd15-other"  # a second workflow on the same models: the encoder is shared
INPUTS = {
    "prompt": "a red circle",
    "negative_prompt": "blurry",
    "steps": 2,
    "seed": 5,
    "height": 64,
    "width": 64,
}


def _counted(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"worker_id": "worker-0"}) or 0.0


async def test_two_workflows_share_cached_embeddings_and_the_image_is_unchanged() -> None:
    config = WorkerConfig(embedding_cache_bytes=2**24)
    hits, misses = _counted("lego_embedding_cache_hits_total"), _counted("lego_embedding_cache_misses_total")
    async with EmbeddedCluster(workers=1, worker=config) as cluster:
        async with channel(cluster.compiler_address) as chan:
            await compiler_pb2_grpc.CompilerStub(chan).RegisterWorkflow(
                sd15_txt2img(OTHER, "tiny-sd15", default_size=64)
            )
        async with AsyncGatewayClient(cluster.gateway_address) as client:
            computed = await client.generate(TINY_SD15_TXT2IMG, INPUTS)
            assert _counted("lego_embedding_cache_misses_total") - misses == 2  # prompt and negative
            await client.generate(OTHER, INPUTS)
            from_cache = await client.generate(TINY_SD15_TXT2IMG, INPUTS)
    assert _counted("lego_embedding_cache_hits_total") - hits == 4  # two requests, two texts each
    assert _counted("lego_embedding_cache_misses_total") - misses == 2
    assert _counted("lego_embedding_cache_saved_seconds_total") > 0
    assert np.array_equal(decode_png(from_cache.png), decode_png(computed.png))
