"""The Compiler gRPC servicer: validate and optimise (pure passes in lego.validation and
lego.passes: common-subexpression and dead-node elimination), store, list."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter

import grpc
import structlog
from lego import keys
from lego.graph import validate_spec
from lego.grpc_server import RunningServer, start_server
from lego.model_sources import SourcePolicy
from lego.passes import optimise
from lego.store import ClusterStore, Registration
from lego.v1 import common_pb2, compiler_pb2, compiler_pb2_grpc

from lego_compiler.comfyui import ComfyUIError, import_comfyui

log = structlog.get_logger("lego.compiler")
REGISTRATION_TTL_S = 5.0
# gRPC carries a status message percent-encoded in a trailer; trailers over 8 KiB may be refused and
# over 16 KiB are (RESOURCE_EXHAUSTED, "received metadata size exceeds hard limit"): errors that echo a
# caller's huge names are cut to this many UTF-8 bytes (at most 3 encoded bytes each).
MAX_STATUS_BYTES = 2000


def status_message(errors: list[str]) -> str:
    """Every error, joined, or as many as fit in MAX_STATUS_BYTES (and how many there were)."""
    message = "; ".join(errors)
    if len(message.encode()) <= MAX_STATUS_BYTES:
        return message
    suffix = f" ... ({len(errors)} errors in all)"
    cut = message.encode()[: MAX_STATUS_BYTES - len(suffix)].decode(errors="ignore")
    return cut + suffix


def summarize(spec: compiler_pb2.WorkflowSpec) -> compiler_pb2.WorkflowSummary:
    return compiler_pb2.WorkflowSummary(
        name=spec.name,
        description=spec.description,
        node_count=len(spec.nodes),
        input_names=[i.name for i in spec.inputs],
    )


def structure_name(spec: compiler_pb2.WorkflowSpec, prefix: str = "comfy-") -> str:
    """A name from the workflow's structure alone: input defaults (a prompt's text, seed, size) left
    out, so every prompt posted with the same graph runs on one registered workflow."""
    shape = compiler_pb2.WorkflowSpec()
    shape.CopyFrom(spec)
    shape.name = ""
    for spec_input in shape.inputs:
        spec_input.ClearField("default_value")
    return prefix + hashlib.sha256(shape.SerializeToString(deterministic=True)).hexdigest()[:16]


def source_refusals(spec: compiler_pb2.WorkflowSpec, policy: SourcePolicy) -> list[str]:
    """Every model and LoRA the workflow names, checked against the cluster's model roots."""
    models = [node.model for node in spec.nodes] + [a.model for node in spec.nodes for a in node.adapters]
    sources = [model.rpartition(":")[0] or model for model in models if model]
    sources += [patch.source for node in spec.nodes for patch in node.patches]
    return sorted({refusal for source in sources if (refusal := policy.refusal(source)) is not None})


class CompilerServicer(compiler_pb2_grpc.CompilerServicer):
    def __init__(self, store: ClusterStore, policy: SourcePolicy | None = None) -> None:
        self.store = store
        self.policy = policy or SourcePolicy()

    async def RegisterWorkflow(
        self, request: compiler_pb2.WorkflowSpec, context: grpc.aio.ServicerContext
    ) -> compiler_pb2.RegisterWorkflowReply:
        errors = validate_spec(request) or source_refusals(request, self.policy)
        if errors:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, status_message(errors))
        return await self._store(request)

    async def ImportComfyUI(
        self, request: compiler_pb2.ImportComfyUIRequest, context: grpc.aio.ServicerContext
    ) -> compiler_pb2.ImportComfyUIReply:
        try:
            prompt = json.loads(request.workflow_json)
            spec = import_comfyui(prompt, "comfy")
        except (json.JSONDecodeError, RecursionError) as error:  # RecursionError: nested too deep
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"workflow_json: not JSON ({error})")
            raise AssertionError("unreachable") from None
        except ComfyUIError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, status_message(error.errors))
            raise AssertionError("unreachable") from None
        spec.name = structure_name(spec)
        errors = validate_spec(spec) or source_refusals(spec, self.policy)
        if errors:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, status_message(errors))
        registered = await self._store(spec)
        return compiler_pb2.ImportComfyUIReply(workflow=spec, registered=registered)

    async def _store(self, request: compiler_pb2.WorkflowSpec) -> compiler_pb2.RegisterWorkflowReply:
        spec = optimise(request)
        await self.store.put(keys.workflow(spec.name), spec.SerializeToString())
        log.info("workflow_registered", workflow=spec.name, nodes=len(spec.nodes), given=len(request.nodes))
        per_model = Counter(node.model for node in spec.nodes)
        return compiler_pb2.RegisterWorkflowReply(
            name=spec.name, node_count=len(spec.nodes), nodes_per_model=dict(per_model)
        )

    async def GetWorkflow(
        self, request: compiler_pb2.GetWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> compiler_pb2.WorkflowSpec:
        raw = await self.store.get(keys.workflow(request.name))
        if raw is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown workflow {request.name!r}")
            raise AssertionError("unreachable")
        return compiler_pb2.WorkflowSpec.FromString(raw)

    async def ListWorkflows(
        self, request: common_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> compiler_pb2.ListWorkflowsReply:
        stored = await self.store.get_prefix(keys.WORKFLOWS)
        return compiler_pb2.ListWorkflowsReply(
            workflows=[summarize(compiler_pb2.WorkflowSpec.FromString(raw)) for raw in stored.values()]
        )


class CompilerService:
    def __init__(self, server: RunningServer, registration: Registration) -> None:
        self.server = server
        self.address = server.address
        self._registration = registration

    async def stop(self) -> None:
        await self._registration.close()
        await self.server.stop()


async def serve(
    store: ClusterStore, host: str = "127.0.0.1", port: int = 0, policy: SourcePolicy | None = None
) -> CompilerService:
    servicer = CompilerServicer(store, policy or SourcePolicy.from_env())
    server = await start_server(
        lambda s: compiler_pb2_grpc.add_CompilerServicer_to_server(servicer, s),
        [compiler_pb2.DESCRIPTOR.services_by_name["Compiler"].full_name],
        host,
        port,
    )
    registration = await store.register(
        keys.service("compiler", uuid.uuid4().hex[:8]), server.address.encode(), REGISTRATION_TTL_S
    )
    log.info("compiler_started", address=server.address)
    return CompilerService(server, registration)
