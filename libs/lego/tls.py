"""Mutual TLS for gRPC between services (optional): every server presents the cluster certificate
and, except the gateway's public port, requires one signed by the cluster CA from its callers.

A directory with `ca.pem`, `cert.pem` and `key.pem` (scripts/gen-certs makes one), named by
`--tls-dir` or LEGO_TLS_DIR, turns it on for every server and channel of the process.
LEGO_TLS_SERVER_NAME overrides the name checked against the certificate (one certificate for a
whole cluster, e.g. `lego.internal`, whatever address a service is reached at)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import grpc

TLS_DIR_ENV = "LEGO_TLS_DIR"
TLS_SERVER_NAME_ENV = "LEGO_TLS_SERVER_NAME"
FILES = ("ca.pem", "cert.pem", "key.pem")


@dataclass(frozen=True)
class TlsFiles:
    ca: bytes
    cert: bytes
    key: bytes


@lru_cache(maxsize=4)
def _read(directory: str) -> TlsFiles:
    folder = Path(directory)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"--tls-dir {directory}: missing {', '.join(missing)} (scripts/gen-certs makes them)"
        )
    ca, cert, key = ((folder / name).read_bytes() for name in FILES)
    return TlsFiles(ca, cert, key)


def tls_files() -> TlsFiles | None:
    directory = os.environ.get(TLS_DIR_ENV)
    return _read(directory) if directory else None


def server_credentials(files: TlsFiles, require_client_certificate: bool) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(files.key, files.cert)], root_certificates=files.ca, require_client_auth=require_client_certificate
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca, private_key=files.key, certificate_chain=files.cert
    )


def name_override() -> list[tuple[str, str]]:
    name = os.environ.get(TLS_SERVER_NAME_ENV)
    return [("grpc.ssl_target_name_override", name)] if name else []
