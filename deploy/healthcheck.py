"""Container health check: the gRPC health service of the service this container runs.

Usage: python deploy/healthcheck.py [HOST:PORT]. Without an address it reads the JSON line the
service wrote with `--ready-file` (default /tmp/lego-ready.json, or $LEGO_READY_FILE), so a worker
on a free port (docker compose --scale, host networking) is checked too. Exit 0: SERVING.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        address = argv[1]
    else:
        ready = Path(os.environ.get("LEGO_READY_FILE", "/tmp/lego-ready.json"))
        if not ready.exists():
            print(f"unhealthy: {ready} not written yet", file=sys.stderr)
            return 1
        address = json.loads(ready.read_text())["address"]
        host, _, port = address.rpartition(":")
        address = f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]") else address
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.RpcError as error:
            print(f"unhealthy: {address}: {error.code().name}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
