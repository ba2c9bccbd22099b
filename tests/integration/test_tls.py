"""Mutual TLS between services (--tls-dir / LEGO_TLS_DIR): the cluster works over it, and a caller
without a certificate of the cluster's CA is refused everywhere but the gateway's public port."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego.client import AsyncGatewayClient
from lego.grpc_server import CHANNEL_OPTIONS
from lego.tls import TLS_DIR_ENV
from lego_cli.cluster import EmbeddedCluster

ROOT = Path(__file__).parents[2]


def make_certs(directory: Path) -> Path:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-certs"), str(directory)], check=True, capture_output=True
    )
    return directory


async def health(chan: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


def tls_channel(address: str, certs: Path, with_client_certificate: bool) -> grpc.aio.Channel:
    key_pair = {}
    if with_client_certificate:
        key_pair = {
            "private_key": (certs / "key.pem").read_bytes(),
            "certificate_chain": (certs / "cert.pem").read_bytes(),
        }
    credentials = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes(), **key_pair)
    return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


async def test_a_cluster_runs_over_mutual_tls_and_refuses_strangers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster_certs = make_certs(tmp_path / "cluster")
    stranger_certs = make_certs(tmp_path / "stranger")
    monkeypatch.setenv(TLS_DIR_ENV, str(cluster_certs))
    serving = health_pb2.HealthCheckResponse.SERVING
    async with EmbeddedCluster(workers=1) as cluster:
        async with AsyncGatewayClient(cluster.gateway_address) as client:
            image = await client.generate(
                TINY_SD15_TXT2IMG, {"prompt": "over TLS", "steps": 2, "height": 64, "width": 64}
            )
        assert image.width == 64 and image.png
        internal = cluster.coordinator_address
        async with tls_channel(internal, cluster_certs, with_client_certificate=True) as chan:
            assert await health(chan) == serving
        refused = [
            grpc.aio.insecure_channel(internal),
            tls_channel(internal, cluster_certs, with_client_certificate=False),
            tls_channel(internal, stranger_certs, with_client_certificate=True),
            tls_channel(cluster.compiler_address, stranger_certs, with_client_certificate=True),
        ]
        for chan in refused:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health(chan)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            await chan.close()
        # The gateway's public port: TLS, but API keys (not certificates) authenticate its clients.
        async with tls_channel(cluster.gateway_address, cluster_certs, with_client_certificate=False) as chan:
            assert await health(chan) == serving
