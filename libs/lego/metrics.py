"""Prometheus metrics of every service, served on `--metrics-port` (`GET /metrics`).

One process-wide registry: services that share a process (the embedded cluster) share it, and
per-instance series carry a `worker_id` label. Metrics are updated on the event loop; the HTTP
server thread only reads them. No torch, no grpc here: the pure cores never import this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)

SERVICE_INFO = Gauge("lego_service_info", "Services running in this process", ["service"])
GRPC_REQUESTS = Counter("lego_grpc_requests_total", "gRPC calls received, by method", ["method"])

# gateway
REQUESTS = Counter("lego_requests_total", "Requests answered by the gateway, by outcome", ["outcome"])
REQUEST_LATENCY = Histogram(
    "lego_request_latency_seconds", "Gateway latency of answered requests", buckets=LATENCY_BUCKETS
)

# coordinator
ADMISSIONS = Counter("lego_admissions_total", "Requests admitted by the coordinator")
ADMISSION_REJECTIONS = Counter(
    "lego_admission_rejections_total", "Requests rejected by admission control (RESOURCE_EXHAUSTED)"
)
SLO_REQUESTS = Counter(
    "lego_slo_requests_total", "Finished requests by whether they met their SLO (rejections miss)", ["met"]
)
SLO_ATTAINMENT = Gauge("lego_slo_attainment", "Requests within their SLO / all requests, since start")
APPROX_HITS = Counter(
    "lego_approx_cache_hits_total", "Requests resumed from a similar request's cached latent"
)
APPROX_SKIPPED = Counter(
    "lego_approx_cache_skipped_steps_total", "Denoise iterations approximate-cache hits skipped"
)
APPROX_BYTES = Gauge("lego_approx_cache_bytes", "Bytes of cached latents the approximate cache keeps")
QUEUE_DEPTH = Gauge("lego_queue_depth", "Ready nodes waiting for a worker, by model", ["model"])
QUEUE_DEPTH_TOTAL = Gauge("lego_queue_depth_total", "Ready nodes waiting for a worker (HPA metric)")
WORKERS = Gauge("lego_workers", "Workers connected to this coordinator, by state", ["state"])
DISPATCHED_BATCH_SIZE = Histogram(
    "lego_batch_size", "Nodes per dispatched batch, by model", ["model"], buckets=SIZE_BUCKETS
)

# worker
WORKER_BATCHES = Counter("lego_worker_batches_total", "Batches executed", ["worker_id", "model"])
WORKER_BATCH_SIZE = Histogram(
    "lego_worker_batch_size", "Nodes per executed batch", ["worker_id"], buckets=SIZE_BUCKETS
)
WORKER_BUSY = Counter("lego_worker_busy_seconds_total", "Seconds spent executing batches", ["worker_id"])
MODEL_EVENTS = Counter(
    "lego_model_events_total", "Model prefetches, loads and evictions", ["worker_id", "model", "kind"]
)
PARTIAL_OUTPUTS = Counter(
    "lego_worker_partial_outputs_total",
    "Parts of streamed outputs published while their call ran, or consumed before their producer ended",
    ["worker_id", "direction"],
)
LORA_FETCHES = Counter(
    "lego_worker_lora_fetches_total", "LoRA fetches into host memory started by batches", ["worker_id"]
)
LORA_WAITS = Counter(
    "lego_worker_lora_waits_total", "Batches that waited for their LoRAs to load (synchronous)", ["worker_id"]
)
UNPATCHED_BATCHES = Counter(
    "lego_worker_unpatched_batches_total",
    "Batches that ran without some of their LoRAs while these loaded (bounded async LoRA loading)",
    ["worker_id"],
)
EMBEDDING_CACHE_HITS = Counter(
    "lego_embedding_cache_hits_total", "Text-encoder items answered by the embedding cache", ["worker_id"]
)
EMBEDDING_CACHE_MISSES = Counter(
    "lego_embedding_cache_misses_total", "Text-encoder items the embedding cache did not hold", ["worker_id"]
)
EMBEDDING_CACHE_SAVED = Counter(
    "lego_embedding_cache_saved_seconds_total",
    "Encoder seconds saved by cache hits",
    ["worker_id"],
)
EMBEDDING_CACHE_BYTES = Gauge("lego_embedding_cache_bytes", "Bytes the embedding cache holds", ["worker_id"])
WORKER_DRAINING = Gauge("lego_worker_draining", "1 while the worker drains before leaving", ["worker_id"])

# data engine
TENSOR_BYTES = Counter("lego_tensor_bytes_total", "Tensor bytes moved through the data engine", ["direction"])
ARENA_USED = Gauge("lego_arena_used_bytes", "Bytes allocated in the data engine's arena")


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: Thread
    address: str

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(service: str, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
    """Serve the registry at http://HOST:PORT/metrics in a daemon thread (port 0: any free port)."""
    SERVICE_INFO.labels(service=service).set(1)
    server, thread = start_http_server(port, addr=host)
    display_host = f"[{host}]" if ":" in host else host
    return MetricsServer(server, thread, f"{display_host}:{server.server_port}")


_slo_counts = {True: 0, False: 0}
_queued_models: set[str] = set()


def record_slo(met: bool) -> None:
    SLO_REQUESTS.labels(met="true" if met else "false").inc()
    _slo_counts[met] += 1
    SLO_ATTAINMENT.set(_slo_counts[True] / (_slo_counts[True] + _slo_counts[False]))


def set_queue_depth(by_model: dict[str, int]) -> None:
    """Replace the per-model queue depth (models with nothing queued read 0)."""
    for model in _queued_models - by_model.keys():
        QUEUE_DEPTH.labels(model=model).set(0)
    _queued_models.update(by_model)
    for model, count in by_model.items():
        QUEUE_DEPTH.labels(model=model).set(count)
    QUEUE_DEPTH_TOTAL.set(sum(by_model.values()))
