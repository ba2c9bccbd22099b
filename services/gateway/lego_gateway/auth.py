"""API keys: where they come from, when a gateway may run without them, and checking them on gRPC
calls (an interceptor) and HTTP/websocket requests (an ASGI middleware)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send

from lego_gateway.http_errors import error_body

KEYS_ENV = "LEGO_API_KEYS"
# Reachable without a key: liveness, the API description, and the web page (its calls need one).
PUBLIC_HTTP_PATHS = ("/healthz", "/openapi.json", "/docs", "/redoc", "/static/")
PUBLIC_GRPC_PREFIX = "/grpc.health.v1.Health/"
UNAUTHENTICATED = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"


class ApiKeys:
    def __init__(self, keys: frozenset[str]) -> None:
        self._keys = keys

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """True when no keys are configured, or the header is `Bearer <one of the keys>`."""
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        return any(hmac.compare_digest(token.encode(), key.encode()) for key in self._keys)


def load_api_keys(keys_file: Path | None = None, environ: Mapping[str, str] = os.environ) -> ApiKeys:
    """Keys from `keys_file` (one per line, `#` comments) and the comma-separated LEGO_API_KEYS."""
    keys = {key.strip() for key in environ.get(KEYS_ENV, "").split(",") if key.strip()}
    if keys_file is not None:
        for line in keys_file.read_text().splitlines():
            key = line.split("#", 1)[0].strip()
            if key:
                keys.add(key)
    return ApiKeys(frozenset(keys))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: ApiKeys, insecure_no_auth: bool) -> None:
    """Refuse to expose an unauthenticated gateway beyond this machine unless told to."""
    if not keys.required and not is_loopback(host) and not insecure_no_auth:
        raise ValueError(
            f"refusing to serve on {host} without API keys: set {KEYS_ENV} or --api-keys-file, "
            "or pass --insecure-no-auth"
        )


class GrpcAuth(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = dict(handler_call_details.invocation_metadata or ())
        if handler_call_details.method.startswith(PUBLIC_GRPC_PREFIX) or self.keys.allows(
            metadata.get("authorization")
        ):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)

    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        refuse,
        handler.request_deserializer if handler else None,
        handler.response_serializer if handler else None,
    )


class HttpAuth:
    """ASGI middleware: every HTTP request and websocket outside PUBLIC_HTTP_PATHS (and `/`) needs a key."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401, "reason": "unauthenticated"})
            return
        body = json.dumps(error_body("UNAUTHENTICATED", UNAUTHENTICATED, 401)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _allowed(self, scope: Scope) -> bool:
        path: str = scope.get("path", "")
        if path == "/" or path.startswith(PUBLIC_HTTP_PATHS):
            return True
        headers = dict(scope.get("headers") or ())
        authorization = headers.get(b"authorization")
        return self.keys.allows(authorization.decode("latin-1") if authorization else None)
