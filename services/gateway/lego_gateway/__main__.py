import argparse

from lego.service_main import base_parser, run_service
from lego.store import ClusterStore

from lego_gateway.service import GatewayService, serve


async def _start(store: ClusterStore, args: argparse.Namespace) -> GatewayService:
    return await serve(store, args.host, args.port, args.http_port)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("gateway")
    parser.add_argument("--http-port", type=int, default=None, help="serve the REST API on this port too")
    return run_service("gateway", _start, argv, parser)


if __name__ == "__main__":
    raise SystemExit(main())
