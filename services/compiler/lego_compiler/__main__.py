import argparse

from lego.model_sources import SourcePolicy
from lego.service_main import add_model_roots_flag, base_parser, run_service
from lego.store import ClusterStore

from lego_compiler.service import CompilerService, serve


async def _start(store: ClusterStore, args: argparse.Namespace) -> CompilerService:
    return await serve(store, args.host, args.port, SourcePolicy.from_env(args.model_roots))


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("compiler")
    add_model_roots_flag(parser)
    return run_service("compiler", _start, argv, parser)


if __name__ == "__main__":
    raise SystemExit(main())
