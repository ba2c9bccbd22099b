import argparse

from lego.service_main import run_service
from lego.store import ClusterStore

from lego_coordinator.service import CoordinatorService, serve


async def _start(store: ClusterStore, args: argparse.Namespace) -> CoordinatorService:
    return await serve(store, args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    return run_service("coordinator", _start, argv)


if __name__ == "__main__":
    raise SystemExit(main())
