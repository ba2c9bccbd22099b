"""ComfyUI's HTTP and websocket API over the cluster, so ComfyUI API clients drive it unchanged.

`POST /prompt` takes an API-format workflow; the compiler service translates it and registers it
once per graph structure (the name is a hash of the structure, so a prompt that only changes the
text, seed or size runs on the same registered workflow), and the request runs with this prompt's
values as explicit inputs. `GET /history[/{prompt_id}]`, `GET /view` (the PNG), `GET /queue`,
`GET /prompt`, `POST /interrupt`, `GET /system_stats` and the `/ws?clientId=` websocket (progress in
ComfyUI's message shapes) follow ComfyUI's answers; every route is also served under `/api`, as
ComfyUI's newer front end calls them.

What a prompt becomes: its first SaveImage/PreviewImage node's output is `<prompt_id>.png`; other
output nodes get no image. Prompts and their images are kept as long as the gateway keeps the
request (10 minutes after it ends), and at most MAX_PROMPTS of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from fastapi import FastAPI, Query, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from lego.errors import InvalidRequest
from lego.store import cancel_task
from lego.v1 import common_pb2, compiler_pb2, gateway_pb2
from lego.values import Scalar, from_value

from lego_gateway.core import GatewayCore
from lego_gateway.http_errors import HTTP_STATUS, RETRY_AFTER_S
from lego_gateway.limits import GatewayLimits, check_inputs
from lego_gateway.tracking import GatewayError, TrackedRequest

MAX_PROMPTS = 2048  # prompts remembered (their requests also expire from the gateway's registry)
MAX_IMPORTS = 256  # compiled prompts cached by content hash
MAX_CLIENT_ID = 256
PROMPT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
FILENAME_PATTERN = re.compile(r"^([A-Za-z0-9_-]{1,128})\.png$")
NODE_ERROR_PATTERN = re.compile(r"^node (?P<id>\S+?)(?: \([^)]*\))?: (?P<message>.+)$", re.DOTALL)
SAMPLER_CLASSES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
OUTPUT_CLASSES = ("SaveImage", "PreviewImage")
SAMPLER_FIELDS = ("seed", "steps", "guidance_scale", "strength")
ROUTE_PREFIXES = ("", "/api")

Message = dict[str, Any]
PROMPT_BODY = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "type": "object",
            "description": "an API-format workflow: {node_id: {class_type, inputs}}",
            "additionalProperties": {
                "type": "object",
                "required": ["class_type", "inputs"],
                "properties": {"class_type": {"type": "string"}, "inputs": {"type": "object"}},
            },
        },
        "client_id": {
            "type": "string",
            "maxLength": MAX_CLIENT_ID,
            "description": "the /ws clientId to tell",
        },
        "prompt_id": {"type": "string", "pattern": PROMPT_ID_PATTERN.pattern, "description": "optional"},
        "extra_data": {"type": "object", "description": "kept and shown in /history"},
    },
}
HISTORY_BODY = {
    "type": "object",
    "properties": {"clear": {"type": "boolean"}, "delete": {"type": "array", "items": {"type": "string"}}},
}
INTERRUPT_BODY = {"type": "object", "properties": {"prompt_id": {"type": "string"}}}


def _body(schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}


def _sort_key(node_id: str) -> tuple[int, str]:
    numeric = node_id.isascii() and node_id.isdigit() and len(node_id) <= 18
    return (int(node_id), "") if numeric else (1 << 62, node_id)


def _nodes(prompt: dict[str, Any], classes: tuple[str, ...]) -> list[str]:
    """The ids of the prompt's nodes of these classes, in ComfyUI's (numeric) order."""
    found = [i for i, n in prompt.items() if isinstance(n, dict) and n.get("class_type") in classes]
    return sorted(found, key=_sort_key)


def _link(prompt: dict[str, Any], node_id: str | None, name: str, target: str) -> str | None:
    """The node that input `name` of `node_id` links to, if it is of class `target`."""
    node = prompt.get(node_id or "")
    inputs = node.get("inputs") if isinstance(node, dict) else None
    value = inputs.get(name) if isinstance(inputs, dict) else None
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
        source = str(value[0])
        if isinstance(prompt[source], dict) and prompt[source].get("class_type") == target:
            return source
    return None


def _well_formed(node: Any) -> bool:
    return (
        isinstance(node, dict)
        and isinstance(node.get("class_type"), str)
        and isinstance(node.get("inputs", {}), dict)
    )


def _canonical_hash(prompt: dict[str, Any]) -> str:
    text = json.dumps(prompt, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _message(kind: str, **data: Any) -> Message:
    return {"type": kind, "data": data}


def comfy_error(
    status: int,
    error_type: str,
    message: str,
    details: str = "",
    node_errors: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error in ComfyUI's shape (what its clients read from a refused `/prompt`)."""
    body = {
        "error": {"type": error_type, "message": message, "details": details, "extra_info": {}},
        "node_errors": node_errors or {},
    }
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class PromptRecord:
    """What the front keeps of one prompt; the image itself stays in the gateway's tracked request."""

    prompt_id: str
    number: int
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    client_id: str
    tracked: TrackedRequest
    submitted_at: float = field(default_factory=time.time)  # wall clock, for ComfyUI's timestamps

    def __post_init__(self) -> None:
        self.outputs = _nodes(self.prompt, OUTPUT_CLASSES)
        self.saver: str | None = self.outputs[0] if self.outputs else None
        samplers = _nodes(self.prompt, SAMPLER_CLASSES)
        self.sampler: str | None = samplers[0] if samplers else None
        decoders = _nodes(self.prompt, ("VAEDecode",))
        self.decoder: str | None = _link(self.prompt, self.saver, "images", "VAEDecode") or (
            decoders[0] if decoders else None
        )

    def class_of(self, node_id: str | None) -> str:
        node = self.prompt.get(node_id or "")
        return str(node.get("class_type", "")) if isinstance(node, dict) else ""

    def timestamp(self, event: gateway_pb2.ProgressEvent) -> int:
        return int((self.submitted_at + event.time_s) * 1000)

    def images(self) -> list[dict[str, str]]:
        kind = "temp" if self.class_of(self.saver) == "PreviewImage" else "output"
        return [{"filename": f"{self.prompt_id}.png", "subfolder": "", "type": kind}]

    def queue_item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class _Relay:
    """Turns one request's progress events into ComfyUI's websocket messages."""

    def __init__(self, record: PromptRecord) -> None:
        self.record = record
        self.node: str | None = None  # the ComfyUI node now "executing"
        self.executed: list[str] = []

    def _executing(self, node: str | None) -> list[Message]:
        if node is None or node == self.node:
            return []
        if self.node is not None:
            self.executed.append(self.node)
        self.node = node
        return [_message("executing", node=node, display_node=node, prompt_id=self.record.prompt_id)]

    def messages(self, event: gateway_pb2.ProgressEvent) -> list[Message]:
        record, prompt_id = self.record, self.record.prompt_id
        timestamp = record.timestamp(event)
        if event.kind == "admitted":
            return [
                _message("execution_start", prompt_id=prompt_id, timestamp=timestamp),
                _message("execution_cached", nodes=[], prompt_id=prompt_id, timestamp=timestamp),
            ]
        if event.kind == "step":
            out = self._executing(record.sampler)
            out.append(
                _message(
                    "progress", value=event.step, max=event.total, prompt_id=prompt_id, node=record.sampler
                )
            )
            if event.total and event.step >= event.total:
                out += self._executing(record.decoder)
            return out
        end = _message("executing", node=None, display_node=None, prompt_id=prompt_id)
        if event.kind == "done":
            out = self._executing(record.decoder) + self._executing(record.saver)
            if record.saver is not None:
                out.append(
                    _message(
                        "executed",
                        node=record.saver,
                        display_node=record.saver,
                        output={"images": record.images()},
                        prompt_id=prompt_id,
                    )
                )
            return [*out, _message("execution_success", prompt_id=prompt_id, timestamp=timestamp), end]
        if event.kind in ("failed", "rejected"):
            return [self.error(event, timestamp), end]
        if event.kind == "cancelled":
            node = self.node or record.sampler
            interrupted = _message(
                "execution_interrupted",
                prompt_id=prompt_id,
                node_id=node,
                node_type=record.class_of(node),
                executed=list(self.executed),
                timestamp=timestamp,
            )
            return [interrupted, end]
        return []

    def error(self, event: gateway_pb2.ProgressEvent, timestamp: int) -> Message:
        node = self.node or self.record.sampler
        code = next((c.name for c in grpc.StatusCode if c.value[0] == event.code), "UNKNOWN")
        return _message(
            "execution_error",
            prompt_id=self.record.prompt_id,
            node_id=node,
            node_type=self.record.class_of(node),
            executed=list(self.executed),
            exception_message=event.message,
            exception_type=code,
            traceback=[],
            current_inputs={},
            current_outputs={},
            timestamp=timestamp,
        )


class ComfyFront:
    def __init__(self, core: GatewayCore, limits: GatewayLimits) -> None:
        self.core = core
        self.limits = limits
        self.prompts: OrderedDict[str, PromptRecord] = OrderedDict()
        self._imports: OrderedDict[str, compiler_pb2.WorkflowSpec] = OrderedDict()
        self._number = 0
        self._listeners: dict[str, set[Callable[[PromptRecord], None]]] = {}

    # ---- bookkeeping ----

    def live(self) -> list[tuple[PromptRecord, TrackedRequest]]:
        """The prompts whose requests the gateway still holds, oldest first; forgets the rest."""
        self.core.requests.expire()
        for prompt_id in [p for p in self.prompts if p not in self.core.requests]:
            del self.prompts[prompt_id]
        return [(record, record.tracked) for record in self.prompts.values()]

    def find(self, prompt_id: str) -> PromptRecord | None:
        self.core.requests.expire()
        record = self.prompts.get(prompt_id)
        if record is not None and prompt_id not in self.core.requests:
            del self.prompts[prompt_id]
            return None
        return record

    def queue_remaining(self) -> int:
        return sum(1 for _, tracked in self.live() if not tracked.finished)

    def status_message(self, sid: str | None = None) -> Message:
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}
        if sid is not None:
            data["sid"] = sid
        return {"type": "status", "data": data}

    def subscribe(self, client_id: str, listener: Callable[[PromptRecord], None]) -> None:
        self._listeners.setdefault(client_id, set()).add(listener)

    def unsubscribe(self, client_id: str, listener: Callable[[PromptRecord], None]) -> None:
        listeners = self._listeners.get(client_id, set())
        listeners.discard(listener)
        if not listeners:
            self._listeners.pop(client_id, None)

    # ---- submitting ----

    async def compile(self, prompt: dict[str, Any], key: str) -> compiler_pb2.WorkflowSpec:
        spec = self._imports.get(key)
        if spec is not None:
            self._imports.move_to_end(key)
            return spec
        reply = await self.core.import_comfyui(json.dumps(prompt))
        spec = reply.workflow
        if reply.registered.name:
            spec.name = reply.registered.name
        self._imports[key] = spec
        while len(self._imports) > MAX_IMPORTS:
            self._imports.popitem(last=False)
        return spec

    def inputs(self, spec: compiler_pb2.WorkflowSpec) -> dict[str, common_pb2.Value]:
        """This prompt's values (the registered workflow's defaults may be an earlier prompt's)."""
        inputs = {i.name: i.default_value for i in spec.inputs if i.HasField("default_value")}
        scalars: dict[str, Scalar] = {}
        for name, value in inputs.items():
            scalar = from_value(value)
            if isinstance(scalar, str | int | float | bool):
                scalars[name] = scalar
        check_inputs(scalars, self.limits)
        return inputs

    async def _submit(self, spec: compiler_pb2.WorkflowSpec, prompt_id: str) -> TrackedRequest:
        inputs = self.inputs(spec)
        if prompt_id in self.core.requests:  # checked just before submit: no await in between
            raise InvalidRequest("prompt_id", f"prompt_id {prompt_id!r} is already in use")
        return await self.core.submit(spec.name, inputs, request_id=prompt_id)

    async def submit(
        self, prompt: dict[str, Any], prompt_id: str, client_id: str, extra_data: dict[str, Any]
    ) -> PromptRecord:
        key = _canonical_hash(prompt)
        try:
            tracked = await self._submit(await self.compile(prompt, key), prompt_id)
        except GatewayError as error:
            if error.code != grpc.StatusCode.NOT_FOUND or error.field != "workflow":
                raise
            # A cached compile whose workflow the cluster no longer has: compile it again, once.
            self._imports.pop(key, None)
            tracked = await self._submit(await self.compile(prompt, key), prompt_id)
        self._number += 1
        record = PromptRecord(prompt_id, self._number, prompt, extra_data, client_id, tracked)
        self.live()  # forget the prompts whose requests the gateway dropped
        self.prompts[prompt_id] = record
        while len(self.prompts) > MAX_PROMPTS:
            self.prompts.popitem(last=False)
        for listener in list(self._listeners.get(client_id, ())):
            listener(record)
        return record

    # ---- answers ----

    def history_entry(self, record: PromptRecord, tracked: TrackedRequest) -> dict[str, Any]:
        relay = _Relay(record)
        messages: list[list[Any]] = []
        for event in tracked.events:
            for message in relay.messages(event):
                if message["type"] not in ("executing", "progress", "executed"):
                    messages.append([message["type"], message["data"]])
        success = tracked.state == "done" and tracked.result is not None
        outputs = {record.saver: {"images": record.images()}} if success and record.saver else {}
        meta = {
            node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
            for node in outputs
        }
        return {
            "prompt": record.queue_item(),
            "outputs": outputs,
            "status": {
                "status_str": "success" if success else "error",
                "completed": success,
                "messages": messages,
            },
            "meta": meta,
        }

    def error_reply(self, error: GatewayError | InvalidRequest, prompt: dict[str, Any]) -> JSONResponse:
        if isinstance(error, InvalidRequest):
            code, message, field_name = grpc.StatusCode.INVALID_ARGUMENT, error.message, error.field
        else:
            code, message, field_name = error.code, error.message, error.field
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return comfy_error(
                429, "queue_full", message, message, headers={"Retry-After": str(RETRY_AFTER_S)}
            )
        if code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            status = HTTP_STATUS.get(code, 500)
            return comfy_error(
                status, "server_error" if status >= 500 else code.name.lower(), message, message
            )
        node_errors = self.node_errors(message, field_name, prompt)
        if not node_errors or "unsupported ComfyUI node class" in message:
            return comfy_error(400, "invalid_prompt", message, message, node_errors)
        return comfy_error(
            400, "prompt_outputs_failed_validation", "Prompt outputs failed validation", message, node_errors
        )

    @staticmethod
    def node_errors(message: str, field_name: str, prompt: dict[str, Any]) -> dict[str, Any]:
        """ComfyUI's per-node errors: from the compiler's `node <id> (<class>): ...` messages, or
        from the request input at fault (seed, steps, ...: the sampler; height, width: the latent)."""
        found: dict[str, list[str]] = {}
        for part in message.split("; "):
            match = NODE_ERROR_PATTERN.match(part)
            if match and match.group("id") in prompt:
                found.setdefault(match.group("id"), []).append(match.group("message"))
        node = _field_node(prompt, field_name) if not found and field_name else None
        if node is not None:
            found[node] = [message]
        outputs = _nodes(prompt, OUTPUT_CLASSES)
        errors = {}
        for node_id, texts in found.items():
            node_class = prompt[node_id].get("class_type", "") if isinstance(prompt[node_id], dict) else ""
            errors[node_id] = {
                "errors": [
                    {"type": "value_not_valid", "message": text, "details": text, "extra_info": {}}
                    for text in texts
                ],
                "dependent_outputs": outputs,
                "class_type": node_class,
            }
        return errors


def _field_node(prompt: dict[str, Any], field_name: str) -> str | None:
    samplers = _nodes(prompt, SAMPLER_CLASSES)
    sampler = samplers[0] if samplers else None
    if field_name in SAMPLER_FIELDS:
        return sampler
    if field_name in ("height", "width"):
        return _link(prompt, sampler, "latent_image", "EmptyLatentImage")
    if field_name in ("prompt", "negative_prompt"):
        return _link(prompt, sampler, "positive" if field_name == "prompt" else "negative", "CLIPTextEncode")
    if field_name == "image" or field_name.startswith("image_"):
        loaders = _nodes(prompt, ("LoadImage",))
        if field_name == "image":
            return loaders[0] if loaders else None
        wanted = field_name.removeprefix("image_")
        return wanted if wanted in loaders else None
    return None


async def _send_all(websocket: WebSocket, outbox: asyncio.Queue[Message]) -> None:
    while True:
        await websocket.send_text(json.dumps(await outbox.get()))


async def _until_closed(websocket: WebSocket) -> None:
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


async def _relay(front: ComfyFront, record: PromptRecord, outbox: asyncio.Queue[Message]) -> None:
    relay = _Relay(record)
    async for event in record.tracked.follow():
        for message in relay.messages(event):
            outbox.put_nowait(message)
    outbox.put_nowait(front.status_message())


def add_routes(app: FastAPI, core: GatewayCore, limits: GatewayLimits | None = None) -> None:
    front = ComfyFront(core, limits or GatewayLimits())

    async def post_prompt(request: Request) -> Response:
        """Queue an API-format workflow: `{"prompt": {...}, "client_id": "...", "extra_data": {...}}`."""
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            return comfy_error(400, "invalid_prompt", "the request body is not JSON")
        if not isinstance(body, dict) or "prompt" not in body:
            return comfy_error(400, "no_prompt", "No prompt provided", "No prompt provided")
        prompt, client_id = body["prompt"], body.get("client_id") or ""
        extra_data = body.get("extra_data") or {}
        if not isinstance(prompt, dict) or not prompt:
            message = "prompt must be a non-empty JSON object of nodes (ComfyUI API format)"
            return comfy_error(400, "invalid_prompt", message, message)
        malformed = next((i for i, n in prompt.items() if not _well_formed(n)), None)
        if malformed is not None:
            message = f"node {malformed}: needs a class_type (a string) and inputs (an object)"
            return comfy_error(400, "invalid_prompt", message, message)
        if not isinstance(client_id, str) or len(client_id) > MAX_CLIENT_ID:
            message = f"client_id must be a string of at most {MAX_CLIENT_ID} characters"
            return comfy_error(400, "invalid_prompt", message, message)
        if not isinstance(extra_data, dict):
            return comfy_error(400, "invalid_prompt", "extra_data must be a JSON object")
        prompt_id = body.get("prompt_id") or str(uuid.uuid4())
        if not isinstance(prompt_id, str) or not PROMPT_ID_PATTERN.match(prompt_id):
            message = "prompt_id must be 1 to 128 letters, digits, '-' or '_'"
            return comfy_error(400, "invalid_prompt", message, message)
        earlier = front.find(prompt_id)
        if earlier is not None:  # the same prompt posted again (a client's retry)
            return JSONResponse({"prompt_id": prompt_id, "number": earlier.number, "node_errors": {}})
        if client_id:
            extra_data = {**extra_data, "client_id": client_id}
        try:
            record = await front.submit(prompt, prompt_id, client_id, extra_data)
        except (GatewayError, InvalidRequest) as error:
            return front.error_reply(error, prompt)
        return JSONResponse({"prompt_id": record.prompt_id, "number": record.number, "node_errors": {}})

    async def get_prompt() -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": front.queue_remaining()}}

    async def history(max_items: int | None = None) -> dict[str, Any]:
        """Finished prompts, oldest first (the last `max_items` of them)."""
        finished = [(r, t) for r, t in front.live() if t.finished]
        if max_items is not None:
            finished = finished[-max_items:] if max_items > 0 else []
        return {r.prompt_id: front.history_entry(r, t) for r, t in finished}

    async def history_of(prompt_id: str) -> dict[str, Any]:
        """The prompt's outcome once it finished; `{}` while it runs or when unknown."""
        record = front.find(prompt_id)
        if record is None or not record.tracked.finished:
            return {}
        return {prompt_id: front.history_entry(record, record.tracked)}

    async def post_history(request: Request) -> Response:
        """`{"clear": true}` or `{"delete": [prompt_id, ...]}`: forget finished prompts."""
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            body = {}
        body = body if isinstance(body, dict) else {}
        doomed = [r.prompt_id for r, t in front.live() if t.finished] if body.get("clear") is True else []
        delete = body.get("delete")
        doomed += [p for p in delete if isinstance(p, str)] if isinstance(delete, list) else []
        for prompt_id in doomed:
            front.prompts.pop(prompt_id, None)
        return Response(status_code=200)

    async def queue() -> dict[str, Any]:
        live = [(r, t) for r, t in front.live() if not t.finished]
        return {
            "queue_running": [r.queue_item() for r, t in live if t.state == "running"],
            "queue_pending": [r.queue_item() for r, t in live if t.state == "queued"],
        }

    async def interrupt(request: Request) -> Response:
        """Cancel `{"prompt_id": ...}`, or without one every unfinished prompt posted here."""
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            body = {}
        wanted = body.get("prompt_id") if isinstance(body, dict) else None
        for record, tracked in front.live():
            if not tracked.finished and wanted in (None, record.prompt_id):
                with contextlib.suppress(GatewayError):  # gone meanwhile
                    await core.cancel(record.prompt_id)
        return Response(status_code=200)

    async def view(
        filename: str = Query(pattern=FILENAME_PATTERN.pattern, description="<prompt_id>.png"),
        subfolder: str = "",
        type: str = "output",
    ) -> Response:
        """A prompt's image: `filename=<prompt_id>.png` as `/history` names it."""
        match = FILENAME_PATTERN.match(filename)
        if match is None or subfolder or type not in ("output", "temp"):
            return Response("not found", status_code=404)
        prompt_id = match.group(1)
        record = front.find(prompt_id)
        result = record.tracked.result if record is not None else None
        if result is None:
            return Response("not found", status_code=404)
        headers = {"Content-Disposition": f'filename="{filename}"'}
        return Response(result.png, media_type="image/png", headers=headers)

    async def system_stats() -> dict[str, Any]:
        return {
            "system": {
                "os": os.name,
                "python_version": sys.version,
                "embedded_python": False,
                "comfyui_version": "legodiffusion",
                "pytorch_version": "",
                "argv": [],
                "ram_total": 0,
                "ram_free": 0,
            },
            "devices": [],
        }

    async def websocket_route(websocket: WebSocket) -> None:
        """ComfyUI's progress messages for the prompts posted with this `clientId`."""
        client_id = websocket.query_params.get("clientId") or uuid.uuid4().hex
        if len(client_id) > MAX_CLIENT_ID:
            await websocket.close(code=1008, reason="clientId too long")
            return
        await websocket.accept()
        outbox: asyncio.Queue[Message] = asyncio.Queue()
        followers: dict[str, asyncio.Task[None]] = {}

        def watch(record: PromptRecord) -> None:
            if record.prompt_id not in followers:
                followers[record.prompt_id] = asyncio.create_task(_relay(front, record, outbox))

        front.subscribe(client_id, watch)
        outbox.put_nowait(front.status_message(client_id))
        for record, tracked in front.live():  # prompts posted before this socket opened
            if record.client_id == client_id and not tracked.finished:
                watch(record)
        sender = asyncio.create_task(_send_all(websocket, outbox))
        receiver = asyncio.create_task(_until_closed(websocket))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            front.unsubscribe(client_id, watch)
            for task in [sender, receiver, *followers.values()]:
                await cancel_task(task)

    routes: list[tuple[str, str, Callable[..., Any], dict[str, Any]]] = [
        ("/prompt", "POST", post_prompt, {"openapi_extra": _body(PROMPT_BODY, required=True)}),
        ("/prompt", "GET", get_prompt, {}),
        ("/history", "GET", history, {}),
        ("/history", "POST", post_history, {"openapi_extra": _body(HISTORY_BODY)}),
        ("/history/{prompt_id}", "GET", history_of, {}),
        ("/queue", "GET", queue, {}),
        ("/interrupt", "POST", interrupt, {"openapi_extra": _body(INTERRUPT_BODY)}),
        ("/view", "GET", view, {"responses": {200: {"content": {"image/png": {}}}}}),
        ("/system_stats", "GET", system_stats, {}),
    ]
    for prefix in ROUTE_PREFIXES:
        for path, method, endpoint, extra in routes:
            app.add_api_route(
                prefix + path,
                endpoint,
                methods=[method],
                tags=["comfyui"],
                include_in_schema=not prefix,
                **extra,
            )
        app.add_api_websocket_route(f"{prefix}/ws", websocket_route)
