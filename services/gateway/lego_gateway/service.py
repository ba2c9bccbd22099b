"""The Gateway gRPC servicer and the process around it: gRPC and (optionally) HTTP on one event loop,
both thin shells over GatewayCore."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
import structlog
import uvicorn
from lego.errors import InvalidRequest, field_metadata
from lego.grpc_server import RunningServer, start_server
from lego.store import ClusterStore, cancel_task
from lego.v1 import common_pb2, compiler_pb2, gateway_pb2, gateway_pb2_grpc
from lego.values import Scalar, from_value

from lego_gateway.auth import ApiKeys, GrpcAuth, HttpAuth, check_bind
from lego_gateway.body_limit import BodyLimit
from lego_gateway.core import GatewayCore
from lego_gateway.limits import GatewayLimits, check_inputs
from lego_gateway.rest import build_rest_app
from lego_gateway.tracking import GatewayError, GenerateResult

log = structlog.get_logger("lego.gateway")


def scalar_inputs(inputs: dict[str, common_pb2.Value], limits: GatewayLimits) -> None:
    given: dict[str, Scalar] = {}
    for name, value in inputs.items():
        scalar = from_value(value)
        if not isinstance(scalar, str | int | float | bool):
            raise InvalidRequest(name, f"{name} must be a string, number or boolean")
        given[name] = scalar
    check_inputs(given, limits)


def generate_reply(result: GenerateResult) -> gateway_pb2.GenerateReply:
    return gateway_pb2.GenerateReply(
        request_id=result.request_id,
        png=result.png,
        width=result.width,
        height=result.height,
        latency_s=result.latency_s,
        nodes_executed=result.nodes_executed,
        execution_s=result.execution_s,
        slo_s=result.slo_s,
        unpatched_calls=result.unpatched_calls,
        skipped_steps=result.skipped_steps,
    )


async def _abort(context: grpc.aio.ServicerContext, error: GatewayError | InvalidRequest) -> NoReturn:
    if isinstance(error, InvalidRequest):
        error = GatewayError(grpc.StatusCode.INVALID_ARGUMENT, error.message, error.field)
    await context.abort(error.code, error.message, trailing_metadata=field_metadata(error.field))
    raise AssertionError("unreachable: abort raises")


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, core: GatewayCore, limits: GatewayLimits) -> None:
        self.core = core
        self.limits = limits

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GenerateReply:
        tracked = await self.Submit(request, context)
        return await self.GetResult(gateway_pb2.RequestRef(request_id=tracked.request_id), context)

    async def Submit(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RequestStatus:
        try:
            inputs = dict(request.inputs.items())
            scalar_inputs(inputs, self.limits)
            tracked = await self.core.submit(
                request.workflow, inputs, request.request_id, request.slo_ms, request.idempotency_key
            )
        except (GatewayError, InvalidRequest) as error:
            await _abort(context, error)
        return tracked.status()

    async def Watch(
        self, request: gateway_pb2.RequestRef, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.ProgressEvent]:
        try:
            tracked = self.core.requests.get(request.request_id)
        except GatewayError as error:
            await _abort(context, error)
        async for event in tracked.follow(request.node_events):
            yield event

    async def GetStatus(
        self, request: gateway_pb2.RequestRef, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RequestStatus:
        try:
            return self.core.requests.get(request.request_id).status()
        except GatewayError as error:
            await _abort(context, error)

    async def GetResult(
        self, request: gateway_pb2.RequestRef, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GenerateReply:
        try:
            result = await self.core.requests.get(request.request_id).wait()
        except GatewayError as error:
            await _abort(context, error)
        return generate_reply(result)

    async def Cancel(
        self, request: gateway_pb2.RequestRef, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RequestStatus:
        try:
            return (await self.core.cancel(request.request_id)).status()
        except GatewayError as error:
            await _abort(context, error)

    async def ListWorkflows(
        self, request: common_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> compiler_pb2.ListWorkflowsReply:
        return await self.core.list_workflows()

    async def RegisterWorkflow(
        self, request: compiler_pb2.WorkflowSpec, context: grpc.aio.ServicerContext
    ) -> compiler_pb2.RegisterWorkflowReply:
        try:
            return await self.core.register_workflow(request)
        except GatewayError as error:
            await _abort(context, error)

    async def ClusterStatus(
        self, request: common_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ClusterView:
        try:
            return await self.core.cluster_view()
        except GatewayError as error:
            await _abort(context, error)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the process owner decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class GatewayOptions:
    host: str = "127.0.0.1"
    port: int = 0
    http_port: int | None = None  # None: no HTTP front
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys(frozenset()))
    insecure_no_auth: bool = False
    limits: GatewayLimits = field(default_factory=GatewayLimits)


class GatewayService:
    def __init__(
        self,
        server: RunningServer,
        core: GatewayCore,
        http: _EmbeddedUvicorn | None,
        http_task: asyncio.Task[None] | None,
        http_address: str,
    ) -> None:
        self.server = server
        self.core = core
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
        await self.core.close()


async def serve(store: ClusterStore, options: GatewayOptions | None = None) -> GatewayService:
    options = options or GatewayOptions()
    check_bind(options.host, options.api_keys, options.insecure_no_auth)
    core = GatewayCore(store)
    servicer = GatewayServicer(core, options.limits)
    server = await start_server(
        lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s),
        [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name],
        options.host,
        options.port,
        interceptors=[GrpcAuth(options.api_keys)] if options.api_keys.required else [],
        client_certificates=False,  # the public port: clients authenticate with API keys
    )
    http = None
    http_task = None
    http_address = ""
    if options.http_port is not None:
        app = HttpAuth(
            BodyLimit(build_rest_app(core, options.limits), options.limits.max_body_bytes), options.api_keys
        )
        config = uvicorn.Config(
            app,
            host=options.host,
            port=options.http_port,
            log_level="warning",
            lifespan="off",
            ws="websockets-sansio",
        )
        http = _EmbeddedUvicorn(config)
        http_task = asyncio.create_task(http.serve())
        while not http.started:
            if http_task.done():
                http_task.result()
                raise OSError(f"REST gateway could not bind {options.host}:{options.http_port}")
            await asyncio.sleep(0.02)
        bound_port = http.servers[0].sockets[0].getsockname()[1]
        http_address = f"{options.host}:{bound_port}"
    log.info("gateway_started", address=server.address, http=http_address)
    return GatewayService(server, core, http, http_task, http_address)
