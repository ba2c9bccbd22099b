"""Chaos, bad input through the HTTP gateway of an embedded cluster: images that are not images,
huge prompts, NaN and infinities in JSON numbers, negative and zero sizes, unknown inputs and wrong
types on the native API (/v1/generate, /v1/requests) and the OpenAI images API, then malformed
workflows on the ComfyUI front (POST /prompt).

Every refusal is a 4xx in the gateway's one error shape naming the field
(`{"error": {"code", "message", "field", "type", "param"}}`), or ComfyUI's shape on its front
(`{"error": {"type", "message", "details", "extra_info"}, "node_errors": {...}}`), never a 5xx; the
cluster still serves a valid request afterwards.

FIXED_DEFECTS lists what these tests found outside the compiler (each fixed, each kept as a test).
"""

from __future__ import annotations

import base64
import copy
import io
import json
from pathlib import Path
from typing import Any

import httpx
import PIL.Image
import pytest
from google.protobuf import json_format
from lego.builtin_workflows import TINY_SD15_TXT2IMG, sd15_controlnet, sd15_img2img
from lego_cli.cluster import EmbeddedCluster

pytestmark = pytest.mark.timeout(120)

IMG2IMG, CANNY = "chaos-img2img", "chaos-canny"
VALID = {"prompt": "a red circle", "steps": 2, "height": 64, "width": 64, "seed": 1}
COMFY_TXT2IMG: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "data" / "comfyui_txt2img.json").read_text()
)
ERROR_KEYS = {"code", "message", "field", "type", "param"}


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'

# Defects these tests found in the gateway and the data engine: label -> what was wrong (all fixed;
# test_fixed_defects_stay_fixed keeps each one).
FIXED_DEFECTS = {
    "json int beyond 64 bits": (
        "a JSON integer input beyond int64 (seed 1e30 as an int) answers 500: lego.values.to_value "
        "raises ValueError('Value out of range') in lego_gateway.rest.submit; want 400 naming the input"
    ),
    "json nested too deep": (
        "a body nested deeper than Python's JSON recursion limit answers 400 in FastAPI's own shape "
        "({'detail': 'There was an error parsing the body'}), not the gateway's error shape"
    ),
    "img2img image smaller than the latent grid": (
        "an img2img image under 8 pixels on a side (3x3, 1x100000) passes lego_gateway.limits.check_image "
        "and fails on the worker (image.load: 'height and width must be > 0'): 500 INTERNAL, not 400 'image'"
    ),
    "openai unknown model": (
        "POST /v1/images/generations with an unknown model answers 404 naming field/param 'workflow', "
        "which is not a parameter of that API: lego_gateway.openai_front renames 'size' errors, not this one"
    ),
    "comfyui node id with a non-ASCII digit": (
        "a ComfyUI node id such as '²' answers 500: lego_gateway.comfyui_front._sort_key calls int() "
        "on str.isdigit() ids"
    ),
    "comfyui body nested too deep": (
        "a /prompt body nested deeper than the JSON recursion limit answers 500: post_prompt catches "
        "ValueError from request.json() but not RecursionError"
    ),
}


def native_cases() -> list[tuple[str, dict[str, Any] | bytes, str | None]]:
    """(label, body, the field the error must name; None: any): each a refusal."""

    def request(workflow: str = TINY_SD15_TXT2IMG, **inputs: Any) -> dict[str, Any]:
        return {"workflow": workflow, "inputs": {**VALID, **inputs}}

    def raw(inputs_json: str, workflow: str = TINY_SD15_TXT2IMG) -> bytes:
        return f'{{"workflow": "{workflow}", "inputs": {inputs_json}}}'.encode()

    image_cases = {
        "text as base64": data_uri(b"hello, not an image"),
        "truncated PNG": data_uri(png(64, 64)[:60]),
        "empty PNG": data_uri(b""),
        "SVG": data_uri(SVG, "image/svg+xml"),
        "a path": "/etc/passwd",
        "a URL": "http://127.0.0.1:1/x.png",
        "not base64": "data:image/png;base64,!!!not base64!!!",
        "not ;base64": "data:image/png," + "A" * 10,
        "a number": 5,
    }
    cases: list[tuple[str, dict[str, Any] | bytes, str | None]] = []
    for label, value in image_cases.items():
        cases.append((f"img2img image: {label}", request(IMG2IMG, image=value), "image"))
        cases.append((f"canny control_image: {label}", request(CANNY, control_image=value), "control_image"))
    cases += [
        ("prompt of 5000 characters", request(prompt="x" * 5000), "prompt"),
        ("prompt of 1 MB", request(prompt="é" * 1_000_000), "prompt"),
        ("negative_prompt of 5000 characters", request(negative_prompt="x" * 5000), "negative_prompt"),
        ("empty prompt", request(prompt="   "), "prompt"),
        ("steps NaN", raw('{"prompt": "x", "steps": NaN}'), "steps"),
        ("guidance_scale Infinity", raw('{"prompt": "x", "guidance_scale": Infinity}'), "guidance_scale"),
        ("guidance_scale -Infinity", raw('{"prompt": "x", "guidance_scale": -Infinity}'), "guidance_scale"),
        ("seed NaN", raw('{"prompt": "x", "seed": NaN}'), "seed"),
        ("seed 1e999", raw('{"prompt": "x", "seed": 1e999}'), "seed"),
        ("height NaN", raw('{"prompt": "x", "height": NaN}'), "height"),
        ("width -1e999", raw('{"prompt": "x", "width": -1e999}'), "width"),
        ("height 0", request(height=0), "height"),
        ("height -64", request(height=-64), "height"),
        ("width 0", request(width=0), "width"),
        ("width -8", request(width=-8), "width"),
        ("height 65 (not a multiple of 8)", request(height=65), "height"),
        ("height 2056 (over the workflow's limit)", request(height=2056), "height"),
        ("width 100000 (over the gateway's limit)", request(width=100_000), "width"),
        ("steps 0", request(steps=0), "steps"),
        ("steps -1", request(steps=-1), "steps"),
        ("steps 201", request(steps=201), "steps"),
        ("steps 10^12", request(steps=10**12), "steps"),
        ("steps 2.5", request(steps=2.5), "steps"),
        ("steps true", request(steps=True), "steps"),
        ("steps '20'", request(steps="20"), "steps"),
        ("steps an object", request(steps={"n": 2}), "inputs.steps"),
        ("seed -1", request(seed=-1), "seed"),
        ("seed 1.5", request(seed=1.5), "seed"),
        ("guidance_scale -1e308", request(guidance_scale=-1e308), "guidance_scale"),
        ("guidance_scale 'high'", request(guidance_scale="high"), "guidance_scale"),
        ("prompt 5", request(prompt=5), "prompt"),
        ("prompt null", request(prompt=None), "inputs.prompt"),
        ("unknown input", request(nope=1), "nope"),
        ("unknown input with a 100 000 character name", request(**{"n" * 100_000: 1}), "n" * 100),
        ("image to a workflow without one", request(image=data_uri(png(8, 8))), "image"),
        ("inputs a list", {"workflow": TINY_SD15_TXT2IMG, "inputs": [1, 2]}, "inputs"),
        ("workflow a number", {"workflow": 5, "inputs": VALID}, "workflow"),
        ("workflow empty", {"workflow": "", "inputs": VALID}, "workflow"),
        ("workflow unknown", {"workflow": "nope", "inputs": VALID}, "workflow"),
        ("workflow of 100 000 characters", {"workflow": "w" * 100_000, "inputs": VALID}, "workflow"),
        ("slo_ms negative", {**request(), "slo_ms": -1}, "slo_ms"),
        ("slo_ms NaN", raw('{"prompt": "x"}')[:-1] + b', "slo_ms": NaN}', "slo_ms"),
        ("request_id with a slash", {**request(), "request_id": "../x"}, "request_id"),
        ("no body", b"", None),
        ("not JSON", b"not json", None),
        ("JSON but not an object", b"[1, 2, 3]", None),
    ]
    return cases


def openai_cases() -> list[tuple[str, dict[str, Any] | bytes, str | None]]:
    def body(**fields: Any) -> dict[str, Any]:
        return {"prompt": "a red circle", "size": "64x64", "steps": 2, **fields}

    return [
        ("size 0x0", body(size="0x0"), "size"),
        ("size -64x64", body(size="-64x64"), "size"),
        ("size 64x", body(size="64x"), "size"),
        ("size 99999x99999", body(size="99999x99999"), "size"),
        ("n 0", body(n=0), "n"),
        ("n 1000", body(n=1000), "n"),
        ("steps NaN", b'{"prompt": "x", "size": "64x64", "steps": NaN}', "steps"),
        (
            "guidance_scale Infinity",
            b'{"prompt": "x", "size": "64x64", "guidance_scale": Infinity}',
            "guidance_scale",
        ),
        ("seed 1e999", b'{"prompt": "x", "size": "64x64", "seed": 1e999}', "seed"),
        ("seed -1", body(seed=-1), "seed"),
        ("steps 10^22", body(steps=10**22), "steps"),
        ("prompt empty", body(prompt=""), "prompt"),
        ("prompt of 5000 characters", body(prompt="x" * 5000), "prompt"),
        ("response_format gif", body(response_format="gif"), "response_format"),
    ]


def assert_refusal(label: str, response: httpx.Response, field: str | None) -> None:
    assert 400 <= response.status_code < 500, (label, response.status_code, response.text[:300])
    body = response.json()
    assert isinstance(body, dict) and set(body.get("error", {})) >= ERROR_KEYS, (label, response.text[:300])
    error = body["error"]
    assert error["message"], label
    if field is not None:
        assert error["field"] == field and error["param"] == (field or None), (label, error)
        assert len(response.content) < 10_000, (label, len(response.content))  # no echo of a huge value


async def post(http: httpx.AsyncClient, path: str, body: dict[str, Any] | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return await http.post(path, content=body, headers={"content-type": "application/json"})
    return await http.post(path, json=body)


async def register_image_workflows(http: httpx.AsyncClient) -> None:
    for spec in (
        sd15_img2img(IMG2IMG, "tiny-sd15", default_size=64),
        sd15_controlnet(CANNY, "tiny-sd15", default_size=64),
    ):
        response = await http.post("/v1/workflows", json=json_format.MessageToDict(spec))
        assert response.status_code == 201, response.text


async def assert_serves(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/generate", json={"workflow": TINY_SD15_TXT2IMG, "inputs": VALID, "response_format": "b64_json"}
    )
    assert response.status_code == 200, response.text[:300]
    assert base64.b64decode(response.json()["b64_json"]).startswith(b"\x89PNG")


def rest(cluster: EmbeddedCluster) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://{cluster.http_address}", timeout=60)


async def test_bad_requests_on_the_native_and_openai_apis_are_4xx_naming_the_field() -> None:
    async with EmbeddedCluster(workers=1, http_port=0) as cluster, rest(cluster) as http:
        await register_image_workflows(http)
        for label, body, field in native_cases():
            for path in ("/v1/generate", "/v1/requests"):
                assert_refusal(f"{path} {label}", await post(http, path, body), field)
        for label, body, field in openai_cases():
            assert_refusal(f"openai {label}", await post(http, "/v1/images/generations", body), field)
        too_big = b'{"workflow": "x", "inputs": {"prompt": "' + b"x" * (33 * 1024 * 1024) + b'"}}'
        assert_refusal("a 33 MiB body", await post(http, "/v1/generate", too_big), "body")
        assert (await post(http, "/v1/generate", too_big)).status_code == 413

        # An odd image a workflow resizes anyway (a ControlNet's) is simply served.
        odd = {**VALID, "control_image": data_uri(png(100_000, 1))}
        served = await http.post("/v1/generate", json={"workflow": CANNY, "inputs": odd})
        assert served.status_code == 200 and served.content.startswith(b"\x89PNG"), served.text[:300]
        await assert_serves(http)


def comfy_cases() -> list[tuple[str, Any, str | None]]:
    """(label, the /prompt body, the node the error must name; None: the workflow as a whole)."""

    def changed(node_id: str, name: str, value: Any) -> dict[str, Any]:
        prompt = copy.deepcopy(COMFY_TXT2IMG)
        prompt[node_id]["inputs"][name] = value
        return {"prompt": prompt}

    def extra(node_id: str, node: Any) -> dict[str, Any]:
        return {"prompt": {**copy.deepcopy(COMFY_TXT2IMG), node_id: node}}

    return [
        ("a cycle through the sampler", changed("3", "model", ["8", 0]), "3"),
        ("a node linked to itself", changed("6", "clip", ["6", 0]), "6"),
        ("a link of one element", changed("3", "model", ["4"]), "3"),
        ("a link with a string index", changed("3", "model", ["4", "x"]), "3"),
        ("a link with a negative index", changed("3", "model", ["4", -1]), "3"),
        ("a link past the outputs", changed("3", "model", ["4", 7]), "3"),
        ("a dangling link", changed("3", "model", ["44", 0]), "3"),
        ("a link to SaveImage", changed("8", "samples", ["9", 0]), "8"),
        ("a link of the wrong kind", changed("3", "model", ["4", 1]), "3"),
        ("a link where a value goes", changed("3", "steps", ["4", 0]), "3"),
        ("an unknown class", extra("10", {"class_type": "FancyUpscaler", "inputs": {}}), "10"),
        ("a class_type that is a number", extra("10", {"class_type": 5, "inputs": {}}), "10"),
        ("a node that is a number", extra("10", 5), "10"),
        ("a node that is a list", extra("10", ["KSampler"]), "10"),
        ("inputs that are a string", extra("6", {"class_type": "CLIPTextEncode", "inputs": "x"}), "6"),
        ("cfg a string", changed("3", "cfg", "high"), "3"),
        ("steps a float", changed("3", "steps", 2.5), "3"),
        ("steps null", changed("3", "steps", None), "3"),
        ("seed beyond 64 bits", changed("3", "seed", 10**30), "3"),
        ("cfg NaN", changed("3", "cfg", float("nan")), "3"),
        ("denoise Infinity", changed("3", "denoise", float("inf")), "3"),
        ("steps -4", changed("3", "steps", -4), "3"),
        ("steps 10^12", changed("3", "steps", 10**12), "3"),
        ("width 0", changed("5", "width", 0), "5"),
        ("height -64", changed("5", "height", -64), "5"),
        ("batch_size 0", changed("5", "batch_size", 0), "5"),
        ("a prompt of 100 000 characters", changed("6", "text", "x" * 100_000), "6"),
        ("an unknown checkpoint", changed("4", "ckpt_name", "nope.safetensors"), "4"),
        ("no output node", {"prompt": {k: v for k, v in COMFY_TXT2IMG.items() if k != "9"}}, None),
        ("an empty prompt", {"prompt": {}}, None),
        ("a prompt that is a list", {"prompt": [1]}, None),
        ("the UI format", {"prompt": {"nodes": [], "links": []}}, None),
        ("no prompt", {"client_id": "x"}, None),
        ("a prompt_id with a slash", {"prompt": COMFY_TXT2IMG, "prompt_id": "../x"}, None),
        ("not JSON", b"not json", None),
        ("NaN as the prompt", b'{"prompt": NaN}', None),
    ]


async def test_malformed_comfyui_workflows_are_400_in_comfyuis_shape() -> None:
    async with EmbeddedCluster(workers=1, http_port=0) as cluster, rest(cluster) as http:
        for label, body, node in comfy_cases():
            response = await post(
                http, "/prompt", body if isinstance(body, bytes) else json.dumps(body).encode()
            )
            assert response.status_code == 400, (label, response.status_code, response.text[:300])
            error = response.json()
            assert set(error["error"]) >= {"type", "message", "details", "extra_info"}, (label, error)
            assert isinstance(error.get("node_errors"), dict), (label, error)
            assert error["error"]["message"], label
            if node is not None:
                named = node in error["node_errors"] or f"node {node}" in error["error"]["message"]
                assert named, (label, response.text[:300])
            assert len(response.content) < 20_000, (label, len(response.content))
        valid = copy.deepcopy(COMFY_TXT2IMG)
        valid["3"]["inputs"]["steps"] = 2
        queued = await http.post("/prompt", json={"prompt": valid})
        assert queued.status_code == 200 and queued.json()["prompt_id"], queued.text
        await assert_serves(http)


# ---- the defects found here and fixed, each asserting the right behaviour ----


async def _fixed_defect(label: str, http: httpx.AsyncClient) -> None:
    if label == "json int beyond 64 bits":
        response = await post(
            http, "/v1/generate", {"workflow": TINY_SD15_TXT2IMG, "inputs": {**VALID, "seed": 10**30}}
        )
        assert_refusal(label, response, "seed")
    elif label == "json nested too deep":
        assert_refusal(label, await post(http, "/v1/generate", b"[" * 100_000), None)
    elif label == "img2img image smaller than the latent grid":
        await register_image_workflows(http)
        for size in ((3, 3), (100_000, 1)):
            image = data_uri(png(*size))
            response = await post(
                http, "/v1/generate", {"workflow": IMG2IMG, "inputs": {**VALID, "image": image}}
            )
            assert_refusal(f"{label} {size}", response, "image")
    elif label == "openai unknown model":
        response = await post(
            http, "/v1/images/generations", {"prompt": "x", "size": "64x64", "model": "nope"}
        )
        assert_refusal(label, response, "model")
    elif label == "comfyui node id with a non-ASCII digit":
        prompt = {("²" if k == "9" else k): v for k, v in COMFY_TXT2IMG.items()}
        response = await http.post("/prompt", json={"prompt": prompt})
        assert response.status_code < 500, response.text[:300]
    else:
        response = await post(http, "/prompt", b'{"prompt": {"3": ' + b"[" * 100_000 + b"}}")
        assert response.status_code == 400, response.text[:300]


async def test_fixed_defects_stay_fixed() -> None:
    async with EmbeddedCluster(workers=1, http_port=0) as cluster, rest(cluster) as http:
        for label in FIXED_DEFECTS:
            await _fixed_defect(label, http)
