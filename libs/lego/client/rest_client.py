"""Clients of the gateway's REST API (httpx): `RestClient` (blocking) and `AsyncRestClient`.
Progress comes from the Server-Sent Events of `GET /v1/requests/{id}/events`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import grpc
import httpx

from lego.client import models
from lego.client.errors import LegoError, from_http_error
from lego.client.models import ClusterInfo, GeneratedImage, Progress, RequestInfo, WorkflowInfo
from lego.values import Scalar

CONNECT_TIMEOUT_S = 10.0
RESULT = {"wait": "true", "response_format": "b64_json"}  # the image with its size, as JSON


def requests_path(request_id: str, suffix: str = "") -> str:
    return f"/v1/requests/{quote(request_id, safe='')}{suffix}"


def submit_kwargs(
    workflow: str,
    inputs: dict[str, Scalar],
    slo_ms: float,
    request_id: str,
    idempotency_key: str,
    **extra: str,
) -> dict[str, Any]:
    body = {"workflow": workflow, "inputs": inputs, "request_id": request_id, "slo_ms": slo_ms, **extra}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return {"json": body, "headers": headers}


def events_params(node_events: bool) -> dict[str, str]:
    return {"node_events": "true" if node_events else "false"}


def checked_json(response: httpx.Response) -> Any:
    """The body of a successful (read) response; a `LegoError` for an error response."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if response.is_error:
        raise from_http_error(response.status_code, body)
    return body


def transport_error(error: httpx.TransportError) -> LegoError:
    code = grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(error, httpx.TimeoutException) else None
    return LegoError(code or grpc.StatusCode.UNAVAILABLE, f"{type(error).__name__}: {error}")


class EventStream:
    """Lines of a Server-Sent Events stream in, one `Progress` out per event (its `data:` JSON)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> Progress | None:
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
        elif not line and self._data:
            data, self._data = "\n".join(self._data), []
            return models.progress_json(json.loads(data))
        return None  # `event:` repeats the data's kind; comments and ids are not used


class _Options:
    def __init__(self, address: str, timeout_s: float, api_key: str | None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._config: dict[str, Any] = {
            "base_url": address if "://" in address else f"http://{address}",
            "timeout": httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S)),
            "headers": {"Authorization": f"Bearer {api_key}"} if api_key else {},
        }


class RestClient(_Options):
    """Blocking REST client with the same methods and results as `GatewayClient`."""

    def __init__(self, address: str, timeout_s: float = 600.0, *, api_key: str | None = None) -> None:
        super().__init__(address, timeout_s, api_key)
        self._http = httpx.Client(**self._config)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return checked_json(self._http.request(method, path, **kwargs))
        except httpx.TransportError as error:
            raise transport_error(error) from None

    def generate(
        self,
        workflow: str,
        inputs: dict[str, Scalar],
        *,
        slo_ms: float = 0.0,
        request_id: str = "",
        idempotency_key: str = "",
    ) -> GeneratedImage:
        kwargs = submit_kwargs(
            workflow, inputs, slo_ms, request_id, idempotency_key, response_format="b64_json"
        )
        return models.generated_image_json(self._call("POST", "/v1/generate", **kwargs))

    def submit(
        self,
        workflow: str,
        inputs: dict[str, Scalar],
        *,
        slo_ms: float = 0.0,
        request_id: str = "",
        idempotency_key: str = "",
    ) -> RequestInfo:
        kwargs = submit_kwargs(workflow, inputs, slo_ms, request_id, idempotency_key)
        return models.request_info_json(self._call("POST", "/v1/requests", **kwargs))

    def progress(self, request_id: str, *, node_events: bool = False) -> Iterator[Progress]:
        stream = EventStream()
        path, params = requests_path(request_id, "/events"), events_params(node_events)
        try:
            with self._http.stream("GET", path, params=params) as response:
                if response.is_error:
                    response.read()
                    checked_json(response)
                for line in response.iter_lines():
                    event = stream.feed(line)
                    if event is not None:
                        yield event
                        if event.final:
                            return
        except httpx.TransportError as error:
            raise transport_error(error) from None

    def result(self, request_id: str) -> GeneratedImage:
        path = requests_path(request_id, "/image")
        return models.generated_image_json(self._call("GET", path, params=RESULT))

    def status(self, request_id: str) -> RequestInfo:
        return models.request_info_json(self._call("GET", requests_path(request_id)))

    def cancel(self, request_id: str) -> RequestInfo:
        return models.request_info_json(self._call("POST", requests_path(request_id, "/cancel")))

    def workflows(self) -> list[WorkflowInfo]:
        return models.workflow_infos_json(self._call("GET", "/v1/workflows"))

    def cluster(self) -> ClusterInfo:
        return models.cluster_info_json(self._call("GET", "/v1/cluster"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRestClient(_Options):
    """The same as `RestClient`, on asyncio."""

    def __init__(self, address: str, timeout_s: float = 600.0, *, api_key: str | None = None) -> None:
        super().__init__(address, timeout_s, api_key)
        self._http = httpx.AsyncClient(**self._config)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return checked_json(await self._http.request(method, path, **kwargs))
        except httpx.TransportError as error:
            raise transport_error(error) from None

    async def generate(
        self,
        workflow: str,
        inputs: dict[str, Scalar],
        *,
        slo_ms: float = 0.0,
        request_id: str = "",
        idempotency_key: str = "",
    ) -> GeneratedImage:
        kwargs = submit_kwargs(
            workflow, inputs, slo_ms, request_id, idempotency_key, response_format="b64_json"
        )
        return models.generated_image_json(await self._call("POST", "/v1/generate", **kwargs))

    async def submit(
        self,
        workflow: str,
        inputs: dict[str, Scalar],
        *,
        slo_ms: float = 0.0,
        request_id: str = "",
        idempotency_key: str = "",
    ) -> RequestInfo:
        kwargs = submit_kwargs(workflow, inputs, slo_ms, request_id, idempotency_key)
        return models.request_info_json(await self._call("POST", "/v1/requests", **kwargs))

    async def progress(self, request_id: str, *, node_events: bool = False) -> AsyncIterator[Progress]:
        stream = EventStream()
        path, params = requests_path(request_id, "/events"), events_params(node_events)
        try:
            async with self._http.stream("GET", path, params=params) as response:
                if response.is_error:
                    await response.aread()
                    checked_json(response)
                async for line in response.aiter_lines():
                    event = stream.feed(line)
                    if event is not None:
                        yield event
                        if event.final:
                            return
        except httpx.TransportError as error:
            raise transport_error(error) from None

    async def result(self, request_id: str) -> GeneratedImage:
        path = requests_path(request_id, "/image")
        return models.generated_image_json(await self._call("GET", path, params=RESULT))

    async def status(self, request_id: str) -> RequestInfo:
        return models.request_info_json(await self._call("GET", requests_path(request_id)))

    async def cancel(self, request_id: str) -> RequestInfo:
        return models.request_info_json(await self._call("POST", requests_path(request_id, "/cancel")))

    async def workflows(self) -> list[WorkflowInfo]:
        return models.workflow_infos_json(await self._call("GET", "/v1/workflows"))

    async def cluster(self) -> ClusterInfo:
        return models.cluster_info_json(await self._call("GET", "/v1/cluster"))

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRestClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
