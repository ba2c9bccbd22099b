import argparse
from pathlib import Path

from lego.service_main import base_parser, run_service
from lego.store import ClusterStore

from lego_gateway.auth import load_api_keys
from lego_gateway.service import GatewayOptions, GatewayService, serve


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-keys-file", type=Path, default=None, help="API keys, one per line (also: LEGO_API_KEYS=k1,k2)"
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-loopback address without API keys (anyone who can reach it can use it)",
    )


def gateway_options(args: argparse.Namespace, port: int, http_port: int | None) -> GatewayOptions:
    return GatewayOptions(
        host=args.host,
        port=port,
        http_port=http_port,
        api_keys=load_api_keys(args.api_keys_file),
        insecure_no_auth=args.insecure_no_auth,
    )


async def _start(store: ClusterStore, args: argparse.Namespace) -> GatewayService:
    return await serve(store, gateway_options(args, args.port, args.http_port))


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("gateway")
    parser.add_argument("--http-port", type=int, default=None, help="serve the REST API on this port too")
    add_gateway_flags(parser)
    return run_service("gateway", _start, argv, parser)


if __name__ == "__main__":
    raise SystemExit(main())
