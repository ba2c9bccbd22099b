import argparse

from lego.service_main import run_service
from lego.store import ClusterStore

from lego_compiler.service import CompilerService, serve


async def _start(store: ClusterStore, args: argparse.Namespace) -> CompilerService:
    return await serve(store, args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    return run_service("compiler", _start, argv)


if __name__ == "__main__":
    raise SystemExit(main())
