"""A ComfyUI SD3 workflow with a ControlNet, imported and run through the cluster, gives
StableDiffusion3ControlNetPipeline's image; its IR is the Python builder's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from lego import operators
from lego.builtin_workflows import sd3_txt2img
from lego.data_uri import encode_data_uri
from lego.graph import validate_spec
from lego_compiler.comfyui import import_comfyui
from lego_compiler.model_map import ModelMap

from tests.integration.test_families import SETTINGS, SIZE, run, sd3_controlnet_reference
from tests.integration.test_sd15_adapters import pattern

COMFY_FILE = Path(__file__).parents[1] / "data" / "comfyui_txt2img.json"
CONTROLNET_FILE = "sd3-canny.safetensors"
MODEL_MAP = ModelMap().extended({"controlnets": {CONTROLNET_FILE: "tiny-sd3:controlnet_canny"}})


def sd3_controlnet_prompt() -> dict[str, Any]:
    prompt: dict[str, Any] = json.loads(COMFY_FILE.read_text())
    prompt["4"]["inputs"]["ckpt_name"] = "tiny-sd3.safetensors"
    prompt["6"]["inputs"]["text"] = SETTINGS["prompt"]
    prompt["7"]["inputs"]["text"] = SETTINGS["negative_prompt"]
    prompt["3"]["inputs"] |= {
        "seed": SETTINGS["seed"],
        "steps": SETTINGS["steps"],
        "cfg": SETTINGS["guidance_scale"],
        "positive": ["11", 0],
        "negative": ["11", 1],
    }
    prompt["11"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": ["6", 0],
            "negative": ["7", 0],
            "control_net": ["13", 0],
            "image": ["12", 0],
            "vae": ["4", 2],  # ComfyUI's optional input; the checkpoint's VAE encodes the image
            "strength": 0.8,
            "start_percent": 0.0,
            "end_percent": 1.0,
        },
    }
    prompt["12"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
    prompt["13"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET_FILE}}
    return prompt


def test_the_import_is_the_python_builders_workflow() -> None:
    spec = import_comfyui(sd3_controlnet_prompt(), "comfy-sd3-cn", MODEL_MAP)
    assert validate_spec(spec) == []
    python = sd3_txt2img("python", "tiny-sd3", default_size=SIZE, controlnet="controlnet_canny")
    assert sorted((n.op, n.model, n.mode) for n in spec.nodes) == sorted(
        (n.op, n.model, n.mode) for n in python.nodes
    )
    [adapter] = next(n for n in spec.nodes if n.op == operators.DENOISE_LOOP).adapters
    assert (adapter.kind, adapter.model) == ("sd3_controlnet", "tiny-sd3:controlnet_canny")


async def test_the_imported_workflow_gives_the_pipelines_image() -> None:
    control = encode_data_uri(pattern(96, 8))
    spec = import_comfyui(sd3_controlnet_prompt(), "comfy-sd3-cn", MODEL_MAP)
    image, _ = await run(spec, {"image": control})  # every other input keeps the file's value
    reference = sd3_controlnet_reference("controlnet_canny", float(SETTINGS["guidance_scale"]), control, 0.8)
    assert np.array_equal(image, reference)
