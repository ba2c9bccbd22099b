"""The HTTP front (FastAPI): the native REST API under /v1, the OpenAI images API, the ComfyUI API,
progress as Server-Sent Events, and the web page at /."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import grpc
from fastapi import FastAPI, Header, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from google.protobuf import json_format
from google.protobuf.message import Message
from lego.errors import InvalidRequest
from lego.store import MemoryStore
from lego.v1 import compiler_pb2, gateway_pb2
from lego.values import to_values
from pydantic import BaseModel, Field, JsonValue
from starlette.exceptions import HTTPException as StarletteHTTPException

from lego_gateway import comfyui_front, openai_front
from lego_gateway.core import GatewayCore
from lego_gateway.http_errors import error_response, http_error_response, validation_error_response
from lego_gateway.limits import GatewayLimits, check_inputs
from lego_gateway.tracking import GatewayError, TrackedRequest

STATIC_DIR = Path(__file__).parent / "static"
InputValue = str | int | float | bool
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:-]{0,128}$"


EXAMPLE_REQUEST: dict[str, JsonValue] = {
    "workflow": "tiny-sd15-txt2img",
    "inputs": {"prompt": "a red circle on a blue background", "steps": 4, "height": 64, "width": 64},
}


class SubmitBody(BaseModel):
    model_config = {"json_schema_extra": {"examples": [EXAMPLE_REQUEST]}}

    workflow: str = Field(min_length=1, max_length=256, description="a registered workflow")
    inputs: dict[str, InputValue] = Field(
        default_factory=dict, description="request inputs by name; images as data:image/png;base64,... URIs"
    )
    request_id: str = Field(
        default="", pattern=REQUEST_ID_PATTERN, description="optional; generated if empty"
    )
    slo_ms: float = Field(default=0.0, ge=0, le=3_600_000, description="latency objective; 0: the default")


class GenerateBody(SubmitBody):
    model_config = {"json_schema_extra": {"examples": [{**EXAMPLE_REQUEST, "response_format": "b64_json"}]}}

    response_format: Literal["png", "b64_json"] = "png"


class RequestState(BaseModel):
    request_id: str
    workflow: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    step: int
    total_steps: int
    latency_s: float
    slo_s: float
    estimate_s: float
    error: dict[str, Any] | None = None
    events_url: str
    image_url: str


class ImageJson(BaseModel):
    request_id: str
    b64_json: str
    width: int
    height: int
    latency_s: float
    unpatched_calls: int = 0  # denoiser calls run before their LoRA had loaded (async LoRA loading)
    skipped_steps: int = 0  # denoise iterations an approximate-cache hit skipped


def message_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def request_state(tracked: TrackedRequest) -> RequestState:
    status = tracked.status()
    error = None
    if tracked.error is not None:
        error = {"code": tracked.error.code.name, "message": tracked.error.message}
    base = f"/v1/requests/{tracked.request_id}"
    return RequestState(
        request_id=status.request_id,
        workflow=status.workflow,
        state=status.state,  # type: ignore[arg-type]
        step=status.step,
        total_steps=status.total_steps,
        latency_s=round(status.latency_s, 4),
        slo_s=status.slo_s,
        estimate_s=status.estimate_s,
        error=error,
        events_url=f"{base}/events",
        image_url=f"{base}/image",
    )


def event_json(event: gateway_pb2.ProgressEvent) -> dict[str, Any]:
    data = message_json(event)
    data["time_s"] = round(event.time_s, 4)
    if event.kind == "done":
        data["image_url"] = f"/v1/requests/{event.request_id}/image"
    return data


async def sse_stream(tracked: TrackedRequest, node_events: bool) -> AsyncIterator[bytes]:
    async for event in tracked.follow(node_events):
        yield f"event: {event.kind}\ndata: {json.dumps(event_json(event))}\n\n".encode()


def build_rest_app(core: GatewayCore, limits: GatewayLimits | None = None) -> FastAPI:
    limits = limits or GatewayLimits()
    app = FastAPI(
        title="LegoDiffusion gateway",
        version="0.2.0",
        description="Text-to-image workflows micro-served: native API (/v1), OpenAI images API, ComfyUI API.",
    )
    app.add_exception_handler(RequestValidationError, validation_error_response)  # type: ignore[arg-type]
    app.add_exception_handler(GatewayError, error_response)
    app.add_exception_handler(StarletteHTTPException, http_error_response)
    app.add_exception_handler(InvalidRequest, error_response)

    async def submit(body: SubmitBody, idempotency_key: str) -> TrackedRequest:
        check_inputs(body.inputs, limits)
        return await core.submit(
            body.workflow, to_values(body.inputs), body.request_id, body.slo_ms, idempotency_key
        )

    @app.get("/healthz", tags=["cluster"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/workflows", tags=["workflows"])
    async def list_workflows() -> dict[str, Any]:
        reply = await core.list_workflows()
        return {
            "workflows": [
                {
                    "name": w.name,
                    "description": w.description,
                    "node_count": w.node_count,
                    "inputs": list(w.input_names),
                }
                for w in reply.workflows
            ]
        }

    @app.post("/v1/workflows", tags=["workflows"], status_code=201)
    async def register_workflow(spec: dict[str, Any]) -> dict[str, Any]:
        """Register a workflow given as the JSON form of `lego.v1.WorkflowSpec`."""
        try:
            parsed = json_format.ParseDict(spec, compiler_pb2.WorkflowSpec())
        except json_format.ParseError as error:
            raise InvalidRequest("workflow", f"not a WorkflowSpec: {error}") from None
        return message_json(await core.register_workflow(parsed))

    @app.post("/v1/requests", tags=["requests"], status_code=202)
    async def submit_request(
        body: SubmitBody, idempotency_key: str = Header(default="", max_length=256)
    ) -> RequestState:
        """Admit a request and answer at once; follow `events_url`, then fetch `image_url`."""
        return request_state(await submit(body, idempotency_key))

    @app.get("/v1/requests/{request_id}", tags=["requests"])
    async def request_status(request_id: str) -> RequestState:
        return request_state(core.requests.get(request_id))

    @app.get(
        "/v1/requests/{request_id}/events",
        tags=["requests"],
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def request_events(request_id: str, node_events: bool = True) -> StreamingResponse:
        """Server-Sent Events from the first (queued) to the last (done, failed or cancelled)."""
        tracked = core.requests.get(request_id)
        return StreamingResponse(
            sse_stream(tracked, node_events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get(
        "/v1/requests/{request_id}/image",
        tags=["requests"],
        responses={200: {"content": {"image/png": {}, "application/json": {}}}},
    )
    async def request_image(
        request_id: str,
        response_format: Literal["png", "b64_json"] = "png",
        wait: bool = Query(default=False, description="wait for the request to finish"),
    ) -> Response:
        tracked = core.requests.get(request_id)
        if not tracked.finished and not wait:
            raise GatewayError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"request {request_id} is {tracked.state} (step {tracked.step}/{tracked.total_steps}); "
                "retry later or pass wait=true",
            )
        return image_response(await tracked.wait(), response_format)

    @app.post("/v1/requests/{request_id}/cancel", tags=["requests"])
    async def cancel_request(request_id: str) -> RequestState:
        return request_state(await core.cancel(request_id))

    @app.post(
        "/v1/generate",
        tags=["requests"],
        responses={200: {"content": {"image/png": {}, "application/json": {}}}},
    )
    async def generate(
        body: GenerateBody, idempotency_key: str = Header(default="", max_length=256)
    ) -> Response:
        """Submit and wait: the image itself (PNG), or JSON with it base64-encoded."""
        tracked = await submit(body, idempotency_key)
        return image_response(await tracked.wait(), body.response_format)

    @app.get("/v1/cluster", tags=["cluster"])
    async def cluster() -> dict[str, Any]:
        view = await core.cluster_view()
        status = message_json(view.cluster)
        return {
            "workers": [
                {
                    "worker_id": w.worker_id,
                    "address": w.address,
                    "busy": w.busy,
                    "draining": w.draining,
                    "loaded_models": list(w.loaded_models),
                }
                for w in view.cluster.workers
            ],
            "requests_in_flight": view.cluster.requests_in_flight,
            "ready_tasks": view.cluster.ready_tasks,
            "policy": status.get("policy", ""),
            "epoch": view.cluster.epoch,
            "slo": message_json(view.slo) | {"answered": view.slo.answered, "met": view.slo.met},
        }

    openai_front.add_routes(app, core, limits)
    comfyui_front.add_routes(app, core, limits)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            return JSONResponse({"error": {"code": "NOT_FOUND", "message": "no web page installed"}}, 404)
        return FileResponse(index)

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app


def image_response(result: Any, response_format: str) -> Response:
    headers = {
        "X-Request-Id": result.request_id,
        "X-Latency-S": f"{result.latency_s:.4f}",
        "X-Unpatched-Calls": str(result.unpatched_calls),
        "X-Skipped-Steps": str(result.skipped_steps),
    }
    if response_format == "b64_json":
        body = ImageJson(
            request_id=result.request_id,
            b64_json=base64.b64encode(result.png).decode(),
            width=result.width,
            height=result.height,
            latency_s=round(result.latency_s, 4),
            unpatched_calls=result.unpatched_calls,
            skipped_steps=result.skipped_steps,
        )
        return JSONResponse(body.model_dump(), headers=headers)
    return Response(result.png, media_type="image/png", headers=headers)


def openapi_document() -> dict[str, Any]:
    """The HTTP API's description, as served at /openapi.json (no cluster needed to build it)."""
    return build_rest_app(GatewayCore(MemoryStore())).openapi()
