"""A ComfyUI workflow, imported and run through the cluster, gives the Python-API workflow's image
(and diffusers' own); `lego workflows compile/register` work on the same file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from lego.builtin_workflows import sd15_txt2img
from lego.grpc_server import channel
from lego.v1 import compiler_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from lego.values import Scalar, to_values
from lego_cli.cluster import EmbeddedCluster
from lego_cli.main import main
from lego_compiler.comfyui import import_comfyui

from tests.integration.test_families import SETTINGS as FAMILY
from tests.integration.test_families import flux_reference, sdxl_reference
from tests.pipeline_reference import decode_png, reference_image

COMFY_FILE = Path(__file__).parents[1] / "data" / "comfyui_txt2img.json"


SAVED: dict[str, Scalar] = {
    "prompt": "a red circle on a blue background",
    "negative_prompt": "blurry",
    "seed": 42,
    "steps": 4,
    "guidance_scale": 7.5,
    "height": 64,
    "width": 64,
}


async def _generate(cluster: EmbeddedCluster, workflow: str, **inputs: Scalar) -> np.ndarray:
    request = gateway_pb2.GenerateRequest(workflow=workflow, inputs=to_values(inputs))
    async with channel(cluster.gateway_address) as chan:
        reply = await gateway_pb2_grpc.GatewayStub(chan).Generate(request)
    return decode_png(reply.png)


async def test_comfyui_txt2img_gives_the_python_workflows_image_and_the_pipelines() -> None:
    comfy = import_comfyui(json.loads(COMFY_FILE.read_text()), "comfy-txt2img")
    python = sd15_txt2img("python-txt2img", "tiny-sd15", default_size=64)
    async with EmbeddedCluster(workers=1) as cluster:
        async with channel(cluster.compiler_address) as chan:
            stub = compiler_pb2_grpc.CompilerStub(chan)
            await stub.RegisterWorkflow(comfy)
            await stub.RegisterWorkflow(python)
        from_comfy = await _generate(cluster, "comfy-txt2img")  # the file's saved values
        from_python = await _generate(cluster, "python-txt2img", **SAVED)
    assert np.array_equal(from_comfy, from_python)
    reference = reference_image(
        "a red circle on a blue background", "blurry", 42, 4, 7.5, height=64, width=64
    )
    assert np.array_equal(from_comfy, reference)


def test_compile_prints_the_template_and_exits_2_with_the_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["workflows", "compile", "--format", "comfyui", str(COMFY_FILE), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["node_count"] == 4
    assert summary["nodes_per_model"]["tiny-sd15:text_encoder"] == 2
    assert "denoise_loop_2.latents -> vae_3.latents" in summary["edges"]
    broken = json.loads(COMFY_FILE.read_text())
    broken["10"] = {"class_type": "FancyUpscaler", "inputs": {}}
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    assert main(["workflows", "compile", "--format", "comfyui", str(path)]) == 2
    assert "unsupported ComfyUI node class 'FancyUpscaler'" in capsys.readouterr().err


def test_compile_a_python_file_reports_type_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "wf.py"
    source.write_text(
        "from lego import VAE, TextEncoder, Workflow\n"
        "with Workflow('bad') as wf:\n"
        "    wf.output('image', VAE('tiny-sd15:vae').decode(TextEncoder('tiny-sd15:text_encoder')('x')))\n"
    )
    assert main(["workflows", "compile", str(source)]) == 2
    assert "input 'latents' expects latents, got embeddings" in capsys.readouterr().err
    source.write_text(
        "from lego.builtin_workflows import sd15_controlnet\nspec = sd15_controlnet('cn', 'tiny-sd15')\n"
    )
    assert main(["workflows", "compile", str(source)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("workflow cn (IR v2): 5 nodes")


async def test_register_through_the_compiler_then_list(capsys: pytest.CaptureFixture[str]) -> None:
    async with EmbeddedCluster(workers=1) as cluster:
        args = ["workflows", "register", str(COMFY_FILE), "--compiler", cluster.compiler_address]
        assert await asyncio.to_thread(main, args) == 0
        assert json.loads(capsys.readouterr().out)["name"] == "comfyui_txt2img"
        assert await asyncio.to_thread(main, ["workflows", "list", "--gateway", cluster.gateway_address]) == 0
    names = [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()]
    assert "comfyui_txt2img" in names


async def test_comfyui_sdxl_and_flux_workflows_give_their_pipelines_images() -> None:
    base = json.loads(COMFY_FILE.read_text())
    for node_id, text in (("6", FAMILY["prompt"]), ("7", FAMILY["negative_prompt"])):
        base[node_id]["inputs"]["text"] = text
    base["3"]["inputs"] |= {"seed": FAMILY["seed"], "steps": FAMILY["steps"], "cfg": FAMILY["guidance_scale"]}
    sdxl = json.loads(json.dumps(base))
    sdxl["4"]["inputs"]["ckpt_name"] = "tiny-sdxl.safetensors"
    flux = json.loads(json.dumps(base))
    flux["4"]["inputs"]["ckpt_name"] = "tiny-flux-dev.safetensors"
    flux["10"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 3.5}}
    flux["3"]["inputs"] |= {"positive": ["10", 0], "cfg": 1.0}
    async with EmbeddedCluster(workers=1) as cluster:
        async with channel(cluster.compiler_address) as chan:
            stub = compiler_pb2_grpc.CompilerStub(chan)
            await stub.RegisterWorkflow(import_comfyui(sdxl, "comfy-sdxl"))
            await stub.RegisterWorkflow(import_comfyui(flux, "comfy-flux"))
        from_sdxl = await _generate(cluster, "comfy-sdxl")
        from_flux = await _generate(cluster, "comfy-flux")
    assert np.array_equal(from_sdxl, sdxl_reference(float(FAMILY["guidance_scale"])))
    assert np.array_equal(from_flux, flux_reference(True, int(FAMILY["steps"]), 3.5))
