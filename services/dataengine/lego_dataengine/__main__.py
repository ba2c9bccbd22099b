"""The data engine: a per-host tensor store that workers publish to and read from."""

import argparse

from lego.dataplane import CHUNK_BYTES
from lego.service_main import base_parser, run_service
from lego.store import ClusterStore

from lego_dataengine.service import DEFAULT_ARENA_MIB, DataEngineService, serve


async def _start(store: ClusterStore, args: argparse.Namespace) -> DataEngineService:
    chunk_bytes = args.chunk_kib * 1024
    return await serve(store, args.host, args.port, arena_mib=args.arena_mib, chunk_bytes=chunk_bytes)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("dataengine")
    parser.add_argument(
        "--arena-mib",
        type=int,
        default=DEFAULT_ARENA_MIB,
        help=f"shared-memory arena size, allocated once at start (default: {DEFAULT_ARENA_MIB})",
    )
    parser.add_argument(
        "--chunk-kib",
        type=int,
        default=CHUNK_BYTES // 1024,
        help=f"chunk size of the tensor streams this engine sends (default: {CHUNK_BYTES // 1024})",
    )
    return run_service("dataengine", _start, argv, parser)


if __name__ == "__main__":
    raise SystemExit(main())
