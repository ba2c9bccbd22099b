"""Chaos, bad input: the compiler's passes, the ComfyUI importer and the coordinator's input resolution
on random and mutated input (hypothesis, derandomized so CI is deterministic).

Properties:
- `validate_spec` + `optimise` on any `WorkflowSpec` (random ones; mutations of the built-in and
  builder specs: nodes dropped, duplicated, reordered, rebound to missing nodes and outputs, cycles,
  weird attributes, limits, defaults, adapters and LoRA patches, huge and empty strings) return a list
  of errors or an optimised template that is still valid, never raise, never hang; a valid template
  instantiates for its defaults, or refuses with `InvalidRequest` naming a field.
- `resolve_inputs` + `instantiate` on random request inputs (NaN, infinities, huge ints, negative
  steps, bools for ints, huge strings, unknown names): a graph or `InvalidRequest` naming the field.
- `import_comfyui` on mutations of tests/data/comfyui_txt2img.json (cycles, wrong link shapes,
  dangling ids, unknown classes, nodes that are not objects, wrong input types, NaN and huge
  numbers): a `ComfyUIError` whose every error names its node (or the workflow), or a valid spec.
- The same specs and prompts through the real Compiler gRPC service: OK or INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lego import operators
from lego.builtin_workflows import (
    builtin_workflows,
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
from lego.errors import InvalidRequest
from lego.graph import MAX_DENOISE_ITERATIONS, Ref, RequestGraph, instantiate, validate_spec
from lego.grpc_server import channel
from lego.passes import optimise
from lego.request_inputs import resolve_inputs
from lego.store import MemoryStore
from lego.v1 import common_pb2, compiler_pb2, compiler_pb2_grpc
from lego.values import Scalar
from lego.workflow import LoRA
from lego_compiler import service as compiler
from lego_compiler.comfyui import ComfyUIError, import_comfyui, supported_classes

pytestmark = pytest.mark.timeout(120)

# One profile for every property here: deterministic, bounded, a deadline that catches a slow path
# (a hang is caught by pytest-timeout above).
CHAOS = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=3000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
INT64 = (-(2**63), 2**63 - 1)
HUGE = "x" * 100_000

# ---- seeds: every shape the builders make ----


def seed_specs() -> list[compiler_pb2.WorkflowSpec]:
    return [
        *builtin_workflows(),
        sd15_txt2img(
            "sd15-lora", "tiny-sd15", default_size=64, loras=[LoRA("/loras/style.safetensors", 0.8)]
        ),
        sd15_controlnet("sd15-canny", "tiny-sd15", default_size=64),
        sd15_img2img("sd15-img2img", "tiny-sd15", default_size=64),
        sdxl_txt2img("sdxl-canny", "tiny-sdxl", default_size=64, controlnet="controlnet_canny"),
        sdxl_img2img("sdxl-img2img", "tiny-sdxl", default_size=64),
        sd3_img2img("sd3-img2img", "tiny-sd3", default_size=64),
        sd3_txt2img("sd3-canny", "tiny-sd3", default_size=64, controlnet="controlnet_canny"),
        flux_txt2img("flux-canny", "tiny-flux-dev", default_size=64, controlnet="controlnet_canny"),
        flux_img2img("flux-img2img", "tiny-flux-dev", default_size=64),
    ]


SEEDS = seed_specs()
OPTIMISED_SEEDS = [optimise(spec) for spec in SEEDS]
COMFY_TXT2IMG: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "data" / "comfyui_txt2img.json").read_text()
)

# ---- strategies ----

PORTS = sorted(
    {name for modes in operators.SIGNATURES.values() for sig in modes.values() for name in sig.types}
    | set(operators.DENOISE_LOOP_TYPES)
    | {name for inputs in operators.ADAPTERS.values() for name in inputs}
)
INPUT_NAMES = sorted({i.name for spec in SEEDS for i in spec.inputs})
NODE_IDS = ["n0", "n1", "n2", "n3", "text_encoder_0", "denoise_loop_2", "vae_3"]
MODELS = ["tiny-sd15:unet", "tiny-sd15:vae", "tiny-sd15:text_encoder", "builtin:image", "", "m", "²", HUGE]
WEIRD_TEXT = ["", " ", "²", "٣", "\x00", "💥", "a/b", "../x", "9" * 5000, HUGE]
texts = st.one_of(st.sampled_from(WEIRD_TEXT), st.text(max_size=12))
port_names = st.one_of(st.sampled_from(PORTS), texts)
node_ids = st.one_of(st.sampled_from(NODE_IDS), texts)
input_names = st.one_of(st.sampled_from(INPUT_NAMES), texts)
ATTRIBUTE_KEYS = [*operators.DENOISE_LOOP_ATTRIBUTES, "extra_iterations", "guidance", "denoiser_op", "x"]
ATTRIBUTE_VALUES = [
    "0",
    "1",
    "4",
    "8",
    "16",
    "-1",
    "",
    "²",
    "1e3",
    "9" * 5000,
    "1000000000",
    "cfg",
    "embedded",
    "unet",
    "transformer",
    "tiny-sd15:scheduler",
]
floats = st.floats(allow_nan=True, allow_infinity=True)
int64s = st.integers(*INT64)
weird_ints = st.sampled_from([0, 1, -1, 8, -8, 2**31 - 1, 2**63 - 1, -(2**63)])


def _value(kind: str, raw: Any) -> common_pb2.Value:
    value = common_pb2.Value()
    if kind == "tensor":
        value.tensor.CopyFrom(common_pb2.TensorHandle(tensor_id=raw, shape=[1], dtype="float32"))
    elif kind != "none":
        setattr(value, kind, raw)
    return value


values = st.one_of(
    st.builds(_value, st.just("string_value"), texts),
    st.builds(_value, st.just("int_value"), st.one_of(int64s, weird_ints)),
    st.builds(_value, st.just("float_value"), floats),
    st.builds(_value, st.just("bool_value"), st.booleans()),
    st.builds(_value, st.just("none"), st.none()),
    st.builds(_value, st.just("tensor"), texts),
)


@st.composite
def bindings(draw: st.DrawFn) -> compiler_pb2.Binding:
    binding = compiler_pb2.Binding(name=draw(port_names))
    source = draw(st.sampled_from(["ref", "workflow_input", "constant", "none"]))
    if source == "ref":
        binding.ref.SetInParent()
        binding.ref.node = draw(node_ids)
        binding.ref.output = draw(port_names)
    elif source == "workflow_input":
        binding.workflow_input = draw(input_names)
    elif source == "constant":
        binding.constant.CopyFrom(draw(values))
    return binding


@st.composite
def patches(draw: st.DrawFn) -> common_pb2.Patch:
    return common_pb2.Patch(
        source=draw(texts), scale=draw(floats), target=draw(st.sampled_from([*MODELS, "other"]))
    )


@st.composite
def adapters(draw: st.DrawFn) -> compiler_pb2.Adapter:
    adapter = compiler_pb2.Adapter(
        kind=draw(st.sampled_from([*operators.ADAPTERS, "", "lora", HUGE])),
        model=draw(st.sampled_from(MODELS)),
    )
    adapter.inputs.extend(draw(st.lists(bindings(), max_size=4)))
    return adapter


@st.composite
def nodes(draw: st.DrawFn) -> compiler_pb2.NodeSpec:
    op = draw(st.sampled_from([*operators.SIGNATURES, operators.DENOISE_LOOP, "", "nope"]))
    modes = [*operators.SIGNATURES.get(op, {}), "", "nope"]
    node = compiler_pb2.NodeSpec(
        id=draw(node_ids), op=op, model=draw(st.sampled_from(MODELS)), mode=draw(st.sampled_from(modes))
    )
    node.inputs.extend(draw(st.lists(bindings(), max_size=8)))
    node.outputs.extend(draw(st.lists(port_names, max_size=3)))
    attributes = draw(
        st.dictionaries(st.sampled_from(ATTRIBUTE_KEYS), st.sampled_from(ATTRIBUTE_VALUES), max_size=6)
    )
    node.attributes.update(attributes)
    node.patches.extend(draw(st.lists(patches(), max_size=2)))
    node.adapters.extend(draw(st.lists(adapters(), max_size=2)))
    return node


@st.composite
def input_specs(draw: st.DrawFn) -> compiler_pb2.InputSpec:
    spec = compiler_pb2.InputSpec(
        name=draw(input_names),
        type=draw(st.sampled_from([0, 1, 2, 3, 4, 5, 99])),
        required=draw(st.booleans()),
        multiple_of=draw(weird_ints),
        min_length=draw(weird_ints),
        max_length=draw(weird_ints),
        exclusive_minimum=draw(st.booleans()),
    )
    if draw(st.booleans()):
        spec.default_value.CopyFrom(draw(values))
    if draw(st.booleans()):
        spec.minimum = draw(floats)
    if draw(st.booleans()):
        spec.maximum = draw(floats)
    return spec


@st.composite
def workflow_specs(draw: st.DrawFn) -> compiler_pb2.WorkflowSpec:
    spec = compiler_pb2.WorkflowSpec(
        ir_version=draw(st.sampled_from([0, 1, 2, 3, 2**32 - 1])), name=draw(texts), description=draw(texts)
    )
    spec.inputs.extend(draw(st.lists(input_specs(), max_size=5)))
    spec.nodes.extend(draw(st.lists(nodes(), max_size=6)))
    for _ in range(draw(st.integers(0, 2))):
        spec.outputs.add(name=draw(texts)).source.CopyFrom(
            compiler_pb2.OutputRef(node=draw(node_ids), output=draw(port_names))
        )
    return spec


def _pick(draw: st.DrawFn, items: Any) -> int | None:
    return draw(st.integers(0, len(items) - 1)) if len(items) else None


def _node_outputs(node: compiler_pb2.NodeSpec) -> list[str]:
    return ["latents"] if node.op == operators.DENOISE_LOOP else list(node.outputs) or ["x"]


def _all_bindings(spec: compiler_pb2.WorkflowSpec) -> list[tuple[int, compiler_pb2.Binding]]:
    found = []
    for index, node in enumerate(spec.nodes):
        found += [(index, b) for b in node.inputs]
        found += [(index, b) for adapter in node.adapters for b in adapter.inputs]
    return found


def _copy_node(node: compiler_pb2.NodeSpec) -> compiler_pb2.NodeSpec:
    copied = compiler_pb2.NodeSpec()
    copied.CopyFrom(node)
    return copied


def _mutate(draw: st.DrawFn, spec: compiler_pb2.WorkflowSpec, kind: str) -> None:
    """One random change to a (valid) template: some keep it valid, most break it."""
    index = _pick(draw, spec.nodes)
    node = spec.nodes[index] if index is not None else None
    if kind == "drop_node" and index is not None:
        del spec.nodes[index]
    elif kind == "duplicate_node" and node is not None:
        spec.nodes.add().CopyFrom(node)
    elif kind == "swap_nodes" and len(spec.nodes) > 1:
        other = _pick(draw, spec.nodes)
        assert index is not None and other is not None
        first, second = compiler_pb2.NodeSpec(), compiler_pb2.NodeSpec()
        first.CopyFrom(spec.nodes[index])
        second.CopyFrom(spec.nodes[other])
        spec.nodes[index].CopyFrom(second)
        spec.nodes[other].CopyFrom(first)
    elif kind == "cycle" and node is not None:  # a binding to this node or a later one
        bound = [b for b in node.inputs if b.WhichOneof("source") == "ref"]
        later = spec.nodes[draw(st.integers(index, len(spec.nodes) - 1))]
        if bound:
            target = bound[draw(st.integers(0, len(bound) - 1))]
            target.ref.node = later.id
            target.ref.output = draw(st.sampled_from(_node_outputs(later)))
    elif kind in ("rebind", "drop_binding", "rename_binding", "constant"):
        every = _all_bindings(spec)
        choice = _pick(draw, every)
        if choice is None:
            return
        _, binding = every[choice]
        if kind == "rebind":
            binding.CopyFrom(draw(bindings()))
        elif kind == "rename_binding":
            binding.name = draw(port_names)
        elif kind == "constant":
            binding.constant.CopyFrom(draw(values))
        else:
            binding.Clear()
    elif kind == "retarget" and node is not None:
        field = draw(st.sampled_from(["op", "mode", "model", "id"]))
        setattr(
            node, field, draw(st.one_of(st.sampled_from([*operators.SIGNATURES, "decode", "nope"]), texts))
        )
    elif kind == "attribute" and node is not None:
        node.attributes[draw(st.sampled_from(ATTRIBUTE_KEYS))] = draw(st.sampled_from(ATTRIBUTE_VALUES))
    elif kind == "input_spec" and spec.inputs:
        target = spec.inputs[draw(st.integers(0, len(spec.inputs) - 1))]
        field = draw(
            st.sampled_from(["default", "minimum", "maximum", "multiple_of", "lengths", "type", "all"])
        )
        if field == "default":
            target.default_value.CopyFrom(draw(values))
        elif field in ("minimum", "maximum"):
            setattr(target, field, draw(floats))
        elif field == "multiple_of":
            target.multiple_of = draw(weird_ints)
        elif field == "lengths":
            target.min_length, target.max_length = draw(weird_ints), draw(weird_ints)
        elif field == "type":
            target.type = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 99]))
        else:
            target.CopyFrom(draw(input_specs()))
    elif kind == "drop_input" and spec.inputs:
        del spec.inputs[draw(st.integers(0, len(spec.inputs) - 1))]
    elif kind == "patch" and node is not None:
        node.patches.append(draw(patches()))
    elif kind == "adapter" and node is not None:
        node.adapters.append(draw(adapters()))
    elif kind == "output":
        if spec.outputs and draw(st.booleans()):
            del spec.outputs[:]
        else:
            spec.outputs.add(name=draw(texts)).source.CopyFrom(
                compiler_pb2.OutputRef(node=draw(node_ids), output=draw(port_names))
            )
    elif kind == "random_node":
        listed = [_copy_node(n) for n in spec.nodes]
        listed.insert(draw(st.integers(0, len(listed))), draw(nodes()))
        del spec.nodes[:]
        spec.nodes.extend(listed)
    elif kind == "header":
        spec.name = draw(texts)
        spec.ir_version = draw(st.sampled_from([0, 1, 2, 3]))


MUTATIONS = [
    "drop_node",
    "duplicate_node",
    "swap_nodes",
    "cycle",
    "rebind",
    "drop_binding",
    "rename_binding",
    "constant",
    "retarget",
    "attribute",
    "input_spec",
    "drop_input",
    "patch",
    "adapter",
    "output",
    "random_node",
    "header",
]


@st.composite
def mutated_specs(draw: st.DrawFn) -> compiler_pb2.WorkflowSpec:
    spec = compiler_pb2.WorkflowSpec()
    spec.CopyFrom(draw(st.sampled_from(SEEDS)))
    for kind in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        _mutate(draw, spec, kind)
    return spec


scalars: st.SearchStrategy[Scalar] = st.one_of(
    st.integers(),  # unbounded: huge ints too
    weird_ints,
    floats,
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from([-1, 0, 10**6, 10**400, -(10**400), "", " ", HUGE, "data:image/png;base64,AAAA"]),
)
request_inputs = st.dictionaries(
    st.one_of(st.sampled_from([*INPUT_NAMES, "strength", "nope", "", HUGE]), st.text(max_size=6)),
    scalars,
    max_size=6,
)

# ---- the properties ----


def check_request(spec: compiler_pb2.WorkflowSpec, given: dict[str, Scalar]) -> RequestGraph | None:
    """What the coordinator does with a request: a consistent graph, or InvalidRequest naming a field."""
    known = {i.name for i in spec.inputs} | {name[:100] for name in given} | set(operators.DENOISE_LOOP_TYPES)
    try:
        graph = instantiate(spec, resolve_inputs(spec, given))
    except InvalidRequest as error:
        assert error.field in known, (error.field[:100], error.message[:200])
        assert error.message and len(error.message) < 2000, error.message[:200]
        return None
    produced: dict[str, tuple[str, ...]] = {}
    for node_id, node in graph.nodes.items():  # topological, every edge to an output its producer has
        for value in node.inputs.values():
            if isinstance(value, Ref):
                assert value.output in produced[value.node], (node_id, value)
        produced[node_id] = node.outputs
    for ref in graph.outputs.values():
        assert ref.output in produced[ref.node]
    loops = sum(1 for node in spec.nodes if node.op == operators.DENOISE_LOOP)
    # per iteration at most two denoiser calls, two ControlNet calls and a scheduler step
    assert len(graph.nodes) <= len(spec.nodes) + loops * (5 * MAX_DENOISE_ITERATIONS + 1)
    return graph


def check_template(spec: compiler_pb2.WorkflowSpec) -> list[str]:
    """What the compiler does: errors, or a template that stays valid once optimised and serves."""
    errors = validate_spec(spec)
    assert isinstance(errors, list) and all(isinstance(e, str) and e for e in errors)
    optimised = optimise(spec)  # pure: never raises, even on a template validation refuses
    if errors:
        return errors
    assert validate_spec(optimised) == [], "optimising a valid template made it invalid"
    check_request(optimised, {})
    return errors


@CHAOS
@given(spec=workflow_specs())
def test_random_specs_validate_to_errors_never_an_exception(spec: compiler_pb2.WorkflowSpec) -> None:
    check_template(spec)


@settings(CHAOS, max_examples=300)
@given(spec=mutated_specs(), given_inputs=request_inputs)
def test_mutated_builtin_specs_validate_or_serve(
    spec: compiler_pb2.WorkflowSpec, given_inputs: dict[str, Scalar]
) -> None:
    if not check_template(spec):
        check_request(optimise(spec), given_inputs)


@settings(CHAOS, max_examples=300)
@given(index=st.integers(0, len(SEEDS) - 1), given_inputs=request_inputs)
def test_random_request_inputs_resolve_or_name_the_field(index: int, given_inputs: dict[str, Scalar]) -> None:
    check_request(OPTIMISED_SEEDS[index], given_inputs)


def test_the_seed_specs_are_valid_and_serve_their_defaults() -> None:
    for spec in SEEDS:
        assert check_template(spec) == [], spec.name
        required = {i.name: "data:," for i in spec.inputs if not i.HasField("default_value")}
        assert check_request(optimise(spec), required) is not None, spec.name


# ---- regressions: each was an exception or a hang before ----


def _spec(index: int = 0) -> compiler_pb2.WorkflowSpec:
    spec = compiler_pb2.WorkflowSpec()
    spec.CopyFrom(SEEDS[index])
    return spec


def _loop(spec: compiler_pb2.WorkflowSpec) -> compiler_pb2.NodeSpec:
    return next(node for node in spec.nodes if node.op == operators.DENOISE_LOOP)


def _raises_invalid(call: Callable[[], object], field: str) -> str:
    with pytest.raises(InvalidRequest) as caught:
        call()
    assert caught.value.field == field, caught.value.message
    return caught.value.message


def test_a_long_chain_of_nodes_is_checked_without_recursion() -> None:
    spec = compiler_pb2.WorkflowSpec(ir_version=2, name="chain")
    for i in reversed(range(5000)):  # listed consumers first: a deep search from the first node
        node = spec.nodes.add(id=f"n{i}", op="text_encoder", model="m", mode="encode", outputs=["embeddings"])
        node.inputs.add(name="text").ref.CopyFrom(
            compiler_pb2.OutputRef(node=f"n{i - 1}", output="embeddings")
        )
    errors = validate_spec(spec)
    assert any("topological order" in e for e in errors)
    assert optimise(spec) is not None


def test_a_node_with_many_bindings_is_checked_in_linear_time() -> None:
    spec = _spec()
    for i in range(50_000):
        spec.nodes[0].inputs.add(name=f"x{i % 25_000}", constant=common_pb2.Value(int_value=1))
    started = time.monotonic()
    errors = validate_spec(spec)
    assert time.monotonic() - started < 5
    assert any("is bound twice" in e for e in errors) and any("unexpected input" in e for e in errors)


def test_nodes_out_of_topological_order_are_an_error_not_a_crash_per_request() -> None:
    spec = _spec()
    listed = list(spec.nodes)
    del spec.nodes[:]
    spec.nodes.extend(reversed(listed))
    errors = validate_spec(spec)
    assert any("refers to denoise_loop" in e and "topological order" in e for e in errors), errors


def test_loop_attributes_must_be_small_ascii_integers() -> None:
    for value in ("²", "٣", "9" * 5000, "1000000000", "-1", "0x10", ""):
        spec = _spec()
        _loop(spec).attributes["extra_iterations"] = value
        assert any("attribute extra_iterations must be an integer" in e for e in validate_spec(spec)), value
    spec = _spec()
    _loop(spec).attributes["vae_scale_factor"] = "0"  # a division by zero on the worker
    assert any("vae_scale_factor" in e for e in validate_spec(spec))


def test_constants_must_be_finite_scalars() -> None:
    for value in (common_pb2.Value(), _value("tensor", "t"), common_pb2.Value(float_value=float("nan"))):
        spec = _spec()
        loop = _loop(spec)
        guidance = next(b for b in loop.inputs if b.name == "guidance_scale")
        guidance.constant.CopyFrom(value)
        errors = validate_spec(spec)
        assert any("'guidance_scale'" in e and "constant" in e for e in errors), errors


def test_input_defaults_must_be_scalars_of_their_type_and_inputs_declared_once() -> None:
    spec = _spec()
    spec.inputs[1].default_value.CopyFrom(_value("tensor", "t"))
    spec.inputs.add().CopyFrom(spec.inputs[2])
    spec.inputs.add(name="odd", type=compiler_pb2.VALUE_TYPE_TENSOR)
    errors = validate_spec(spec)
    assert any("'negative_prompt': its default must be of type string" in e for e in errors), errors
    assert any("'steps': declared twice" in e for e in errors)
    assert any("'odd': type must be" in e for e in errors)
    # and a stored template like that is refused per request, naming the input, not an AssertionError
    _raises_invalid(lambda: resolve_inputs(spec, {"prompt": "x"}), "negative_prompt")


def test_unbounded_steps_are_refused_per_request_not_unrolled() -> None:
    spec = _spec()
    steps = next(i for i in spec.inputs if i.name == "steps")
    steps.ClearField("maximum")
    message = _raises_invalid(lambda: check_request_raw(spec, {"prompt": "x", "steps": 10**9}), "steps")
    assert str(MAX_DENOISE_ITERATIONS - 1) in message  # SD 1.5's PNDM runs one extra iteration
    loop = _loop(spec)
    constant = next(b for b in loop.inputs if b.name == "steps")
    constant.constant.CopyFrom(common_pb2.Value(int_value=2**62))
    assert validate_spec(spec) == []
    _raises_invalid(lambda: check_request_raw(spec, {"prompt": "x"}), "steps")


def check_request_raw(spec: compiler_pb2.WorkflowSpec, given: dict[str, Scalar]) -> RequestGraph:
    return instantiate(spec, resolve_inputs(spec, given))


def test_non_finite_and_huge_numbers_with_multiple_of_limits_name_the_field() -> None:
    spec = _spec()
    guidance = next(i for i in spec.inputs if i.name == "guidance_scale")
    guidance.multiple_of = 2
    for value in (float("nan"), float("inf"), -float("inf"), 10**400, 3.5):
        _raises_invalid(
            lambda v=value: resolve_inputs(spec, {"prompt": "x", "guidance_scale": v}), "guidance_scale"
        )
    for value in (10**400, -(10**5000), 2**63):
        message = _raises_invalid(
            lambda v=value: resolve_inputs(spec, {"prompt": "x", "seed": v, "guidance_scale": 4.0}), "seed"
        )
        assert "64-bit" in message
    message = _raises_invalid(lambda: resolve_inputs(spec, {"prompt": "x", "steps": HUGE}), "steps")
    assert len(message) < 200  # the value is not echoed whole
    message = _raises_invalid(lambda: resolve_inputs(spec, {"prompt": "x", HUGE: 1}), HUGE[:100])
    assert len(message) < 500


# ---- ComfyUI import ----

COMFY_IDS = sorted(COMFY_TXT2IMG)
LINKS = [
    ["3"],
    ["3", "x"],
    [3, 0],
    ["99", 0],
    ["3", -1],
    ["3", 99],
    ["9", 0],  # SaveImage: no outputs
    ["8", 0],  # into the sampler: a cycle
    ["3", 0],
    ["4", True],
    [["4"], 0],
    [None, 0],
    ["4", 0, 1],
    [],
    "4",
    ["²", 0],
    ["9" * 5000, 0],
]
json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    floats,
    st.text(max_size=8),
    st.sampled_from(LINKS),
    st.sampled_from([10**30, 10**400, -1, 0, 2**63, "", HUGE, {}, {"a": 1}, [[]]]),
    st.builds(lambda node, index: [node, index], st.sampled_from(COMFY_IDS), st.integers(-1, 3)),
)
COMFY_CLASSES = [*supported_classes(), "FancyUpscaler", ""]


@st.composite
def comfy_prompts(draw: st.DrawFn) -> Any:
    prompt: dict[str, Any] = json.loads(json.dumps(COMFY_TXT2IMG))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(
                [
                    "set_input",
                    "drop_input",
                    "drop_node",
                    "not_a_node",
                    "class",
                    "inputs",
                    "add_node",
                    "rename",
                    "top",
                ]
            )
        )
        node_ids = sorted(prompt) if isinstance(prompt, dict) else []
        if not node_ids:
            break
        node_id = draw(st.sampled_from(node_ids))
        node = prompt[node_id]
        node_inputs = node.get("inputs") if isinstance(node, dict) else None
        if kind == "set_input" and isinstance(node_inputs, dict) and node_inputs:
            node_inputs[draw(st.sampled_from(sorted(node_inputs)))] = draw(json_values)
        elif kind == "drop_input" and isinstance(node_inputs, dict) and node_inputs:
            del node_inputs[draw(st.sampled_from(sorted(node_inputs)))]
        elif kind == "drop_node":
            del prompt[node_id]
        elif kind == "not_a_node":
            prompt[node_id] = draw(json_values)
        elif kind == "class" and isinstance(node, dict):
            node["class_type"] = draw(st.one_of(st.sampled_from(COMFY_CLASSES), json_values))
        elif kind == "inputs" and isinstance(node, dict):
            node["inputs"] = draw(json_values)
        elif kind == "add_node":
            prompt[draw(st.sampled_from(["10", "11", "0", "²", "-1", "9" * 5000, ""]))] = {
                "class_type": draw(st.sampled_from(COMFY_CLASSES)),
                "inputs": draw(
                    st.dictionaries(st.sampled_from(["model", "clip", "vae", "images", "text"]), json_values)
                ),
            }
        elif kind == "rename":
            prompt[draw(st.sampled_from(["²", "٣", "9" * 5000, "", "a b", "3.0"]))] = prompt.pop(node_id)
        elif kind == "top":
            return draw(st.sampled_from([[], {}, None, 3, "x", {"nodes": [], "links": []}, [COMFY_TXT2IMG]]))
    return prompt


def check_comfy(prompt: Any) -> compiler_pb2.WorkflowSpec | None:
    try:
        spec = import_comfyui(prompt, "fuzz")
    except ComfyUIError as error:
        assert error.errors
        for message in error.errors:
            assert message.startswith(("node ", "workflow", "supported node classes")), message[:200]
        return None
    assert validate_spec(spec) == [], "the importer made an invalid template"
    check_request(optimise(spec), {})
    return spec


@settings(CHAOS, max_examples=300)
@given(prompt=comfy_prompts())
def test_malformed_comfyui_prompts_are_refused_naming_the_node(prompt: Any) -> None:
    check_comfy(prompt)


def test_comfyui_regressions() -> None:
    def changed(node_id: str, name: str, value: Any) -> dict[str, Any]:
        prompt: dict[str, Any] = json.loads(json.dumps(COMFY_TXT2IMG))
        prompt[node_id]["inputs"][name] = value
        return prompt

    cases = {
        "links to node 9 (SaveImage), which has no outputs": changed("8", "samples", ["9", 0]),
        "the links form a cycle": changed("6", "clip", ["6", 0]),
        "input 'cfg' must be a finite number": changed("3", "cfg", float("nan")),
        "input 'seed' must be a 64-bit int": changed("3", "seed", 10**30),
        "input 'cfg' must be a 64-bit float": changed("3", "cfg", 10**400),
        "node 6: inputs must be a JSON object": {
            **COMFY_TXT2IMG,
            "6": {"class_type": "CLIPTextEncode", "inputs": 5},
        },
    }
    for expected, prompt in cases.items():
        with pytest.raises(ComfyUIError, match=re.escape(expected)):
            import_comfyui(prompt, "c")
    renamed = {("²" if k == "9" else k): v for k, v in COMFY_TXT2IMG.items()}
    assert check_comfy(renamed) is not None  # an odd id is just a name
    chain: dict[str, Any] = json.loads(json.dumps(COMFY_TXT2IMG))
    previous = "4"
    for i in range(100, 400):  # 300 LoRAs in a row: refused, not a RecursionError
        chain[str(i)] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": [previous, 0], "lora_name": "a.safetensors", "strength_model": 1.0},
        }
        previous = str(i)
    chain["3"]["inputs"]["model"] = [previous, 0]
    with pytest.raises(ComfyUIError, match="links nest deeper than"):
        import_comfyui(chain, "c")


# ---- through the Compiler gRPC service ----


def _collect(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    found: list[Any] = []

    @settings(CHAOS, max_examples=count, deadline=None)
    @given(strategy)
    def gather(item: Any) -> None:
        found.append(item)

    gather()
    return found


@pytest.mark.timeout(90)
async def test_the_compiler_service_answers_ok_or_invalid_argument() -> None:
    specs = [*_collect(workflow_specs(), 40), *_collect(mutated_specs(), 40)]
    prompts = [json.dumps(p) for p in _collect(comfy_prompts(), 40)]
    prompts += ["[" * 100_000, "{", "", "null", '{"3": NaN}', json.dumps(COMFY_TXT2IMG)]
    huge_name = compiler_pb2.WorkflowSpec()
    huge_name.CopyFrom(SEEDS[0])
    huge_name.nodes[0].id = "é" * 200_000  # every error echoes it: the status must still fit
    specs.append(huge_name)
    service = await compiler.serve(MemoryStore())
    codes: dict[str, int] = {}
    try:
        async with channel(service.address) as chan:
            stub = compiler_pb2_grpc.CompilerStub(chan)
            calls: list[tuple[Any, Any]] = [(stub.RegisterWorkflow, spec) for spec in specs]
            calls += [
                (stub.ImportComfyUI, compiler_pb2.ImportComfyUIRequest(workflow_json=p)) for p in prompts
            ]
            for method, request in calls:
                try:
                    await method(request, timeout=30)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, (error.details() or "")[:300])
                    assert error.details()
                codes[code.name] = codes.get(code.name, 0) + 1
            listed = await stub.ListWorkflows(common_pb2.Empty(), timeout=10)
    finally:
        await service.stop()
    assert codes.get("OK", 0) >= 1 and codes.get("INVALID_ARGUMENT", 0) >= 10, codes
    assert len(listed.workflows) >= 1
