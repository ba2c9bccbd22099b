"""Clients of the gateway's gRPC API: `GatewayClient` (blocking) and `AsyncGatewayClient` (grpc.aio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import grpc

from lego.client import models
from lego.client.errors import from_rpc_error
from lego.client.models import ClusterInfo, GeneratedImage, Progress, RequestInfo, WorkflowInfo
from lego.grpc_server import channel, sync_channel
from lego.v1 import common_pb2, compiler_pb2, gateway_pb2, gateway_pb2_grpc
from lego.values import Scalar, to_values

T = TypeVar("T")


def generate_request(
    workflow: str, inputs: dict[str, Scalar], slo_ms: float, request_id: str, idempotency_key: str
) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        workflow=workflow,
        inputs=to_values(inputs),
        request_id=request_id,
        slo_ms=slo_ms,
        idempotency_key=idempotency_key,
    )


def ref(request_id: str, node_events: bool = False) -> gateway_pb2.RequestRef:
    return gateway_pb2.RequestRef(request_id=request_id, node_events=node_events)


class _Options:
    def __init__(self, address: str, timeout_s: float, api_key: str | None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _kwargs(self) -> dict[str, Any]:
        return {"timeout": self.timeout_s, "metadata": self._metadata}


class GatewayClient(_Options):
    """Blocking gRPC client. Errors raise `LegoError` (`InvalidInput` for INVALID_ARGUMENT)."""

    def __init__(self, address: str, timeout_s: float = 600.0, *, api_key: str | None = None) -> None:
        super().__init__(address, timeout_s, api_key)
        self._channel = sync_channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def _call(self, method: Callable[..., T], request: Any) -> T:
        try:
            return method(request, **self._kwargs())
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def generate(
        self,
        workflow: str,
        inputs: dict[str, Scalar],
        *,
        slo_ms: float = 0.0,
        request_id: str = "",
        idempotency_key: str = "",
    ) -> GeneratedImage:
        """Run a request to completion: its PNG."""
        request = generate_request(workflow, inputs, slo_ms, request_id, idempotency_key)
        return models.generated_image(self._call(self._stub.Generate, request))

    def submit(
        self,
        workflow: str,
        inputs: dict[str, Scalar],
        *,
        slo_ms: float = 0.0,
        request_id: str = "",
        idempotency_key: str = "",
    ) -> RequestInfo:
        """Admit a request and return at once; follow it with `progress`, fetch it with `result`."""
        request = generate_request(workflow, inputs, slo_ms, request_id, idempotency_key)
        return models.request_info(self._call(self._stub.Submit, request))

    def progress(self, request_id: str, *, node_events: bool = False) -> Iterator[Progress]:
        """Every event of the request from its first, until (and with) the final one."""
        call = self._stub.Watch(ref(request_id, node_events), **self._kwargs())
        try:
            for event in call:
                yield models.progress(event)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    def result(self, request_id: str) -> GeneratedImage:
        """Wait for the request to finish: its image, or `LegoError` (CANCELLED, ...)."""
        return models.generated_image(self._call(self._stub.GetResult, ref(request_id)))

    def status(self, request_id: str) -> RequestInfo:
        return models.request_info(self._call(self._stub.GetStatus, ref(request_id)))

    def cancel(self, request_id: str) -> RequestInfo:
        return models.request_info(self._call(self._stub.Cancel, ref(request_id)))

    def workflows(self) -> list[WorkflowInfo]:
        return models.workflow_infos(self.list_workflows())

    def list_workflows(self) -> compiler_pb2.ListWorkflowsReply:
        """The reply itself (the older form of `workflows()`)."""
        return self._call(self._stub.ListWorkflows, common_pb2.Empty())

    def cluster(self) -> ClusterInfo:
        return models.cluster_info(self._call(self._stub.ClusterStatus, common_pb2.Empty()))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGatewayClient(_Options):
    """The same as `GatewayClient`, on grpc.aio: create and use it on one event loop."""

    def __init__(self, address: str, timeout_s: float = 600.0, *, api_key: str | None = None) -> None:
        super().__init__(address, timeout_s, api_key)
        self._channel = channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    async def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return await method(request, **self._kwargs())
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def generate(
        self,
        workflow: str,
        inputs: dict[str, Scalar],
        *,
        slo_ms: float = 0.0,
        request_id: str = "",
        idempotency_key: str = "",
    ) -> GeneratedImage:
        request = generate_request(workflow, inputs, slo_ms, request_id, idempotency_key)
        return models.generated_image(await self._call(self._stub.Generate, request))

    async def submit(
        self,
        workflow: str,
        inputs: dict[str, Scalar],
        *,
        slo_ms: float = 0.0,
        request_id: str = "",
        idempotency_key: str = "",
    ) -> RequestInfo:
        request = generate_request(workflow, inputs, slo_ms, request_id, idempotency_key)
        return models.request_info(await self._call(self._stub.Submit, request))

    async def progress(self, request_id: str, *, node_events: bool = False) -> AsyncIterator[Progress]:
        call = self._stub.Watch(ref(request_id, node_events), **self._kwargs())
        try:
            async for event in call:
                yield models.progress(event)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def result(self, request_id: str) -> GeneratedImage:
        return models.generated_image(await self._call(self._stub.GetResult, ref(request_id)))

    async def status(self, request_id: str) -> RequestInfo:
        return models.request_info(await self._call(self._stub.GetStatus, ref(request_id)))

    async def cancel(self, request_id: str) -> RequestInfo:
        return models.request_info(await self._call(self._stub.Cancel, ref(request_id)))

    async def workflows(self) -> list[WorkflowInfo]:
        return models.workflow_infos(await self._call(self._stub.ListWorkflows, common_pb2.Empty()))

    async def cluster(self) -> ClusterInfo:
        return models.cluster_info(await self._call(self._stub.ClusterStatus, common_pb2.Empty()))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncGatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
