import pytest
from lego.builtin_workflows import sd15_txt2img
from lego.graph import Ref, instantiate, validate_spec
from lego.request_inputs import resolve_inputs
from lego.v1 import compiler_pb2
from lego.workflow import VAE, TextEncoder, Workflow

SPEC = sd15_txt2img("wf", "tiny-sd15", default_size=128)


def graph_for(**inputs: object):
    return instantiate(SPEC, resolve_inputs(SPEC, {"prompt": "a cat", **inputs}))


def test_builtin_workflow_is_valid() -> None:
    assert validate_spec(SPEC) == []


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_cfg_unrolls_two_branches_and_a_scheduler_step_per_step(steps: int) -> None:
    graph = graph_for(steps=steps, guidance_scale=7.5)
    ops = [node.op for node in graph.nodes.values()]
    assert ops.count("text_encoder") == 2
    iterations = steps + 1  # PNDM (PLMS) repeats one timestep
    assert ops.count("unet") == 2 * iterations
    assert ops.count("noise_scheduler") == iterations + 1
    assert ops.count("vae") == 1
    assert len(graph.nodes) == 3 * iterations + 4


def test_cfg_off_drops_the_negative_branch_and_its_encoder() -> None:
    graph = graph_for(steps=3, guidance_scale=1.0)
    ops = [node.op for node in graph.nodes.values()]
    assert ops.count("text_encoder") == 1  # dead-node elimination removed the negative prompt
    assert ops.count("unet") == 4
    assert all(n.mode == "step" for n in graph.nodes.values() if n.op == "noise_scheduler" and n.step)


def test_uncond_branch_comes_first_and_steps_are_numbered() -> None:
    graph = graph_for(steps=2)
    ids = list(graph.nodes)
    assert ids.index("denoise_loop_2/step0/uncond") < ids.index("denoise_loop_2/step0/cond")
    steps = [(n.step, n.total_steps) for n in graph.nodes.values() if n.step]
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_depth_decreases_towards_the_sink_and_consumers_are_counted() -> None:
    graph = graph_for(steps=2)
    for node in graph.nodes.values():
        for value in node.inputs.values():
            if isinstance(value, Ref):
                assert graph.nodes[value.node].depth > node.depth
    assert graph.nodes["vae_3"].depth == 1
    # the init node's model input is read by both CFG branches
    assert graph.consumers[Ref("denoise_loop_2/init", "model_input")] == 2
    assert graph.consumers[graph.outputs["image"]] == 1


def test_stateful_scheduler_nodes_share_one_state_key() -> None:
    graph = graph_for(steps=3)
    keys = {n.state_key for n in graph.nodes.values() if n.op == "noise_scheduler"}
    assert keys == {"denoise_loop_2"}
    assert all(not n.state_key for n in graph.nodes.values() if n.op != "noise_scheduler")


def _spec_with(mutate) -> compiler_pb2.WorkflowSpec:
    spec = compiler_pb2.WorkflowSpec()
    spec.CopyFrom(SPEC)
    mutate(spec)
    return spec


def test_validation_reports_unknown_operator_and_mode() -> None:
    def mutate(spec: compiler_pb2.WorkflowSpec) -> None:
        spec.nodes[0].op = "teleporter"
        spec.nodes[-1].mode = "explode"

    errors = validate_spec(_spec_with(mutate))
    assert any("node text_encoder_0: unknown operator 'teleporter'" in e for e in errors)
    assert any("node vae_3: operator 'vae' has no mode 'explode'" in e for e in errors)


def test_validation_reports_dangling_reference_and_missing_input() -> None:
    def mutate(spec: compiler_pb2.WorkflowSpec) -> None:
        spec.nodes[-1].inputs[0].ref.node = "ghost"
        del spec.nodes[0].inputs[:]

    errors = validate_spec(_spec_with(mutate))
    assert any(
        "node vae_3: input 'latents' refers to ghost.latents, which does not exist" in e for e in errors
    )
    assert "node text_encoder_0: missing required input 'text'" in errors


def test_validation_reports_a_cycle() -> None:
    def mutate(spec: compiler_pb2.WorkflowSpec) -> None:
        binding = spec.nodes[0].inputs[0]
        binding.ref.node = "vae_3"
        binding.ref.output = "image"

    errors = validate_spec(_spec_with(mutate))
    assert any(e.startswith("cycle: ") and "vae_3" in e for e in errors)


def test_validation_reports_unknown_workflow_input() -> None:
    def mutate(spec: compiler_pb2.WorkflowSpec) -> None:
        spec.nodes[0].inputs[0].workflow_input = "caption"

    assert "node text_encoder_0: input 'text' refers to unknown workflow input 'caption'" in validate_spec(
        _spec_with(mutate)
    )


def test_operators_outside_a_workflow_are_an_error() -> None:
    with pytest.raises(RuntimeError, match="inside `with Workflow"):
        TextEncoder("tiny-sd15:text_encoder")("a cat")


def test_the_same_operator_called_twice_is_two_nodes_sharing_one_model() -> None:
    with Workflow("two") as wf:
        text = wf.input("prompt", str)
        encoder = TextEncoder("m:text_encoder")
        first, second = encoder(text), encoder("constant prompt")
        wf.output("a", first)
        wf.output("b", second)
        VAE("m:vae")
    spec = wf.to_spec()
    assert [n.model for n in spec.nodes] == ["m:text_encoder", "m:text_encoder"]
    assert spec.nodes[1].inputs[0].constant.string_value == "constant prompt"
    assert validate_spec(spec) == []
