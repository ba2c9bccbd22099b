"""The Gateway gRPC servicer and the REST front end (FastAPI), both thin shells over GatewayCore."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import grpc
import structlog
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from lego.grpc_server import RunningServer, start_server
from lego.store import ClusterStore, cancel_task
from lego.v1 import common_pb2, compiler_pb2, gateway_pb2, gateway_pb2_grpc
from lego.values import to_values
from pydantic import BaseModel, Field

from lego_gateway.core import GatewayCore, GatewayError

log = structlog.get_logger("lego.gateway")
RETRY_AFTER_S = 1  # seconds a client should wait after a 429 (the cluster is at capacity)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GenerateReply:
        try:
            result = await self.core.generate(
                request.workflow, dict(request.inputs.items()), request.request_id, request.slo_ms
            )
        except GatewayError as error:
            await context.abort(error.code, error.message)
        return gateway_pb2.GenerateReply(
            request_id=result.request_id,
            png=result.png,
            width=result.width,
            height=result.height,
            latency_s=result.latency_s,
            nodes_executed=result.nodes_executed,
            execution_s=result.execution_s,
            slo_s=result.slo_s,
        )

    async def ListWorkflows(
        self, request: common_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> compiler_pb2.ListWorkflowsReply:
        return await self.core.list_workflows()


class GenerateBody(BaseModel):
    workflow: str = Field(description="a registered workflow")
    inputs: dict[str, str | int | float | bool] = Field(default_factory=dict)
    request_id: str = ""
    slo_ms: float = Field(default=0.0, ge=0, description="latency objective; 0: the workflow's default")


def build_rest_app(core: GatewayCore) -> FastAPI:
    app = FastAPI(title="LegoDiffusion gateway", version="0.1.0")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/workflows")
    async def workflows() -> dict[str, Any]:
        reply = await core.list_workflows()
        return {"workflows": [{"name": w.name, "description": w.description} for w in reply.workflows]}

    @app.post("/v1/generate", responses={200: {"content": {"image/png": {}}}})
    async def generate(body: GenerateBody) -> Response:
        try:
            result = await core.generate(body.workflow, to_values(body.inputs), body.request_id, body.slo_ms)
        except GatewayError as error:
            exhausted = error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            return JSONResponse(
                {"error": {"code": error.code.name, "message": error.message}},
                status_code=HTTP_STATUS.get(error.code, 500),
                headers={"Retry-After": str(RETRY_AFTER_S)} if exhausted else None,
            )
        headers = {"X-Request-Id": result.request_id, "X-Latency-S": f"{result.latency_s:.4f}"}
        return Response(result.png, media_type="image/png", headers=headers)

    return app


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the process owner decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayService:
    def __init__(
        self,
        server: RunningServer,
        http: _EmbeddedUvicorn | None,
        http_task: asyncio.Task[None] | None,
        http_address: str,
    ) -> None:
        self.server = server
        self.address = server.address
        self.http_address = http_address
        self._http = http
        self._http_task = http_task

    async def stop(self) -> None:
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._http_task), 3)
            await cancel_task(self._http_task)
        await self.server.stop()


async def serve(
    store: ClusterStore, host: str = "127.0.0.1", port: int = 0, http_port: int | None = None
) -> GatewayService:
    core = GatewayCore(store)
    servicer = GatewayServicer(core)
    server = await start_server(
        lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s),
        [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name],
        host,
        port,
    )
    http = None
    http_task = None
    http_address = ""
    if http_port is not None:
        config = uvicorn.Config(
            build_rest_app(core), host=host, port=http_port, log_level="warning", lifespan="off"
        )
        http = _EmbeddedUvicorn(config)
        http_task = asyncio.create_task(http.serve())
        while not http.started:
            if http_task.done():
                http_task.result()
                raise OSError(f"REST gateway could not bind {host}:{http_port}")
            await asyncio.sleep(0.02)
        bound_port = http.servers[0].sockets[0].getsockname()[1]
        http_address = f"{host}:{bound_port}"
    log.info("gateway_started", address=server.address, http=http_address)
    return GatewayService(server, http, http_task, http_address)
