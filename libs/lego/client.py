"""A small synchronous client of the gateway's gRPC API."""

from __future__ import annotations

import grpc

from lego.errors import InvalidRequest
from lego.grpc_server import CHANNEL_OPTIONS
from lego.v1 import common_pb2, compiler_pb2, gateway_pb2, gateway_pb2_grpc
from lego.values import Scalar, to_values


class LegoError(RuntimeError):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class GatewayClient:
    def __init__(self, address: str, timeout_s: float = 600.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def generate(
        self, workflow: str, inputs: dict[str, Scalar], request_id: str = ""
    ) -> gateway_pb2.GenerateReply:
        request = gateway_pb2.GenerateRequest(
            workflow=workflow, inputs=to_values(inputs), request_id=request_id
        )
        try:
            reply: gateway_pb2.GenerateReply = self._stub.Generate(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequest("", details) from None
            raise LegoError(code, details) from None
        return reply

    def list_workflows(self) -> compiler_pb2.ListWorkflowsReply:
        reply: compiler_pb2.ListWorkflowsReply = self._stub.ListWorkflows(common_pb2.Empty(), timeout=30)
        return reply

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
