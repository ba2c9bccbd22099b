import argparse
from pathlib import Path

from lego.service_main import add_model_roots_flag, base_parser, run_service
from lego.store import ClusterStore

from lego_worker.agent import DRAIN_TIMEOUT_S, WorkerConfig, WorkerService, serve
from lego_worker.emulated_backend import LORA_FETCH_MEDIAN_S
from lego_worker.lora_loads import DEFAULT_CAPACITY


class DrainOnStop:
    """SIGTERM/SIGINT (scale-down, `docker stop`, a pod's termination) drains before stopping:
    no new work, what is here finishes, models are unloaded, the registration is closed."""

    def __init__(self, service: WorkerService, timeout_s: float) -> None:
        self.service = service
        self.timeout_s = timeout_s
        self.address = service.address

    async def stop(self) -> None:
        if self.timeout_s > 0:
            await self.service.drain(self.timeout_s)
        await self.service.stop()


async def _start(store: ClusterStore, args: argparse.Namespace) -> DrainOnStop:
    config = WorkerConfig(
        worker_id=args.worker_id,
        device=args.device,
        backend=args.backend,
        profile_dir=args.profile,
        time_scale=args.time_scale,
        memory_bytes=int(args.memory_gb * 10**9),
        model_roots=args.model_roots,
        embedding_cache_bytes=int(args.embedding_cache_mb * 2**20),
        lora_fetch_s=args.lora_fetch_s,
        lora_capacity=args.lora_capacity,
    )
    service = await serve(store, args.dataengine, args.host, args.port, config)
    return DrainOnStop(service, args.drain_timeout_s)


def add_backend_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["torch", "emulated"], default="torch")
    parser.add_argument(
        "--profile", type=Path, default=None, help="emulated: profile dir (default profiles/h800)"
    )
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="emulated: run Kx faster than real time"
    )
    parser.add_argument(
        "--memory-gb", type=float, default=0.0, help="device memory budget (default: device size)"
    )
    parser.add_argument(
        "--embedding-cache-mb",
        type=float,
        default=0.0,
        help="exact text-embedding cache shared by all workflows, LRU in this many MiB (default 0: off)",
    )
    parser.add_argument(
        "--lora-fetch-s",
        type=_non_negative,
        default=None,
        help=f"emulated: median seconds of a LoRA fetch (log-normal; default {LORA_FETCH_MEDIAN_S}); "
        "torch: a fetch takes at least this long (a slow LoRA store; default: the disk's speed)",
    )
    parser.add_argument(
        "--lora-capacity",
        type=_positive_int,
        default=DEFAULT_CAPACITY,
        help=f"LoRAs a worker holds at once, least recently used dropped (default {DEFAULT_CAPACITY})",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value:g}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("worker")
    parser.add_argument("--dataengine", required=True, help="address of this host's data engine")
    parser.add_argument("--worker-id", default="", help="default: a random id")
    parser.add_argument("--device", default="cpu", help="cpu | cuda:N")
    add_model_roots_flag(parser)
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=DRAIN_TIMEOUT_S,
        help=f"on SIGTERM, wait this long for in-flight work to finish (0: stop at once; "
        f"default {DRAIN_TIMEOUT_S:.0f})",
    )
    add_backend_flags(parser)
    return run_service("worker", _start, argv, parser)


if __name__ == "__main__":
    raise SystemExit(main())
