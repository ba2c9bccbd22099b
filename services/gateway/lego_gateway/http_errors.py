"""Every HTTP error is one JSON shape: `{"error": {"code", "message", "field", "type", "param"}}`
(`type` and `param` are what OpenAI's clients read; `field` and `param` name the input at fault)."""

from __future__ import annotations

from typing import Any

import grpc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from lego.errors import InvalidRequest
from starlette.exceptions import HTTPException as StarletteHTTPException

from lego_gateway.tracking import GatewayError

RETRY_AFTER_S = 1  # seconds a client should wait after a 429 (the cluster is at capacity)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def error_body(code: str, message: str, status: int, field: str = "") -> dict[str, Any]:
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {
        "error": {
            "code": code,
            "message": message,
            "field": field,
            "type": error_type,
            "param": field or None,
        }
    }


def error_json(code: grpc.StatusCode, message: str, field: str = "") -> JSONResponse:
    status = HTTP_STATUS.get(code, 500)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    return JSONResponse(error_body(code.name, message, status, field), status_code=status, headers=headers)


async def error_response(request: Request, error: Exception) -> JSONResponse:
    if isinstance(error, InvalidRequest):
        return error_json(grpc.StatusCode.INVALID_ARGUMENT, error.message, error.field)
    assert isinstance(error, GatewayError)
    return error_json(error.code, error.message, error.field)


STATUS_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED"}


async def http_error_response(request: Request, error: Exception) -> JSONResponse:
    """Starlette's own refusals (an unknown path, a wrong method, a body that is not JSON)."""
    assert isinstance(error, StarletteHTTPException)
    code = STATUS_CODES.get(error.status_code, "INVALID_ARGUMENT" if error.status_code < 500 else "INTERNAL")
    field = "body" if error.status_code == 400 else ""
    body = error_body(code, str(error.detail), error.status_code, field)
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


async def validation_error_response(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
    # Pydantic names the union member tried last (inputs.steps.str): the client's field is inputs.steps.
    skipped = {"body", "query", "path", "header", "str", "int", "float", "bool"}
    location = [str(part) for part in first.get("loc", ()) if part not in skipped]
    field = ".".join(location)
    value = first.get("input")
    shown = "" if value is None or isinstance(value, dict | list) else f", got {str(value)[:60]!r}"
    message = f"{field or 'request'}: {first.get('msg', 'invalid')}{shown}"
    return error_json(grpc.StatusCode.INVALID_ARGUMENT, message, field)
