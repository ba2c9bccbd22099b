import argparse

from lego.service_main import run_service
from lego.store import ClusterStore

from lego_dataengine.service import DataEngineService, serve


async def _start(store: ClusterStore, args: argparse.Namespace) -> DataEngineService:
    return await serve(store, args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    return run_service("dataengine", _start, argv)


if __name__ == "__main__":
    raise SystemExit(main())
