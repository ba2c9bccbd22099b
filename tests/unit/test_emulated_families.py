"""Every node of every family's built-in workflows runs on the emulated backend: a profile and a
placeholder for each (operator, mode), outputs shaped so that the next node can consume them."""

from __future__ import annotations

from typing import Any

import pytest
from lego.builtin_workflows import (
    flux_img2img,
    flux_txt2img,
    sd3_img2img,
    sd3_txt2img,
    sd15_controlnet,
    sd15_img2img,
    sd15_txt2img,
    sdxl_img2img,
    sdxl_txt2img,
)
from lego.graph import Ref, instantiate
from lego.profiles import ProfileSet, default_profile_dir
from lego.request_inputs import resolve_inputs
from lego.v1 import compiler_pb2
from lego_worker.emulated_backend import EmulatedBackend

SPECS = {
    "sd15": (sd15_txt2img("a", "tiny-sd15"), {}),
    "sd15-controlnet": (sd15_controlnet("b", "tiny-sd15"), {"control_image": "data:,"}),
    "sd15-img2img": (sd15_img2img("c", "tiny-sd15"), {"image": "data:,", "strength": 0.5}),
    "sdxl": (sdxl_txt2img("d", "tiny-sdxl"), {}),
    "sdxl-controlnet": (
        sdxl_txt2img("e", "tiny-sdxl", controlnet="controlnet_canny"),
        {"control_image": "x"},
    ),
    "sd3": (sd3_txt2img("f", "tiny-sd3"), {}),
    "sd3-controlnet": (sd3_txt2img("m", "tiny-sd3", controlnet="controlnet_canny"), {"control_image": "x"}),
    "flux-dev": (flux_txt2img("g", "tiny-flux-dev"), {}),
    "flux-schnell": (flux_txt2img("h", "tiny-flux-schnell", default_steps=4), {}),
    "flux-controlnet": (
        flux_txt2img("i", "tiny-flux-dev", controlnet="controlnet_canny"),
        {"control_image": "x"},
    ),
    "sdxl-img2img": (sdxl_img2img("j", "tiny-sdxl"), {"image": "x"}),
    "sd3-img2img": (sd3_img2img("k", "tiny-sd3"), {"image": "x"}),
    "flux-img2img": (flux_img2img("l", "tiny-flux-dev"), {"image": "x"}),
}


def run_all(spec: compiler_pb2.WorkflowSpec, inputs: dict[str, Any]) -> tuple[dict[Ref, Any], float]:
    backend = EmulatedBackend(ProfileSet(default_profile_dir()), sleep=lambda seconds: None)
    graph = instantiate(spec, resolve_inputs(spec, {"prompt": "x", "steps": 3, **inputs}))
    produced: dict[Ref, Any] = {}
    seconds = 0.0
    for node in graph.nodes.values():
        item = {name: produced[v] if isinstance(v, Ref) else v for name, v in node.inputs.items()}
        seconds += backend.execution_s(node.op, node.model, node.mode, [item])
        backend.prefetch(node.model)
        [outputs] = backend.run(node.op, node.model, node.mode, [item], node.patches)
        assert set(outputs) == set(node.outputs), node.id
        produced |= {Ref(node.id, name): value for name, value in outputs.items()}
    return produced, seconds


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_node_has_a_profile_and_a_placeholder(name: str) -> None:
    spec, inputs = SPECS[name]
    produced, seconds = run_all(spec, inputs)
    image = next(value for ref, value in produced.items() if ref.output == "image")
    # the builders' default sizes; an image loaded at its own size is a 512 x 512 placeholder
    side = 512 if name.startswith("sd15") or name == "sdxl-img2img" else 1024
    assert image.shape == (1, side, side, 3)
    assert seconds > 0
