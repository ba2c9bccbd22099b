"""The Python SDK of a LegoDiffusion gateway: four clients with the same methods and results.

- `GatewayClient` (gRPC, blocking) and `AsyncGatewayClient` (gRPC, asyncio)
- `RestClient` (HTTP, blocking) and `AsyncRestClient` (HTTP, asyncio)

Each has `generate`, `submit`, `progress` (an iterator of `Progress` events), `result`, `status`,
`cancel`, `workflows` and `cluster`, is a (async) context manager, and takes an optional `api_key`.
Every failure raises `LegoError` (`.code` a grpc.StatusCode, `.message`, `.field`); invalid inputs
raise its subclass `InvalidInput`, which is also a `lego.errors.InvalidRequest`.

    with GatewayClient("127.0.0.1:50051") as client:
        request = client.submit("tiny-sd15-txt2img", {"prompt": "a red circle", "steps": 8})
        for event in client.progress(request.request_id):
            print(event.kind, event.step, event.total)
        image = client.result(request.request_id)
"""

from lego.client.errors import InvalidInput, LegoError
from lego.client.grpc_client import AsyncGatewayClient, GatewayClient
from lego.client.models import (
    ClusterInfo,
    GeneratedImage,
    Progress,
    RequestInfo,
    SloWindow,
    WorkerInfo,
    WorkflowInfo,
)
from lego.client.rest_client import AsyncRestClient, RestClient

__all__ = [
    "AsyncGatewayClient",
    "AsyncRestClient",
    "ClusterInfo",
    "GatewayClient",
    "GeneratedImage",
    "InvalidInput",
    "LegoError",
    "Progress",
    "RequestInfo",
    "RestClient",
    "SloWindow",
    "WorkerInfo",
    "WorkflowInfo",
]
