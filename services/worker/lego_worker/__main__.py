import argparse

from lego.service_main import base_parser, run_service
from lego.store import ClusterStore

from lego_worker.agent import WorkerService, serve


async def _start(store: ClusterStore, args: argparse.Namespace) -> WorkerService:
    return await serve(store, args.dataengine, args.host, args.port, args.worker_id, args.device)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("worker")
    parser.add_argument("--dataengine", required=True, help="address of this host's data engine")
    parser.add_argument("--worker-id", default="", help="default: a random id")
    parser.add_argument("--device", default="cpu", help="cpu | cuda:N")
    return run_service("worker", _start, argv, parser)


if __name__ == "__main__":
    raise SystemExit(main())
