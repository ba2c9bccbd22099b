"""Validation errors, template passes (CSE, dead nodes) and per-request unrolling of adapters/img2img."""

from __future__ import annotations

import pytest
from lego import operators
from lego.builtin_workflows import sd15_controlnet, sd15_img2img, sd15_txt2img
from lego.errors import InvalidRequest
from lego.graph import Ref, instantiate, validate_spec
from lego.passes import eliminate_common_subexpressions, eliminate_dead_template_nodes, optimise
from lego.request_inputs import resolve_inputs
from lego.v1 import compiler_pb2
from lego.values import Scalar
from lego.workflow import (
    VAE,
    ControlNet,
    LoRA,
    NoiseScheduler,
    TextEncoder,
    UNet,
    Workflow,
    denoise_loop,
    load_control_image,
)


def _txt2img_with(negative_text: str = "", extra_encode: bool = False) -> compiler_pb2.WorkflowSpec:
    with Workflow("cse") as wf:
        prompt = wf.input("prompt", str)
        encoder = TextEncoder("tiny-sd15:text_encoder")
        negative = encoder(negative_text)
        if extra_encode:
            encoder("unused")
        latents = denoise_loop(
            UNet("tiny-sd15:unet"),
            NoiseScheduler("tiny-sd15:scheduler"),
            prompt_embeds=encoder(prompt),
            negative_prompt_embeds=encoder(negative_text),  # the same text again
            steps=2,
            guidance_scale=7.5,
            seed=0,
            height=64,
            width=64,
            extra_iterations=1,
        )
        wf.output("image", VAE("tiny-sd15:vae").decode(latents))
        del negative
    return wf.to_spec()


def test_builtin_adapters_and_img2img_workflows_are_valid() -> None:
    for spec in (sd15_controlnet("a", "tiny-sd15"), sd15_img2img("b", "tiny-sd15")):
        assert validate_spec(spec) == []
        assert spec.ir_version == 2


def test_cse_merges_the_same_text_encoded_twice_and_rewires_its_consumers() -> None:
    spec = _txt2img_with("")
    assert sum(n.op == "text_encoder" for n in spec.nodes) == 3
    merged = eliminate_common_subexpressions(spec)
    encoders = [n for n in merged.nodes if n.op == "text_encoder"]
    assert len(encoders) == 2  # the prompt and the (one) negative prompt
    loop = next(n for n in merged.nodes if n.op == operators.DENOISE_LOOP)
    negative = next(b for b in loop.inputs if b.name == "negative_prompt_embeds")
    assert negative.ref.node == encoders[0].id
    assert validate_spec(merged) == []
    assert len(spec.nodes) == 5  # the input spec is unchanged (pure)


def test_cse_keeps_different_inputs_apart() -> None:
    spec = sd15_txt2img("t", "tiny-sd15")
    assert eliminate_common_subexpressions(spec) == spec


def test_dead_template_nodes_are_removed_and_optimise_does_both() -> None:
    spec = _txt2img_with("", extra_encode=True)
    pruned = eliminate_dead_template_nodes(spec)
    # dead: the "unused" encode, and the first negative encode (the loop reads the second one)
    assert len(pruned.nodes) == len(spec.nodes) - 2
    assert all(not any(b.constant.string_value == "unused" for b in n.inputs) for n in pruned.nodes)
    assert [n.op for n in optimise(spec).nodes].count("text_encoder") == 2


def _errors_for(mutate) -> list[str]:  # type: ignore[no-untyped-def]
    spec = compiler_pb2.WorkflowSpec()
    spec.CopyFrom(sd15_controlnet("cn", "tiny-sd15"))
    mutate(spec)
    return validate_spec(spec)


def _node(spec: compiler_pb2.WorkflowSpec, op: str) -> compiler_pb2.NodeSpec:
    return next(n for n in spec.nodes if n.op == op)


def test_type_mismatch_names_the_node_the_input_and_both_types() -> None:
    def mutate(spec: compiler_pb2.WorkflowSpec) -> None:
        vae = _node(spec, "vae")
        vae.inputs[0].ref.node, vae.inputs[0].ref.output = "text_encoder_1", "embeddings"

    assert "node vae_4: input 'latents' expects latents, got embeddings from text_encoder_1.embeddings" in (
        _errors_for(mutate)
    )


def test_a_string_workflow_input_cannot_feed_an_int_port() -> None:
    def mutate(spec: compiler_pb2.WorkflowSpec) -> None:
        loop = _node(spec, operators.DENOISE_LOOP)
        next(b for b in loop.inputs if b.name == "steps").workflow_input = "prompt"

    errors = _errors_for(mutate)
    assert any(
        "node denoise_loop_3: input 'steps' expects int, got string from input prompt" in e for e in errors
    )


def test_adapter_errors_name_the_loop_and_the_input() -> None:
    def mutate(spec: compiler_pb2.WorkflowSpec) -> None:
        adapter = _node(spec, operators.DENOISE_LOOP).adapters[0]
        adapter.inputs[0].ref.output = "pixels"
        del adapter.inputs[1]

    errors = _errors_for(mutate)
    assert any(
        "adapter 0 (controlnet tiny-sd15:controlnet_canny): input 'control_image' refers to image_0.pixels"
        in e
        for e in errors
    )
    assert any("missing required input 'conditioning_scale'" in e for e in errors)


def test_unknown_adapter_kind_and_lora_targets_outside_the_graph_are_errors() -> None:
    def mutate(spec: compiler_pb2.WorkflowSpec) -> None:
        loop = _node(spec, operators.DENOISE_LOOP)
        loop.adapters[0].kind = "t2i_adapter"
        loop.patches.add(source="/l.safetensors", scale=1.0, target="other:unet")
        loop.patches.add(source="/m.safetensors", scale=1.0, target="tiny-sd15:text_encoder")
        loop.patches.add(source="/n.safetensors", scale=1.0)

    errors = _errors_for(mutate)
    assert any("unknown adapter kind 't2i_adapter'" in e for e in errors)
    assert any(
        "node denoise_loop_3: LoRA /l.safetensors targets model 'other:unet', which is not in the graph" in e
        for e in errors
    )
    assert any("LoRA /m.safetensors targets 'tiny-sd15:text_encoder'" in e for e in errors)
    assert not any("/n.safetensors" in e for e in errors)  # no target: the loop's denoiser


def test_img2img_needs_both_inputs() -> None:
    def mutate(spec: compiler_pb2.WorkflowSpec) -> None:
        loop = _node(spec, operators.DENOISE_LOOP)
        loop.inputs.add(name="strength", constant={"float_value": 0.5})

    assert any(
        "input 'strength' needs inputs ['init_latents', 'init_scaling'] too" in e for e in _errors_for(mutate)
    )
    with Workflow("x"), pytest.raises(ValueError, match="both init_latents and strength"):
        denoise_loop(
            UNet("u:unet"),
            NoiseScheduler("u:scheduler"),
            prompt_embeds=TextEncoder("u:te")("a"),
            negative_prompt_embeds=TextEncoder("u:te")(""),
            steps=1,
            guidance_scale=1.0,
            seed=0,
            height=8,
            width=8,
            strength=0.5,
        )


def _graph(spec: compiler_pb2.WorkflowSpec, **inputs: Scalar):  # type: ignore[no-untyped-def]
    return instantiate(spec, resolve_inputs(spec, {"prompt": "a cat", **inputs}))


@pytest.mark.parametrize(("guidance", "branches"), [(7.5, 2), (1.0, 1)])
def test_controlnet_is_one_node_per_step_and_branch_feeding_deferred_residuals(
    guidance: float, branches: int
) -> None:
    spec = sd15_controlnet("cn", "tiny-sd15", default_size=64)
    graph = _graph(spec, control_image="data:,", steps=3, guidance_scale=guidance)
    controlnets = [n for n in graph.nodes.values() if n.op == "controlnet"]
    denoisers = [n for n in graph.nodes.values() if n.op == "unet"]
    assert len(controlnets) == len(denoisers) == branches * 4  # PNDM: steps + 1 iterations
    for denoiser in denoisers:
        assert denoiser.mode == "denoise_controlled"
        assert denoiser.deferred == frozenset({"down_residuals", "mid_residual"})
        adapter = graph.nodes[denoiser.inputs["down_residuals"].node]  # type: ignore[union-attr]
        assert adapter.op == "controlnet" and adapter.inputs["sample"] == denoiser.inputs["sample"]
        assert adapter.inputs["encoder_hidden_states"] == denoiser.inputs["encoder_hidden_states"]
    assert [n.op for n in graph.nodes.values()].count("image") == 1  # loaded once per request
    assert graph.consumers[Ref("image_0", "control_image")] == branches * 4


@pytest.mark.parametrize(
    ("steps", "strength", "iterations", "first"), [(4, 0.5, 3, 2), (10, 1.0, 11, 0), (3, 0.4, 2, 2)]
)
def test_img2img_starts_where_strength_says(steps: int, strength: float, iterations: int, first: int) -> None:
    spec = sd15_img2img("i", "tiny-sd15", default_size=64)
    graph = _graph(spec, image="data:,", steps=steps, strength=strength)
    init = graph.nodes["denoise_loop_4/init"]
    assert init.mode == "init_from_image"
    assert (init.inputs["iterations"], init.inputs["first_index"]) == (iterations, first)
    assert init.inputs["init_latents"] == Ref("vae_1", "latent_dist")
    assert init.inputs["init_scaling"] == Ref("vae_1", "latent_scaling")  # from the VAE itself
    assert sum(n.op == "unet" for n in graph.nodes.values()) == 2 * iterations


def test_img2img_strength_too_small_for_the_steps_is_an_invalid_request() -> None:
    spec = sd15_img2img("i", "tiny-sd15", default_size=64)
    with pytest.raises(InvalidRequest, match=r"strength 0\.1 leaves no denoising step of 4"):
        _graph(spec, image="data:,", steps=4, strength=0.1)


def test_controlnet_operator_records_an_adapter_not_a_node() -> None:
    with Workflow("w") as wf:
        size = wf.input("size", int, default=64)
        control = load_control_image("data:,", size, size)
        use = ControlNet("tiny-sd15:controlnet_depth").apply(control, 0.5)
        encoder = TextEncoder("tiny-sd15:text_encoder")
        latents = denoise_loop(
            UNet("tiny-sd15:unet"),
            NoiseScheduler("tiny-sd15:scheduler"),
            prompt_embeds=encoder("a"),
            negative_prompt_embeds=encoder(""),
            steps=1,
            guidance_scale=1.0,
            seed=0,
            height=size,
            width=size,
            adapters=[use],
            loras=[LoRA("/x.safetensors", 0.5)],
        )
        wf.output("image", VAE("tiny-sd15:vae").decode(latents))
    spec = wf.to_spec()
    assert [n.op for n in spec.nodes].count("controlnet") == 0
    loop = _node(spec, operators.DENOISE_LOOP)
    assert loop.adapters[0].model == "tiny-sd15:controlnet_depth"
    assert loop.patches[0].target == ""
    assert validate_spec(spec) == []


def test_flux_controlnet_unrolls_one_branch_with_deferred_block_samples() -> None:
    from lego.builtin_workflows import flux_txt2img

    spec = flux_txt2img("f", "tiny-flux-dev", default_size=64, controlnet="controlnet_canny")
    assert validate_spec(spec) == []
    graph = _graph(spec, control_image="data:,", steps=2, guidance_scale=3.5)
    init = next(n for n in graph.nodes.values() if n.id.endswith("/init"))
    assert (init.mode, init.outputs[-1]) == ("init_flow_control", "control_latents")
    transformers = [n for n in graph.nodes.values() if n.op == "transformer"]
    assert [n.mode for n in transformers] == ["denoise_flux_controlled"] * 2  # no CFG branches
    assert all(n.deferred == frozenset({"block_samples", "single_block_samples"}) for n in transformers)
    assert graph.consumers[Ref(init.id, "control_latents")] == 2  # one ControlNet node per step


def test_an_adapter_of_the_wrong_kind_for_the_loop_is_an_error() -> None:
    def mutate(spec: compiler_pb2.WorkflowSpec) -> None:
        _node(spec, operators.DENOISE_LOOP).adapters[0].kind = "flux_controlnet"

    assert any("adapter 0 is a flux_controlnet; this loop takes controlnet" in e for e in _errors_for(mutate))
