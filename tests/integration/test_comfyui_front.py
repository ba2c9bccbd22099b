"""ComfyUI API clients drive the cluster unchanged: POST /prompt, the /ws progress messages,
/history, /view; the image is the native API's for the same workflow."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from lego.errors import InvalidRequest
from lego.grpc_server import channel
from lego.v1 import compiler_pb2, compiler_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from lego_cli.cluster import EmbeddedCluster
from lego_compiler.comfyui import import_comfyui
from lego_gateway.comfyui_front import ComfyFront
from lego_gateway.limits import GatewayLimits
from lego_gateway.tracking import GatewayError, RequestRegistry, TrackedRequest
from websockets.asyncio.client import ClientConnection, connect

from tests.pipeline_reference import decode_png

COMFY_FILE = Path(__file__).parents[1] / "data" / "comfyui_txt2img.json"
TIMEOUT_S = 120


def _prompt(**texts: str) -> dict[str, Any]:
    prompt: dict[str, Any] = json.loads(COMFY_FILE.read_text())
    if "text" in texts:
        prompt["6"]["inputs"]["text"] = texts["text"]
    return prompt


async def _messages_until_done(ws: ClientConnection, prompt_id: str) -> list[dict[str, Any]]:
    """Every message for this prompt, until ComfyUI's end signal: executing with node null."""
    seen: list[dict[str, Any]] = []
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
        if message["data"].get("prompt_id") not in (None, prompt_id):
            continue
        seen.append(message)
        if message["type"] == "executing" and message["data"]["node"] is None:
            return seen


async def _history(http: httpx.AsyncClient, prompt_id: str) -> dict[str, Any]:
    for _ in range(TIMEOUT_S * 10):
        answer = (await http.get(f"/history/{prompt_id}")).json()
        if answer:
            return dict(answer[prompt_id])
        await asyncio.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} never finished")


async def _native_png(cluster: EmbeddedCluster) -> np.ndarray:
    """The same workflow registered and run through the native gRPC API (the file's saved values)."""
    async with channel(cluster.compiler_address) as chan:
        await compiler_pb2_grpc.CompilerStub(chan).RegisterWorkflow(
            import_comfyui(json.loads(COMFY_FILE.read_text()), "native-comfy")
        )
    async with channel(cluster.gateway_address) as chan:
        reply = await gateway_pb2_grpc.GatewayStub(chan).Generate(
            gateway_pb2.GenerateRequest(workflow="native-comfy")
        )
    return decode_png(reply.png)


async def test_a_comfyui_client_queues_follows_and_fetches_the_native_apis_image() -> None:
    client_id = "test-client"
    async with (
        EmbeddedCluster(workers=1, http_port=0) as cluster,
        httpx.AsyncClient(base_url=f"http://{cluster.http_address}", timeout=TIMEOUT_S) as http,
        connect(f"ws://{cluster.http_address}/ws?clientId={client_id}") as ws,
    ):
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert hello == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id},
        }

        posted = await http.post("/prompt", json={"prompt": _prompt(), "client_id": client_id})
        assert posted.status_code == 200, posted.text
        prompt_id, number = posted.json()["prompt_id"], posted.json()["number"]
        assert posted.json()["node_errors"] == {}
        messages = await _messages_until_done(ws, prompt_id)

        kinds = [m["type"] for m in messages]
        assert kinds[0] == "execution_start"
        assert kinds[-3:] == ["executed", "execution_success", "executing"]
        assert "execution_error" not in kinds
        progress = [m["data"] for m in messages if m["type"] == "progress"]
        # One per iteration of the denoise loop: PNDM (SD 1.5's scheduler) runs steps + 1 of them.
        total = (await http.get(f"/v1/requests/{prompt_id}")).json()["total_steps"]
        assert total in (4, 5)
        assert [p["value"] for p in progress] == list(range(1, total + 1))
        assert {(p["max"], p["node"]) for p in progress} == {(total, "3")}
        executing = [m["data"]["node"] for m in messages if m["type"] == "executing"]
        assert executing == ["3", "8", "9", None]  # KSampler, VAEDecode, SaveImage, the end
        assert kinds.index("progress") > kinds.index("executing")  # the sampler runs, then reports
        executed = next(m["data"] for m in messages if m["type"] == "executed")
        image = {"filename": f"{prompt_id}.png", "subfolder": "", "type": "output"}
        assert executed == {
            "node": "9",
            "display_node": "9",
            "output": {"images": [image]},
            "prompt_id": prompt_id,
        }

        entry = await _history(http, prompt_id)
        assert entry["outputs"] == {"9": {"images": [image]}}
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert [m[0] for m in entry["status"]["messages"]] == [
            "execution_start",
            "execution_cached",
            "execution_success",
        ]
        assert entry["prompt"][:2] == [number, prompt_id]
        assert entry["prompt"][2] == _prompt() and entry["prompt"][4] == ["9"]
        assert entry["prompt"][3]["client_id"] == client_id
        assert prompt_id in (await http.get("/history", params={"max_items": 5})).json()
        assert (await http.get("/queue")).json() == {"queue_running": [], "queue_pending": []}

        viewed = await http.get(
            "/view", params={"filename": image["filename"], "subfolder": "", "type": "output"}
        )
        assert viewed.status_code == 200 and viewed.headers["content-type"] == "image/png"
        from_comfy = decode_png(viewed.content)
        assert from_comfy.shape == (64, 64, 3)
        assert np.array_equal(from_comfy, await _native_png(cluster))

        # Same graph, another text: the same registered workflow, another image.
        workflows = (await http.get("/v1/workflows")).json()["workflows"]
        other = await http.post("/prompt", json={"prompt": _prompt(text="a green square")})
        assert other.status_code == 200, other.text
        other_id = other.json()["prompt_id"]
        assert other.json()["number"] == number + 1
        other_entry = await _history(http, other_id)
        assert other_entry["outputs"]["9"]["images"][0]["filename"] == f"{other_id}.png"
        assert (await http.get("/v1/workflows")).json()["workflows"] == workflows
        first_run = (await http.get(f"/v1/requests/{prompt_id}")).json()
        second_run = (await http.get(f"/v1/requests/{other_id}")).json()
        assert first_run["workflow"] == second_run["workflow"]
        assert first_run["workflow"].startswith("comfy-")
        other_png = await http.get(f"/api/view?filename={other_id}.png")
        assert other_png.status_code == 200
        assert not np.array_equal(decode_png(other_png.content), from_comfy)

        # The first prompt again gives the first image (this prompt's values, not the last one's).
        again = await http.post("/prompt", json={"prompt": _prompt()})
        again_id = again.json()["prompt_id"]
        await _history(http, again_id)
        again_png = await http.get("/view", params={"filename": f"{again_id}.png"})
        assert np.array_equal(decode_png(again_png.content), from_comfy)


async def test_refusals_come_in_comfyuis_shapes() -> None:
    async with (
        EmbeddedCluster(workers=1, http_port=0) as cluster,
        httpx.AsyncClient(base_url=f"http://{cluster.http_address}", timeout=TIMEOUT_S) as http,
    ):
        broken = _prompt()
        broken["10"] = {"class_type": "FancyUpscaler", "inputs": {}}
        unknown = await http.post("/prompt", json={"prompt": broken})
        bad_input = _prompt()
        bad_input["6"]["inputs"].pop("text")
        missing = await http.post("/prompt", json={"prompt": bad_input})
        too_many = _prompt()
        too_many["3"]["inputs"]["steps"] = 100_000
        steps = await http.post("/prompt", json={"prompt": too_many})
        no_prompt = await http.post("/prompt", json={"client_id": "x"})
        bad_id = await http.post("/prompt", json={"prompt": _prompt(), "prompt_id": "../x"})
        traversal = await http.get("/view", params={"filename": "../etc/passwd", "type": "output"})
        traversal_png = await http.get("/view", params={"filename": "../../x.png"})
        subfolder = await http.get("/view", params={"filename": "abc.png", "subfolder": ".."})
        unknown_png = await http.get("/view", params={"filename": "abc.png"})
        history = await http.get("/history/no-such-prompt")
        prompt_info = await http.get("/prompt")

        # A socket opened after its prompt was posted still gets it from the start; /interrupt ends it.
        long = _prompt()
        long["3"]["inputs"]["steps"] = 200
        posted = await http.post("/prompt", json={"prompt": long, "client_id": "late", "prompt_id": "long-1"})
        reused = await http.post("/prompt", json={"prompt": _prompt(), "prompt_id": "long-1"})
        async with connect(f"ws://{cluster.http_address}/ws?clientId=late") as ws:
            status = json.loads(await asyncio.wait_for(ws.recv(), 10))
            first = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
            assert (await http.post("/interrupt", json={"prompt_id": "long-1"})).status_code == 200
            interrupted = await _messages_until_done(ws, "long-1")
        interrupted_entry = await _history(http, "long-1")
        queue = (await http.get("/queue")).json()

    assert unknown.status_code == 400
    error = unknown.json()
    assert error["error"]["type"] == "invalid_prompt"
    assert "unsupported ComfyUI node class 'FancyUpscaler'" in error["error"]["message"]
    assert error["error"]["extra_info"] == {} and "details" in error["error"]
    assert error["node_errors"]["10"]["class_type"] == "FancyUpscaler"

    assert missing.status_code == 400
    assert missing.json()["error"]["type"] == "prompt_outputs_failed_validation"
    assert "missing input 'text'" in missing.json()["node_errors"]["6"]["errors"][0]["message"]

    assert steps.status_code == 400, steps.text
    assert steps.json()["error"]["type"] == "prompt_outputs_failed_validation"
    assert "steps" in steps.json()["error"]["details"]
    assert list(steps.json()["node_errors"]) == ["3"]

    assert no_prompt.status_code == 400 and no_prompt.json()["error"]["type"] == "no_prompt"
    assert bad_id.status_code == 400
    assert traversal.status_code in (400, 404)
    assert traversal_png.status_code in (400, 404)
    assert subfolder.status_code in (400, 404)
    assert unknown_png.status_code == 404
    assert history.status_code == 200 and history.json() == {}
    assert prompt_info.json() == {"exec_info": {"queue_remaining": 0}}

    assert posted.json()["prompt_id"] == "long-1"
    assert reused.json() == posted.json()  # the same prompt_id again: the same prompt
    assert status["data"]["status"]["exec_info"]["queue_remaining"] == 1 and status["data"]["sid"] == "late"
    assert first["type"] == "execution_start" and first["data"]["prompt_id"] == "long-1"
    assert [m["type"] for m in interrupted][-2:] == ["execution_interrupted", "executing"]
    assert interrupted_entry["status"]["status_str"] == "error" and interrupted_entry["outputs"] == {}
    assert queue == {"queue_running": [], "queue_pending": []}


class _FakeCore:
    """Just enough of GatewayCore to count compiles."""

    def __init__(self) -> None:
        self.requests = RequestRegistry()
        self.compiles = 0
        self.submitted: list[tuple[str, dict[str, Any]]] = []
        self.forget_workflows = False  # as if the cluster's store had lost the registered workflows

    async def import_comfyui(self, workflow_json: str) -> compiler_pb2.ImportComfyUIReply:
        self.compiles += 1
        spec = import_comfyui(json.loads(workflow_json), "comfy-fake")
        return compiler_pb2.ImportComfyUIReply(
            workflow=spec, registered=compiler_pb2.RegisterWorkflowReply(name="comfy-fake")
        )

    async def submit(self, workflow: str, inputs: dict[str, Any], request_id: str = "") -> TrackedRequest:
        if self.forget_workflows:
            self.forget_workflows = False
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"unknown workflow {workflow!r}", "workflow")
        self.submitted.append((workflow, {k: v.WhichOneof("kind") for k, v in inputs.items()}))
        tracked = TrackedRequest(request_id, workflow)
        self.requests.add(tracked)
        return tracked


async def test_a_repeated_prompt_is_compiled_once() -> None:
    core = _FakeCore()
    front = ComfyFront(core, GatewayLimits())  # type: ignore[arg-type]
    first = await front.submit(_prompt(), "p1", "c", {})
    await front.submit(_prompt(), "p2", "c", {})
    await front.submit(_prompt(text="another"), "p3", "c", {})
    assert core.compiles == 2
    assert (first.sampler, first.decoder, first.saver, first.number) == ("3", "8", "9", 1)
    assert core.submitted[0][0] == "comfy-fake"
    assert set(core.submitted[0][1]) == {
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "guidance_scale",
        "height",
        "width",
    }
    core.forget_workflows = True  # a cached compile whose workflow is gone is compiled again
    await front.submit(_prompt(), "p4", "c", {})
    assert core.compiles == 3 and "p4" in front.prompts
    with pytest.raises(InvalidRequest, match="already in use"):
        await front.submit(_prompt(), "p4", "c", {})
