"""SD3 ControlNet templates: validation, and the per-request graph (the control image encoded once
with one copy per CFG branch, its latents sampled by the scheduler init, one ControlNet node per step
and branch feeding deferred block samples)."""

from __future__ import annotations

import pytest
from lego import operators
from lego.builtin_workflows import sd3_img2img, sd3_txt2img
from lego.graph import Ref, RequestGraph, instantiate, validate_spec
from lego.passes import optimise
from lego.request_inputs import resolve_inputs
from lego.v1 import compiler_pb2
from lego.values import Scalar


def _spec() -> compiler_pb2.WorkflowSpec:
    return sd3_txt2img("sd3-cn", "tiny-sd3", default_size=64, controlnet="controlnet_canny")


def _graph(spec: compiler_pb2.WorkflowSpec, **inputs: Scalar) -> RequestGraph:
    return instantiate(spec, resolve_inputs(spec, {"prompt": "a cat", "control_image": "data:,", **inputs}))


def _loop(spec: compiler_pb2.WorkflowSpec) -> compiler_pb2.NodeSpec:
    return next(n for n in spec.nodes if n.op == operators.DENOISE_LOOP)


@pytest.mark.parametrize(("guidance", "branches"), [(5.0, 2), (1.0, 1)])
def test_one_encode_with_a_copy_per_branch_and_one_controlnet_per_step_and_branch(
    guidance: float, branches: int
) -> None:
    spec = optimise(_spec())
    assert validate_spec(spec) == []
    graph = _graph(spec, steps=3, guidance_scale=guidance)
    [encode] = [n for n in graph.nodes.values() if n.op == "vae" and n.mode != "decode"]
    assert (encode.mode, encode.inputs["copies"]) == ("encode_copies", branches)  # the template's is dead
    init = next(n for n in graph.nodes.values() if n.id.endswith("/init"))
    assert init.mode == "init_control"
    assert init.inputs["control_dist"] == Ref(encode.id, "latent_dist")
    controlnets = [n for n in graph.nodes.values() if n.op == "controlnet"]
    transformers = [n for n in graph.nodes.values() if n.op == "transformer"]
    assert len(controlnets) == len(transformers) == 3 * branches
    assert {n.mode for n in controlnets} == {"residuals_sd3"}
    assert all(n.inputs["control_samples"] == Ref(init.id, "control_samples") for n in controlnets)
    assert all(n.inputs["control_scaling"] == Ref(encode.id, "latent_scaling") for n in controlnets)
    # the pipeline's batch is (uncond, cond): each branch takes its own row of the sampled latents
    rows = {n.id.rsplit("/", 2)[1]: n.inputs["control_row"] for n in controlnets}
    assert rows == ({"uncond": 0, "cond": 1} if branches == 2 else {"cond": 0})
    for transformer in transformers:
        assert transformer.mode == "denoise_sd3_controlled"
        assert transformer.deferred == frozenset({"block_samples"})
        assert transformer.inputs["block_samples"] == Ref(f"{transformer.id}/controlnet", "block_samples")
    assert graph.consumers[Ref(init.id, "control_samples")] == 3 * branches


def test_the_control_latents_must_come_from_one_encode_control_node() -> None:
    spec = compiler_pb2.WorkflowSpec()
    spec.CopyFrom(_spec())
    scaling = next(b for b in _loop(spec).adapters[0].inputs if b.name == "control_scaling")
    scaling.ref.output = "latent_dist"
    errors = validate_spec(spec)
    assert any(
        "must be the latent_dist and latent_scaling of one vae.encode_control node" in e for e in errors
    )
    encode = next(n for n in spec.nodes if n.op == "vae" and n.mode == "encode_control")
    encode.mode = "encode"
    scaling.ref.output = "latent_scaling"
    assert any("of one vae.encode_control node" in e for e in validate_spec(spec))


def test_an_image_controlnet_on_an_sd3_loop_and_img2img_with_a_controlnet_are_errors() -> None:
    spec = compiler_pb2.WorkflowSpec()
    spec.CopyFrom(_spec())
    _loop(spec).adapters[0].kind = "controlnet"
    assert any("adapter 0 is a controlnet; this loop takes sd3_controlnet" in e for e in validate_spec(spec))
    img2img = compiler_pb2.WorkflowSpec()
    img2img.CopyFrom(sd3_img2img("i2i", "tiny-sd3", default_size=64))
    _loop(img2img).adapters.add().CopyFrom(_loop(_spec()).adapters[0])
    assert any("an SD3 ControlNet with img2img is not supported" in e for e in validate_spec(img2img))
