"""The one error every client raises: a gRPC status code (REST codes mapped by name), a message, and
the input at fault, if any."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from lego.errors import InvalidRequest, field_from_metadata

# The HTTP status a gateway answers each code with (lego_gateway.http_errors), for bodies without JSON.
HTTP_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(code: grpc.StatusCode | str | int) -> grpc.StatusCode:
    """A code from its enum, its name (REST's `error.code`) or its number (a proto's `code`)."""
    if isinstance(code, grpc.StatusCode):
        return code
    for member in grpc.StatusCode:
        if member.name == code or member.value[0] == code:
            return member
    return grpc.StatusCode.UNKNOWN


class LegoError(RuntimeError):
    """What a gateway answered instead of a result. `code` is a grpc.StatusCode on every client."""

    def __init__(self, code: grpc.StatusCode | str | int, message: str, field: str = "") -> None:
        self.code = status_code(code)
        self.message = message
        self.field = field
        super().__init__(f"{self.code.name}: {message}")


class InvalidInput(LegoError, InvalidRequest):
    """INVALID_ARGUMENT: also an `InvalidRequest`, as the gateway itself raises for bad inputs."""


def lego_error(code: grpc.StatusCode | str | int, message: str, field: str = "") -> LegoError:
    code = status_code(code)
    kind = InvalidInput if code == grpc.StatusCode.INVALID_ARGUMENT else LegoError
    return kind(code, message, field)


def from_rpc_error(error: grpc.RpcError) -> LegoError:
    """A failed call of either gRPC API (sync or aio); the field comes in trailing metadata."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    return lego_error(code, details, field_from_metadata(error.trailing_metadata()))


def from_http_error(status: int, body: Any) -> LegoError:
    """An HTTP error: `{"error": {"code", "message", "field"}}`, or only its status from elsewhere."""
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        code = HTTP_CODES.get(status, grpc.StatusCode.UNKNOWN if status < 500 else grpc.StatusCode.INTERNAL)
        return lego_error(code, f"HTTP {status}: {str(body)[:200]}")
    return lego_error(
        str(error.get("code") or HTTP_CODES.get(status, "UNKNOWN")),
        str(error.get("message", "")),
        str(error.get("field") or ""),
    )
