"""What every client returns, and the one place it is built: from the gateway's protos, and from its
REST JSON (parsed into those protos first, so both APIs go through the same conversion)."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import json_format

from lego.client.errors import status_code
from lego.v1 import compiler_pb2, coordinator_pb2, gateway_pb2

# A request's progress ends with one of these (`rejected`: the coordinator refused to admit it).
FINAL_KINDS = frozenset({"done", "failed", "cancelled", "rejected"})
FINAL_STATES = frozenset({"done", "failed", "cancelled"})


def _plain(value: Any) -> Any:
    if isinstance(value, grpc.StatusCode):
        return value.name
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


class _Record:
    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: status codes by name, bytes in base64."""
        result: dict[str, Any] = _plain(self)
        return result


@dataclasses.dataclass(frozen=True)
class Progress(_Record):
    """One event of a request: queued, admitted, step (1-based of `total`), node_started/_finished
    (when asked for), and one final event: done, failed, cancelled or rejected."""

    request_id: str
    kind: str
    time_s: float = 0.0  # since the gateway accepted the request
    step: int = 0
    total: int = 0
    node_id: str = ""
    worker_id: str = ""
    code: grpc.StatusCode | None = None  # failed, rejected, cancelled
    message: str = ""

    @property
    def final(self) -> bool:
        return self.kind in FINAL_KINDS


@dataclasses.dataclass(frozen=True)
class GeneratedImage(_Record):
    request_id: str
    png: bytes
    width: int
    height: int
    latency_s: float
    nodes_executed: int = 0  # gRPC only
    execution_s: float = 0.0  # gRPC only
    slo_s: float = 0.0  # gRPC only
    unpatched_calls: int = 0  # denoiser calls run before their LoRA had loaded (async LoRA)
    skipped_steps: int = 0  # denoise iterations an approximate-cache hit skipped


@dataclasses.dataclass(frozen=True)
class RequestInfo(_Record):
    """Where a request stands. state: queued | running | done | failed | cancelled."""

    request_id: str
    workflow: str
    state: str
    step: int = 0
    total_steps: int = 0
    latency_s: float = 0.0
    slo_s: float = 0.0
    estimate_s: float = 0.0
    error_code: grpc.StatusCode | None = None
    error_message: str = ""

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


@dataclasses.dataclass(frozen=True)
class WorkflowInfo(_Record):
    name: str
    description: str
    node_count: int
    inputs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WorkerInfo(_Record):
    worker_id: str
    address: str
    busy: bool
    draining: bool
    loaded_models: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SloWindow(_Record):
    """SLO attainment of the requests the gateway answered in the last `window_s` seconds."""

    window_s: float
    answered: int
    met: int
    attainment: float


@dataclasses.dataclass(frozen=True)
class ClusterInfo(_Record):
    workers: tuple[WorkerInfo, ...]
    requests_in_flight: int
    ready_tasks: int
    policy: str
    epoch: int
    slo: SloWindow


# ---- from the protos (the gRPC API) ----


def progress(event: gateway_pb2.ProgressEvent) -> Progress:
    return Progress(
        request_id=event.request_id,
        kind=event.kind,
        time_s=event.time_s,
        step=event.step,
        total=event.total,
        node_id=event.node_id,
        worker_id=event.worker_id,
        code=status_code(event.code) if event.code else None,
        message=event.message,
    )


def generated_image(reply: gateway_pb2.GenerateReply) -> GeneratedImage:
    return GeneratedImage(
        request_id=reply.request_id,
        png=reply.png,
        width=reply.width,
        height=reply.height,
        latency_s=reply.latency_s,
        nodes_executed=reply.nodes_executed,
        execution_s=reply.execution_s,
        slo_s=reply.slo_s,
        unpatched_calls=reply.unpatched_calls,
        skipped_steps=reply.skipped_steps,
    )


def request_info(status: gateway_pb2.RequestStatus) -> RequestInfo:
    return RequestInfo(
        request_id=status.request_id,
        workflow=status.workflow,
        state=status.state,
        step=status.step,
        total_steps=status.total_steps,
        latency_s=status.latency_s,
        slo_s=status.slo_s,
        estimate_s=status.estimate_s,
        error_code=status_code(status.error_code) if status.error_code else None,
        error_message=status.error_message,
    )


def workflow_infos(reply: compiler_pb2.ListWorkflowsReply) -> list[WorkflowInfo]:
    return [WorkflowInfo(w.name, w.description, w.node_count, tuple(w.input_names)) for w in reply.workflows]


def cluster_info(view: gateway_pb2.ClusterView) -> ClusterInfo:
    status, slo = view.cluster, view.slo
    return ClusterInfo(
        workers=tuple(
            WorkerInfo(w.worker_id, w.address, w.busy, w.draining, tuple(w.loaded_models))
            for w in status.workers
        ),
        requests_in_flight=status.requests_in_flight,
        ready_tasks=status.ready_tasks,
        policy=status.policy,
        epoch=status.epoch,
        slo=SloWindow(slo.window_s, slo.answered, slo.met, slo.attainment),
    )


# ---- from the REST API's JSON ----


def _parse(data: Mapping[str, Any], message: Any) -> Any:
    return json_format.ParseDict(dict(data), message, ignore_unknown_fields=True)


def progress_json(data: Mapping[str, Any]) -> Progress:
    return progress(_parse(data, gateway_pb2.ProgressEvent()))


def generated_image_json(data: Mapping[str, Any]) -> GeneratedImage:
    """The `response_format=b64_json` form of an image."""
    reply = gateway_pb2.GenerateReply(png=base64.b64decode(data.get("b64_json", "")))
    return generated_image(_parse({k: v for k, v in data.items() if k != "b64_json"}, reply))


def request_info_json(data: Mapping[str, Any]) -> RequestInfo:
    status = _parse(data, gateway_pb2.RequestStatus())
    error = data.get("error") or {}
    if error:
        status.error_code = status_code(str(error.get("code", ""))).value[0]
        status.error_message = str(error.get("message", ""))
    return request_info(status)


def workflow_infos_json(data: Mapping[str, Any]) -> list[WorkflowInfo]:
    reply = compiler_pb2.ListWorkflowsReply()
    for item in data.get("workflows", []):
        _parse({k: v for k, v in item.items() if k != "inputs"}, reply.workflows.add()).input_names.extend(
            item.get("inputs", [])
        )
    return workflow_infos(reply)


def cluster_info_json(data: Mapping[str, Any]) -> ClusterInfo:
    view = gateway_pb2.ClusterView(
        cluster=_parse(data, coordinator_pb2.ClusterStatusReply()),
        slo=_parse(data.get("slo", {}), gateway_pb2.SloWindow()),
    )
    return cluster_info(view)
