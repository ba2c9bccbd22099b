import argparse
from pathlib import Path

from lego.service_main import base_parser, run_service
from lego.store import ClusterStore

from lego_worker.agent import WorkerConfig, WorkerService, serve


async def _start(store: ClusterStore, args: argparse.Namespace) -> WorkerService:
    config = WorkerConfig(
        worker_id=args.worker_id,
        device=args.device,
        backend=args.backend,
        profile_dir=args.profile,
        time_scale=args.time_scale,
        memory_bytes=int(args.memory_gb * 10**9),
    )
    return await serve(store, args.dataengine, args.host, args.port, config)


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


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("worker")
    parser.add_argument("--dataengine", required=True, help="address of this host's data engine")
    parser.add_argument("--worker-id", default="", help="default: a random id")
    parser.add_argument("--device", default="cpu", help="cpu | cuda:N")
    add_backend_flags(parser)
    return run_service("worker", _start, argv, parser)


if __name__ == "__main__":
    raise SystemExit(main())
