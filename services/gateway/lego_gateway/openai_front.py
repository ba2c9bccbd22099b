"""OpenAI's images API over registered workflows, so the official `openai` client works unchanged:
`POST /v1/images/generations` (model = a workflow) and `GET /v1/models` (the workflows)."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego.errors import InvalidRequest
from lego.values import Scalar, to_values
from pydantic import BaseModel, Field, JsonValue

from lego_gateway.core import GatewayCore
from lego_gateway.limits import GatewayLimits, check_inputs
from lego_gateway.tracking import GatewayError, TrackedRequest

SIZE_PATTERN = re.compile(r"^(\d{1,5})x(\d{1,5})$")
SEED_RANGE = 2**31


EXAMPLE: dict[str, JsonValue] = {"prompt": "a red circle", "size": "64x64", "response_format": "b64_json"}


class ImagesBody(BaseModel):
    model_config = {
        "json_schema_extra": {
            "examples": [
                {"prompt": "a red circle", "size": "64x64", "response_format": "b64_json", "steps": 2}
            ]
        }
    }

    prompt: str = Field(min_length=1, description="what to draw")
    model: str = Field(default=TINY_SD15_TXT2IMG, max_length=256, description="a registered workflow")
    n: int = Field(default=1, ge=1, description="how many images (each its own request, its own seed)")
    size: str = Field(default="auto", max_length=16, description="WIDTHxHEIGHT, or auto: the workflow's")
    response_format: Literal["url", "b64_json"] = "url"
    quality: str | None = Field(default=None, description="accepted and ignored")
    style: str | None = Field(default=None, description="accepted and ignored")
    user: str | None = Field(default=None, max_length=256, description="accepted and ignored")
    # Beyond OpenAI's fields (the client's `extra_body`): more of the workflow's inputs.
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = Field(default=None, ge=0, lt=SEED_RANGE, description="image i gets seed + i")


def size_inputs(size: str) -> dict[str, Scalar]:
    if size == "auto":
        return {}
    match = SIZE_PATTERN.match(size)
    if match is None:
        raise InvalidRequest("size", f"size must be WIDTHxHEIGHT (e.g. 512x512) or auto, got {size!r}")
    return {"width": int(match.group(1)), "height": int(match.group(2))}


def request_inputs(body: ImagesBody) -> dict[str, Scalar]:
    inputs: dict[str, Scalar] = {"prompt": body.prompt, **size_inputs(body.size)}
    for name in ("negative_prompt", "steps", "guidance_scale"):
        value = getattr(body, name)
        if value is not None:
            inputs[name] = value
    return inputs


async def submit_all(core: GatewayCore, body: ImagesBody, limits: GatewayLimits) -> list[TrackedRequest]:
    """One request per image, seeds counting up from `seed`; all or none are admitted."""
    inputs = request_inputs(body)
    check_inputs(inputs, limits)
    first_seed = body.seed if body.seed is not None else secrets.randbelow(SEED_RANGE)
    tracked: list[TrackedRequest] = []
    try:
        for index in range(body.n):
            seed = (first_seed + index) % SEED_RANGE
            tracked.append(await core.submit(body.model, to_values({**inputs, "seed": seed})))
    except GatewayError:
        for admitted in tracked:
            await core.cancel(admitted.request_id)
        raise
    return tracked


def add_routes(app: FastAPI, core: GatewayCore, limits: GatewayLimits) -> None:
    @app.get("/v1/models", tags=["openai"])
    async def list_models() -> dict[str, Any]:
        reply = await core.list_workflows()
        return {"object": "list", "data": [_model(w.name) for w in reply.workflows]}

    @app.post("/v1/images/generations", tags=["openai"])
    async def images_generations(body: ImagesBody, request: Request) -> dict[str, Any]:
        if body.n > limits.max_images:
            raise InvalidRequest("n", f"n must be ≤ {limits.max_images}, got {body.n}")
        try:
            tracked = await submit_all(core, body, limits)
        except (GatewayError, InvalidRequest) as error:
            if error.field in ("height", "width"):
                error.field = "size"
            elif error.field == "workflow":
                error.field = "model"
            raise
        outcomes = await asyncio.gather(*(t.wait() for t in tracked), return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            for unfinished in tracked:
                await core.cancel(unfinished.request_id)
            raise failures[0]
        results = [o for o in outcomes if not isinstance(o, BaseException)]
        base = str(request.base_url).rstrip("/")
        data = [
            {"b64_json": base64.b64encode(r.png).decode()}
            if body.response_format == "b64_json"
            else {"url": f"{base}/v1/requests/{r.request_id}/image"}
            for r in results
        ]
        return {"created": int(time.time()), "data": [item | {"revised_prompt": None} for item in data]}


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "legodiffusion"}
