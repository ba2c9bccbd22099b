"""The shared `main()` of every service process: parse flags, open the store, serve until signalled."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from lego.errors import StoreUnavailable
from lego.log import configure_logging
from lego.metrics import serve_metrics
from lego.store import ClusterStore, open_store
from lego.tls import TLS_DIR_ENV


class Stoppable(Protocol):
    address: str

    async def stop(self) -> None: ...


Starter = Callable[[ClusterStore, argparse.Namespace], Awaitable[Stoppable]]


def base_parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m lego_{name}", description=f"Run the {name} service.")
    parser.add_argument("--store", default="memory", help="memory | etcd://HOST:PORT (default: memory)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (default: any free port)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        help="also write the JSON line with the service's address here (container health checks)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics on this port (0: any free port; default: off)",
    )
    parser.add_argument(
        "--tls-dir",
        type=Path,
        default=None,
        help="mutual TLS between services: a directory with ca.pem, cert.pem, key.pem (also LEGO_TLS_DIR)",
    )
    return parser


def add_model_roots_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-roots",
        default=None,
        help="comma-separated directories (/models) and hub ids or prefixes (org/) models may come from; "
        "default: LEGO_MODEL_ROOTS, else any",
    )


async def serve_until_signalled(name: str, start: Starter, args: argparse.Namespace) -> int:
    try:
        store = await open_store(args.store)
    except (StoreUnavailable, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        service = await start(store, args)
    except (ValueError, OSError) as error:  # a refused configuration or an address in use
        print(f"error: {error}", file=sys.stderr)
        await store.close()
        return 2
    line = {"service": name, "address": service.address}
    metrics = None
    if args.metrics_port is not None:
        metrics = serve_metrics(name, args.host, args.metrics_port)
        line["metrics"] = metrics.address
    # One JSON line on stdout says where the service listens (scripts and tests read it).
    print(json.dumps(line), flush=True)
    if args.ready_file is not None:
        args.ready_file.write_text(json.dumps(line) + "\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await service.stop()
    if metrics is not None:
        metrics.stop()
    await store.close()
    return 0


def run_service(
    name: str, start: Starter, argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> int:
    args = (parser or base_parser(name)).parse_args(argv)
    if args.tls_dir is not None:
        os.environ[TLS_DIR_ENV] = str(args.tls_dir)  # every server and channel of this process
    configure_logging(args.log_level)
    return asyncio.run(serve_until_signalled(name, start, args))
