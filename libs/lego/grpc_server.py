"""Starting a grpc.aio server with the standard health and reflection services, on loopback by default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Large HTTP/2 stream windows and frames: a tensor stream runs at full speed from its first chunk
    # instead of waiting for the window to grow (64 MiB data-engine pull: 0.44 -> 0.67 GB/s here).
    ("grpc.http2.lookahead_bytes", 64 * 1024 * 1024),
    ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    address: str
    health: health.aio.HealthServicer

    async def stop(self, grace_s: float = 0.5) -> None:
        await self.server.stop(grace_s)


async def start_server(
    add_services: Callable[[grpc.aio.Server], None],
    service_names: list[str],
    host: str = "127.0.0.1",
    port: int = 0,
) -> RunningServer:
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    add_services(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    display_host = f"[{host}]" if ":" in host else host
    return RunningServer(server, f"{display_host}:{bound}", health_servicer)


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
