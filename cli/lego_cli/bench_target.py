"""Where `lego bench slo` sends its requests: an embedded cluster it starts for each policy, or a
running cluster it connects to (`--connect GATEWAY --store etcd://…`, e.g. `lego up --store
etcd://… --backend emulated --enforce-slo`), found through its store: the compiler's registration
and the coordinator leader's. A running cluster serves one policy, its own, and counts its workers'
loads and busy seconds in their status replies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from lego import keys
from lego.grpc_server import channel
from lego.store import open_store
from lego.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, worker_pb2_grpc
from lego_worker.agent import WorkerService
from lego_worker.embedding_cache import EmbeddingCacheStats
from lego_worker.lora_loads import LoRAStats

from lego_cli.cluster import EmbeddedCluster


@dataclass(frozen=True)
class Counters:
    """What the cluster's workers have counted so far: subtract two to get a run's figures. A running
    cluster's workers report no embedding-cache or LoRA figures (`detailed` false)."""

    loads: int
    busy_s: float
    cache: EmbeddingCacheStats
    loras: LoRAStats
    detailed: bool = True


@dataclass(frozen=True)
class BenchTarget:
    gateway_address: str
    compiler_address: str
    coordinator_address: str
    workers: int
    counters: Callable[[], Awaitable[Counters]]


def _embedded_counters(cluster: EmbeddedCluster) -> Counters:
    executors = [s.agent.executor for s in cluster.services if isinstance(s, WorkerService)]
    cache = EmbeddingCacheStats()
    for embeddings in (e.embeddings for e in executors if e.embeddings is not None):
        cache.hits += embeddings.stats.hits
        cache.misses += embeddings.stats.misses
        cache.saved_s += embeddings.stats.saved_s
    loras = LoRAStats()
    for stats in (e.loras.stats for e in executors):
        loras.fetches += stats.fetches
        loras.waits += stats.waits
        loras.unpatched += stats.unpatched
    return Counters(
        sum(e.metrics.loads for e in executors), sum(e.metrics.busy_s for e in executors), cache, loras
    )


@asynccontextmanager
async def embedded(cluster: EmbeddedCluster) -> AsyncIterator[BenchTarget]:
    async def counters() -> Counters:
        return _embedded_counters(cluster)

    async with cluster:
        addresses = (cluster.gateway_address, cluster.compiler_address, cluster.coordinator_address)
        yield BenchTarget(*addresses, cluster.workers, counters)


async def cluster_status(coordinator_address: str) -> coordinator_pb2.ClusterStatusReply:
    async with channel(coordinator_address) as chan:
        reply: coordinator_pb2.ClusterStatusReply = await coordinator_pb2_grpc.CoordinatorStub(
            chan
        ).ClusterStatus(common_pb2.Empty())
        return reply


async def _worker_counters(coordinator_address: str) -> Counters:
    status = await cluster_status(coordinator_address)

    async def one(address: str) -> tuple[int, float]:
        async with channel(address) as chan:
            reply = await worker_pb2_grpc.WorkerStub(chan).GetStatus(common_pb2.Empty())
            return reply.loads, reply.busy_s

    figures = await asyncio.gather(*(one(worker.address) for worker in status.workers))
    return Counters(
        sum(loads for loads, _ in figures),
        sum(busy for _, busy in figures),
        EmbeddingCacheStats(),
        LoRAStats(),
        detailed=False,
    )


@asynccontextmanager
async def connected(gateway_address: str, store_url: str, policy: str) -> AsyncIterator[BenchTarget]:
    """The running cluster behind `gateway_address`, if its coordinator runs `policy`."""
    store = await open_store(store_url)
    try:
        compilers = await store.get_prefix(keys.service("compiler", ""))
        leader = await store.get(keys.COORDINATOR_LEADER)
    finally:
        await store.close()
    if not compilers or leader is None:
        missing = "compiler" if not compilers else "coordinator leader"
        raise SystemExit(f"error: --store {store_url}: no {missing} registered there (is the cluster up?)")
    coordinator_address = leader.decode()
    status = await cluster_status(coordinator_address)
    if status.policy != policy:
        raise SystemExit(
            f"error: --policy {policy}: the cluster at {gateway_address} runs {status.policy!r}; "
            "a running cluster is benchmarked under its own policy"
        )
    if not status.workers:
        raise SystemExit(f"error: the cluster at {gateway_address} has no workers")

    async def counters() -> Counters:
        return await _worker_counters(coordinator_address)

    compiler_address = next(iter(compilers.values())).decode()
    yield BenchTarget(gateway_address, compiler_address, coordinator_address, len(status.workers), counters)
