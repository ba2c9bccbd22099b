"""ComfyUI's HTTP API (being written)."""

from __future__ import annotations

from fastapi import FastAPI

from lego_gateway.core import GatewayCore


def add_routes(app: FastAPI, core: GatewayCore) -> None:
    return None
