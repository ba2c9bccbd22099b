"""Graph passes shared by the compiler and the coordinator (pure functions, no I/O).

- `validate_spec` (from `lego.validation`): every error in a template, naming the node and the input.
- `instantiate`: one request's graph: the denoise loop unrolled for its step count, CFG branches
  split into separate denoiser nodes, one ControlNet node per step and branch (its residuals a
  deferred input of that branch's denoiser call; an SD3 ControlNet's control image encoded with one
  copy per branch), img2img's start timestep from `strength`, dead nodes removed, depth from the
  sinks, consumer counts; for a loop with approximate caching, its `ApproxSite`.
- `resume_from_cache`: the same graph started from a cached latent, its first iterations gone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

from lego import operators
from lego.errors import InvalidRequest
from lego.v1 import compiler_pb2
from lego.validation import validate_spec
from lego.values import Scalar, from_value

__all__ = [
    "ApproxSite",
    "Ref",
    "RequestGraph",
    "TaskNode",
    "instantiate",
    "resume_from_cache",
    "validate_spec",
]

# The most denoise iterations one request may unroll to (steps + extra iterations), whatever limits
# the template declares (or if it declares none): a request must not make the coordinator build an
# unbounded graph.
MAX_DENOISE_ITERATIONS = 1000


@dataclass(frozen=True)
class Ref:
    """An edge: output `output` of node `node` of the same request."""

    node: str
    output: str


@dataclass
class TaskNode:
    id: str
    op: str
    model: str
    mode: str
    inputs: dict[str, Ref | Scalar]
    outputs: tuple[str, ...]
    state_key: str = ""  # non-empty: must run where the first node with this key ran
    patches: tuple[tuple[str, float], ...] = ()  # LoRA (source, scale) applied for this call
    step: int = 0  # 1-based denoise step this node completes (progress); 0: none
    total_steps: int = 0
    depth: int = 0  # longest path to a sink, in nodes; deeper nodes run first within a request
    # inputs the call may start without: the worker awaits them (lazy arrival); their producers may
    # run concurrently elsewhere. A scheduler that does not support this treats them as blocking.
    deferred: frozenset[str] = frozenset()
    # may run without those of its patches the worker has not loaded yet (they load meanwhile):
    # a denoise loop's first `lora_async_steps` iterations (bounded asynchronous LoRA loading)
    patches_optional: bool = False
    # nodes that must finish first though it reads none of their outputs (an approximate-cache
    # loop's init waits for the prompt's signature, which decides where the loop starts)
    after: frozenset[str] = frozenset()
    signature_of: str = ""  # an output the worker reports a signature of (approximate caching's key)


@dataclass(frozen=True)
class ApproxSite:
    """A denoise loop with approximate caching, in one request's graph: where the lookup's
    signature comes from, what a cached latent must match, and the nodes of each iteration."""

    loop: str
    init: str  # held (`after`) until the lookup has decided where the loop starts
    encoder: str  # the prompt's text-encoder node: it reports the signature
    # what requests must share for one's latents to serve another: the text encoder (the
    # signature's space), denoiser, scheduler, LoRAs, steps, size, guidance scale and negative
    # prompt (the seed is not: a hit hands over the donor's sample, as NIRVANA's do)
    context: str
    steps: int
    iterations: tuple[tuple[str, ...], ...]  # node ids of each iteration; its scheduler node last
    repeats: int = 0  # iterations the scheduler spends twice on its first timestep (PNDM: 1)


@dataclass
class RequestGraph:
    nodes: dict[str, TaskNode]  # in a topological order
    outputs: dict[str, Ref]
    consumers: dict[Ref, int] = field(default_factory=dict)
    approx: ApproxSite | None = None

    def model_calls(self) -> int:
        return len(self.nodes)


def _resolve(binding: compiler_pb2.Binding, request_inputs: dict[str, Scalar]) -> Ref | Scalar:
    source = binding.WhichOneof("source")
    if source == "ref":
        return Ref(binding.ref.node, binding.ref.output)
    if source == "workflow_input":
        return request_inputs[binding.workflow_input]
    value = from_value(binding.constant)
    if value is None or not isinstance(value, str | int | float | bool):
        raise ValueError(f"input {binding.name}: constant must be a scalar")
    return value


def instantiate(spec: compiler_pb2.WorkflowSpec, request_inputs: dict[str, Scalar]) -> RequestGraph:
    """The graph of model calls for one request (its inputs already validated and defaulted)."""
    nodes: dict[str, TaskNode] = {}
    renamed: dict[Ref, Ref] = {}  # a template output → the request node that produces it
    approx: ApproxSite | None = None  # the first loop with approximate caching

    def bind(binding: compiler_pb2.Binding) -> Ref | Scalar:
        value = _resolve(binding, request_inputs)
        return renamed.get(value, value) if isinstance(value, Ref) else value

    for node in spec.nodes:
        inputs = {b.name: bind(b) for b in node.inputs}
        if node.op == operators.DENOISE_LOOP:
            adapters = [
                (adapter.kind, adapter.model, {b.name: bind(b) for b in adapter.inputs})
                for adapter in node.adapters
            ]
            final, site = _unroll_denoise_loop(node, inputs, adapters, nodes)
            renamed[Ref(node.id, "latents")] = final
            approx = approx or site
        else:
            nodes[node.id] = TaskNode(node.id, node.op, node.model, node.mode, inputs, tuple(node.outputs))
    outputs = {
        o.name: renamed.get(Ref(o.source.node, o.source.output), Ref(o.source.node, o.source.output))
        for o in spec.outputs
    }
    graph = RequestGraph(nodes=nodes, outputs=outputs, approx=approx)
    eliminate_dead_nodes(graph)
    compute_depths(graph)
    count_consumers(graph)
    return graph


Adapter = tuple[str, str, dict[str, Ref | Scalar]]  # (kind, model, inputs)
# a denoiser mode → (its ControlNet's mode, the denoiser's mode with the ControlNet's outputs)
CONTROLLED_MODES = {
    "denoise": ("residuals", "denoise_controlled"),
    "denoise_pooled": ("residuals_pooled", "denoise_pooled_controlled"),
    "denoise_sd3": ("residuals_sd3", "denoise_sd3_controlled"),
}
_SCHEDULER_OUTPUTS = ("latents", "model_input", "timestep")


def _img2img_start(loop: compiler_pb2.NodeSpec, steps: int, strength: Ref | Scalar) -> int:
    """How many leading timesteps img2img skips (diffusers' `get_timesteps`, scheduler order 1):
    SD 1.5 / SDXL round the steps kept down; SD3 and FLUX.1 (transformers) round the steps skipped."""
    if not isinstance(strength, int | float) or isinstance(strength, bool) or not 0 < strength <= 1:
        raise InvalidRequest("strength", f"strength must be a number > 0 and ≤ 1, got {strength!r}")
    if loop.attributes.get("denoiser_op") == "transformer":
        start = int(max(steps - min(steps * strength, steps), 0))
        if start >= steps:
            raise InvalidRequest("strength", f"strength {strength} leaves no denoising step of {steps}")
        return start
    init_steps = min(int(steps * strength), steps)
    if init_steps == 0:
        raise InvalidRequest(
            "strength",
            f"strength {strength} leaves no denoising step of {steps} (needs steps * strength ≥ 1)",
        )
    return steps - init_steps


def _init_node(
    loop: compiler_pb2.NodeSpec,
    inputs: dict[str, Ref | Scalar],
    steps: int,
    iterations: int,
    start: int,
    adapters: list[Adapter],
    control_encode: str,
) -> TaskNode:
    init_inputs: dict[str, Ref | Scalar] = {
        "seed": inputs["seed"],
        "height": inputs["height"],
        "width": inputs["width"],
        "steps": steps,
        "iterations": iterations,
        "latent_channels": int(loop.attributes["latent_channels"]),
        "vae_scale_factor": int(loop.attributes["vae_scale_factor"]),
    }
    mode = "init_flow" if loop.attributes.get("guidance") == "embedded" else "init"
    if "init_latents" in inputs:
        mode = "init_flow_from_image" if mode == "init_flow" else "init_from_image"
        init_inputs |= {
            "init_latents": inputs["init_latents"],
            "init_scaling": inputs["init_scaling"],
            "first_index": start,
        }
    outputs: tuple[str, ...] = _SCHEDULER_OUTPUTS
    for kind, _, adapter_inputs in adapters:
        if kind == "flux_controlnet":  # the control latents are sampled with the request's seed first
            mode = "init_flow_control"
            init_inputs |= {name: adapter_inputs[name] for name in ("control_dist", "control_scaling")}
            outputs = (*_SCHEDULER_OUTPUTS, "control_latents")
    if control_encode:  # SD3: the control latents are sampled with the request's seed first
        mode = "init_control"
        init_inputs["control_dist"] = Ref(control_encode, "latent_dist")
        outputs = (*_SCHEDULER_OUTPUTS, "control_samples")
    node_id = f"{loop.id}/init"
    return TaskNode(
        node_id,
        "noise_scheduler",
        loop.attributes["scheduler"],
        mode,
        init_inputs,
        outputs,
        state_key=loop.id,
    )


def _sd3_control_encode(
    loop: compiler_pb2.NodeSpec, adapters: list[Adapter], nodes: dict[str, TaskNode], copies: int
) -> str:
    """The id of the node that encodes an SD3 ControlNet's control image for this request ("" when
    the loop has none): the template's `vae.encode_control` (validation ensures it) run on one copy
    per CFG branch in one call, as StableDiffusion3ControlNetPipeline encodes it. The template's
    node, left without consumers, is dropped with the dead nodes."""
    for kind, _, adapter_inputs in adapters:
        if kind == "sd3_controlnet":
            template = adapter_inputs["control_dist"]
            assert isinstance(template, Ref)
            source = nodes[template.node]
            node_id = f"{loop.id}/control_encode"
            outputs = operators.signature("vae", "encode_copies").outputs
            call = {"pixels": source.inputs["pixels"], "copies": copies}
            nodes[node_id] = TaskNode(node_id, source.op, source.model, "encode_copies", call, outputs)
            return node_id
    return ""


def _unroll_denoise_loop(
    loop: compiler_pb2.NodeSpec,
    inputs: dict[str, Ref | Scalar],
    adapters: list[Adapter],
    nodes: dict[str, TaskNode],
) -> tuple[Ref, ApproxSite | None]:
    steps = inputs["steps"]
    guidance = inputs["guidance_scale"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise InvalidRequest("steps", f"node {loop.id}: steps must be a positive integer, got {steps!r}")
    if not isinstance(guidance, int | float) or isinstance(guidance, bool):
        raise InvalidRequest(
            "guidance_scale", f"node {loop.id}: guidance_scale must be a number, got {guidance!r}"
        )
    extra_iterations = int(loop.attributes.get("extra_iterations", "0"))
    if steps + extra_iterations > MAX_DENOISE_ITERATIONS:
        raise InvalidRequest(
            "steps",
            f"node {loop.id}: steps must be ≤ {MAX_DENOISE_ITERATIONS - extra_iterations}, got {steps}",
        )
    embedded = loop.attributes.get("guidance") == "embedded"  # FLUX.1: one branch, no CFG
    denoiser_op = loop.attributes.get("denoiser_op", "unet")
    cfg = guidance > 1.0 and not embedded
    start = _img2img_start(loop, steps, inputs["strength"]) if "strength" in inputs else 0
    iterations = steps + extra_iterations - start
    patches = tuple((patch.source, patch.scale) for patch in loop.patches)
    async_steps = int(loop.attributes.get("lora_async_steps", "0")) if patches else 0
    control_encode = _sd3_control_encode(loop, adapters, nodes, 2 if cfg else 1)
    init = _init_node(loop, inputs, steps, iterations, start, adapters, control_encode)
    nodes[init.id] = init
    previous = init.id
    iteration_nodes: list[tuple[str, ...]] = []
    for step in range(iterations):
        prefix = f"{loop.id}/step{step}"
        before = set(nodes)

        def denoiser(
            branch: str,
            embeds: Ref | Scalar,
            prefix: str = prefix,
            previous: str = previous,
            optional: bool = step < async_steps,
        ) -> str:
            node_id = f"{prefix}/{branch}"
            call: dict[str, Ref | Scalar] = {
                "sample": Ref(previous, "model_input"),
                "timestep": Ref(previous, "timestep"),
                "encoder_hidden_states": embeds,
            }
            mode, deferred = "denoise", frozenset[str]()
            if embedded:
                call |= {
                    "pooled_embeds": inputs["pooled_prompt_embeds"],
                    "guidance_scale": float(guidance),
                    "height": inputs["height"],
                    "width": inputs["width"],
                }
                mode = "denoise_flux"
                for _, model, adapter_inputs in adapters:  # validation: one flux_controlnet
                    adapter_id = f"{prefix}/{branch}/controlnet"
                    adapter_call = {
                        **call,
                        "control_latents": Ref(init.id, "control_latents"),
                        "conditioning_scale": adapter_inputs["conditioning_scale"],
                    }
                    outputs = operators.signature("controlnet", "residuals_flux").outputs
                    nodes[adapter_id] = TaskNode(
                        adapter_id, "controlnet", model, "residuals_flux", adapter_call, outputs
                    )
                    call |= {output: Ref(adapter_id, output) for output in outputs}
                    mode = "denoise_flux_controlled"
                    deferred = frozenset(operators.signature("transformer", mode).deferred)
                nodes[node_id] = TaskNode(
                    node_id,
                    "transformer",
                    loop.model,
                    mode,
                    call,
                    ("noise_pred",),
                    patches=patches,
                    deferred=deferred,
                    patches_optional=optional,
                )
                return node_id
            if "pooled_prompt_embeds" in inputs:  # SDXL, SD3
                pooled = "pooled_prompt_embeds" if branch == "cond" else "negative_pooled_prompt_embeds"
                call["pooled_embeds"] = inputs[pooled]
                mode = "denoise_pooled"
                if denoiser_op == "transformer":  # SD3 / 3.5
                    mode = "denoise_sd3"
            for kind, model, adapter_inputs in adapters:  # validation allows one ControlNet
                adapter_id = f"{prefix}/{branch}/controlnet"
                adapter_mode, mode = CONTROLLED_MODES[mode]
                outputs = operators.signature("controlnet", adapter_mode).outputs
                adapter_call = {**call, **adapter_inputs}
                if kind == "sd3_controlnet":  # the pipeline batches the branches uncond, cond
                    adapter_call = {
                        **call,
                        "control_samples": Ref(init.id, "control_samples"),
                        "control_row": 1 if cfg and branch == "cond" else 0,
                        "control_scaling": Ref(control_encode, "latent_scaling"),
                        "conditioning_scale": adapter_inputs["conditioning_scale"],
                    }
                nodes[adapter_id] = TaskNode(
                    adapter_id, "controlnet", model, adapter_mode, adapter_call, outputs
                )
                call |= {output: Ref(adapter_id, output) for output in outputs}
                deferred = frozenset(operators.signature(denoiser_op, mode).deferred)
            nodes[node_id] = TaskNode(
                node_id,
                denoiser_op,
                loop.model,
                mode,
                call,
                ("noise_pred",),
                patches=patches,
                deferred=deferred,
                patches_optional=optional,
            )
            return node_id

        sched_inputs: dict[str, Ref | Scalar] = {"latents": Ref(previous, "latents"), "step_index": step}
        if cfg:  # the unconditional branch first, as diffusers batches them
            uncond = denoiser("uncond", inputs["negative_prompt_embeds"])
            cond = denoiser("cond", inputs["prompt_embeds"])
            sched_inputs |= {
                "noise_pred_uncond": Ref(uncond, "noise_pred"),
                "noise_pred_cond": Ref(cond, "noise_pred"),
                "guidance_scale": float(guidance),
            }
            mode = "cfg_step"
        else:
            cond = denoiser("cond", inputs["prompt_embeds"])
            sched_inputs["noise_pred"] = Ref(cond, "noise_pred")
            mode = "step"
        step_id = f"{prefix}/scheduler"
        nodes[step_id] = TaskNode(
            step_id,
            "noise_scheduler",
            init.model,
            mode,
            sched_inputs,
            _SCHEDULER_OUTPUTS,
            state_key=loop.id,
            step=step + 1,
            total_steps=iterations,
        )
        previous = step_id
        iteration_nodes.append(tuple(n for n in nodes if n not in before))
    final = Ref(previous, "latents")
    if loop.attributes.get("approx_cache") != "1":
        return final, None
    return final, _approx_site(loop, inputs, nodes, init, patches, cfg, steps, tuple(iteration_nodes))


def _approx_site(
    loop: compiler_pb2.NodeSpec,
    inputs: dict[str, Ref | Scalar],
    nodes: dict[str, TaskNode],
    init: TaskNode,
    patches: tuple[tuple[str, float], ...],
    cfg: bool,
    steps: int,
    iterations: tuple[tuple[str, ...], ...],
) -> ApproxSite | None:
    """The loop's approximate-cache site; its prompt encoder reports a signature (the pooled
    embedding where the encoder has one) and its init waits for it."""
    prompt = inputs["prompt_embeds"]
    if not isinstance(prompt, Ref) or prompt.node not in nodes:
        return None
    encoder = nodes[prompt.node]
    encoder.signature_of = "pooled" if "pooled" in encoder.outputs else prompt.output
    init.after = frozenset({encoder.id})
    negative = inputs.get("negative_prompt_embeds")
    negative_text = nodes[negative.node].inputs.get("text", "") if isinstance(negative, Ref) and cfg else ""
    shared = (encoder.model, loop.model, init.model, patches, steps, inputs["height"], inputs["width"])
    context = "|".join(map(str, (*shared, inputs["guidance_scale"], negative_text)))
    repeats = int(loop.attributes.get("extra_iterations", "0"))
    return ApproxSite(loop.id, init.id, encoder.id, context, steps, iterations, repeats)


CACHED_LATENTS = Ref("approx-cache", "latents")  # not a node: the cached tensor a resumed loop reads
RESUMED_MODES = {"init": "init_from_latents", "init_flow": "init_flow_from_latents"}


def resume_from_cache(graph: RequestGraph, start: int) -> RequestGraph:
    """The graph whose approximate-cache loop resumes from CACHED_LATENTS, a similar request's
    latent after `start` iterations: its init begins at timestep index `start`, its first
    `start - repeats` iterations are gone (a scheduler that spends its first timestep twice, PNDM,
    does so again from there), the next one reads the init's outputs, and steps count from there
    (as img2img's do)."""
    site = graph.approx
    iterations = len(site.iterations) if site else 0
    if site is None or not site.repeats < start < iterations - site.repeats:
        raise ValueError(f"cannot resume after {start} of {iterations} iterations")
    skip = start - site.repeats
    dropped = {node_id for iteration in site.iterations[:skip] for node_id in iteration}
    last = site.iterations[skip - 1][-1]  # the scheduler node whose outputs iteration `skip` read
    nodes: dict[str, TaskNode] = {}
    for node_id, node in graph.nodes.items():
        if node_id in dropped:
            continue
        inputs = {
            name: Ref(site.init, value.output) if isinstance(value, Ref) and value.node == last else value
            for name, value in node.inputs.items()
        }
        if node_id == site.init:
            remaining = len(site.iterations) - skip
            inputs |= {"cached_latents": CACHED_LATENTS, "first_index": start, "iterations": remaining}
            node = replace(node, mode=RESUMED_MODES[node.mode], after=frozenset())
        elif node.step:
            inputs["step_index"] = node.step - 1 - skip  # its step is its iteration's index + 1
            node = replace(node, step=node.step - skip, total_steps=node.total_steps - skip)
        nodes[node_id] = replace(node, inputs=inputs, depth=0)
    resumed = RequestGraph(nodes=nodes, outputs=graph.outputs)
    compute_depths(resumed)
    count_consumers(resumed)
    del resumed.consumers[CACHED_LATENTS]  # the cache holds it: no request frees it
    return resumed


def _refs(node: TaskNode) -> list[Ref]:
    return [value for value in node.inputs.values() if isinstance(value, Ref)]


def eliminate_dead_nodes(graph: RequestGraph) -> None:
    """Drop nodes no workflow output depends on (e.g. the negative prompt when CFG is off)."""
    live: set[str] = set()
    queue = deque(ref.node for ref in graph.outputs.values())
    while queue:
        node_id = queue.popleft()
        if node_id in live:
            continue
        live.add(node_id)
        queue.extend(ref.node for ref in _refs(graph.nodes[node_id]))
    graph.nodes = {node_id: node for node_id, node in graph.nodes.items() if node_id in live}


def compute_depths(graph: RequestGraph) -> None:
    for node in reversed(list(graph.nodes.values())):  # reverse topological order
        node.depth = max(node.depth, 1)
        for ref in _refs(node):
            producer = graph.nodes.get(ref.node)  # none: an input from outside (CACHED_LATENTS)
            if producer is not None:
                producer.depth = max(producer.depth, node.depth + 1)


def count_consumers(graph: RequestGraph) -> None:
    """How many nodes read each tensor (+1 for a workflow output): the reference counts for GC."""
    counts: dict[Ref, int] = {}
    for node in graph.nodes.values():
        for ref in _refs(node):
            counts[ref] = counts.get(ref, 0) + 1
    for ref in graph.outputs.values():
        counts[ref] = counts.get(ref, 0) + 1
    graph.consumers = counts
