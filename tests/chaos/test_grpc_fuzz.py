"""Chaos, bad input over gRPC: every unary and streaming method of the Gateway, Compiler,
Coordinator, Worker and DataEngine services of an embedded cluster gets garbage (random bytes,
truncated messages, random well-formed messages with NaN, huge ints and strings and loopback-only
addresses, messages with huge repeated fields, messages over the 64 MiB limit), then the cluster
must still be healthy and serve a real generate.

What an answer may be: a valid reply, or any status but UNKNOWN and INTERNAL (a servicer that lets
an exception escape answers UNKNOWN) — with one documented exception: grpc.aio itself answers
UNKNOWN, "Unexpected <class 'google.protobuf.message.DecodeError'>: Error parsing message with type
'lego.v1.<Request>'", when the request bytes do not parse as the method's request type. That comes
from the server's request deserializer, before any servicer code runs (the sync grpc server says
INTERNAL "Exception deserializing request!" instead); the test accepts it only for bytes that really
do not parse. WorkerStream gets nothing of the worker protocol beyond a garbage first message.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message_factory
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego.grpc_server import MAX_MESSAGE_BYTES
from lego.tls import channel_credentials, name_override, tls_files
from lego.v1 import (
    common_pb2,
    compiler_pb2,
    coordinator_pb2,
    dataengine_pb2,
    dataengine_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    worker_pb2,
)
from lego.values import to_values
from lego_cli.cluster import EmbeddedCluster
from lego_dataengine import service as dataengine
from lego_dataengine.parts import PartStreams

pytestmark = pytest.mark.timeout(180)

MODULES = (gateway_pb2, compiler_pb2, coordinator_pb2, worker_pb2, dataengine_pb2)
CALL_TIMEOUT_S = 3.0
LOOPBACK_NOWHERE = "127.0.0.1:1"  # every address a fuzzed message carries: loopback, nothing listens
# Model ids a fuzzed message may name: none of them makes a worker download anything.
SAFE_MODELS = ["", "nocolon", "tiny-nosuch:unet", "builtin:nope", ":unet", "tiny-sd15:", "tiny-sd15:nope"]
STRINGS = ["", "x", "é", "\x00", "💥", "a/b", "../../etc/passwd", "%s%n", "x" * 10_000]
ADDRESS_FIELDS = {"locations", "address", "dataengine_address", "requester"}
RAW_OPTIONS = [
    ("grpc.max_send_message_length", -1),  # the client sends whatever it is given: the server decides
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
UNPARSABLE = "Unexpected <class 'google.protobuf.message.DecodeError'>: Error parsing message with type"


def raw_channel(address: str) -> grpc.aio.Channel:
    files = tls_files()
    if files is None:
        return grpc.aio.insecure_channel(address, options=RAW_OPTIONS)
    return grpc.aio.secure_channel(address, channel_credentials(files), options=RAW_OPTIONS + name_override())


def methods() -> Iterator[tuple[str, descriptor.MethodDescriptor]]:
    for module in MODULES:
        for name, service in module.DESCRIPTOR.services_by_name.items():
            for method in service.methods:
                yield name, method


def request_class(method: descriptor.MethodDescriptor) -> type[Message]:
    return message_factory.GetMessageClass(method.input_type)


# ---- random well-formed messages ----


def _scalar(field: descriptor.FieldDescriptor, rng: random.Random) -> Any:
    kind = field.type
    if kind == field.TYPE_STRING:
        if field.name in ADDRESS_FIELDS:
            return LOOPBACK_NOWHERE
        if "model" in field.name:
            return rng.choice(SAFE_MODELS)
        return rng.choice([*STRINGS, "".join(rng.choice("abc/:-_.") for _ in range(rng.randint(1, 12)))])
    if kind == field.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 17, 4096]))
    if kind == field.TYPE_BOOL:
        return rng.random() < 0.5
    if kind in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
        return rng.choice(
            [0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e308, rng.uniform(-1e6, 1e6)]
        )
    if kind == field.TYPE_ENUM:
        return rng.choice([*[v.number for v in field.enum_type.values], 99])
    unsigned = kind in (field.TYPE_UINT32, field.TYPE_UINT64, field.TYPE_FIXED32, field.TYPE_FIXED64)
    bits = 64 if kind in (field.TYPE_INT64, field.TYPE_SINT64, field.TYPE_SFIXED64, field.TYPE_UINT64) else 32
    low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return rng.choice([low, high, 0, 1, -1 if not unsigned else 2, rng.randint(low, high)])


def random_message(cls: type[Message], rng: random.Random, depth: int = 0) -> Message:
    message = cls()
    for field in message.DESCRIPTOR.fields:
        if rng.random() < 0.35:
            continue
        value = getattr(message, field.name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
            for _ in range(rng.randint(0, 3)):
                key = _scalar(key_field, rng)
                if value_field.message_type is not None:
                    if depth < 3:
                        value[key].CopyFrom(
                            random_message(
                                message_factory.GetMessageClass(value_field.message_type), rng, depth + 1
                            )
                        )
                else:
                    value[key] = _scalar(value_field, rng)
        elif field.is_repeated:
            for _ in range(rng.randint(0, 3)):
                if entry is not None:
                    if depth < 3:
                        value.add().CopyFrom(
                            random_message(message_factory.GetMessageClass(entry), rng, depth + 1)
                        )
                else:
                    value.append(_scalar(field, rng))
        elif entry is not None:
            if depth < 3:
                value.CopyFrom(random_message(message_factory.GetMessageClass(entry), rng, depth + 1))
        else:
            setattr(message, field.name, _scalar(field, rng))
    return message


def huge_repeated(cls: type[Message], target_bytes: int = 4 * 1024 * 1024) -> Message | None:
    """The message with its first repeated (or map) field grown to about `target_bytes`."""
    message = cls()
    for field in message.DESCRIPTOR.fields:
        if not field.is_repeated:
            continue
        value = getattr(message, field.name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            count = target_bytes // 64
            for index in range(count):
                key = f"k{index}"
                if entry.fields_by_name["value"].message_type is not None:
                    value[key].SetInParent()
                else:
                    value[key] = _scalar(entry.fields_by_name["value"], random.Random(index))
            return message
        if entry is not None:
            for _ in range(target_bytes // 16):
                value.add()
            return message
        if field.type == field.TYPE_STRING:
            value.extend(f"t{index}" for index in range(target_bytes // 16))
        else:
            value.extend([1] * (target_bytes // 8))
        return message
    return None


def payloads(service: str, method: descriptor.MethodDescriptor) -> list[bytes]:
    """What each method is sent: random bytes, truncated and random well-formed messages, empty."""
    rng = random.Random(f"{service}/{method.name}")
    cls = request_class(method)
    found = [b"", rng.randbytes(1), rng.randbytes(7), rng.randbytes(64), rng.randbytes(1000), b"\xff" * 16]
    for _ in range(8):
        found.append(random_message(cls, rng).SerializeToString())
    for _ in range(3):
        whole = random_message(cls, rng).SerializeToString()
        if len(whole) > 1:
            found.append(whole[: rng.randint(1, len(whole) - 1)])
    return found


def parses(cls: type[Message], data: bytes) -> bool:
    try:
        cls.FromString(data)
    except DecodeError:
        return False
    return True


# ---- calling ----


async def call(
    chan: grpc.aio.Channel,
    service: str,
    method: descriptor.MethodDescriptor,
    data: list[bytes],
    timeout_s: float = CALL_TIMEOUT_S,
) -> Any:
    """One call with raw bytes; the status code and details (OK with None for a valid answer)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.client_streaming and method.server_streaming:
            stream = chan.stream_stream(path)(iter(data), timeout=timeout_s)
            _ = [item async for item in stream]
        elif method.client_streaming:
            await chan.stream_unary(path)(iter(data), timeout=timeout_s)
        elif method.server_streaming:
            stream = chan.unary_stream(path)(data[0], timeout=timeout_s)
            _ = [item async for item in stream]
        else:
            await chan.unary_unary(path)(data[0], timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, None


def judge(
    service: str, method: descriptor.MethodDescriptor, data: list[bytes], code: Any, details: str | None
) -> str | None:
    """Why this answer is wrong, or None."""
    if code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        return None
    cls = request_class(method)
    documented = f"{UNPARSABLE} '{method.input_type.full_name}'"
    unparsable = not all(parses(cls, item) for item in data)
    if code == grpc.StatusCode.UNKNOWN and (details or "").startswith(documented) and unparsable:
        return None  # grpc.aio's own answer to bytes that are not a request (see the docstring)
    return f"{service}.{method.name} {[item[:40] for item in data]!r}: {code.name} {(details or '')[:300]}"


def addresses(cluster: EmbeddedCluster) -> dict[str, str]:
    by_class = {type(s).__name__: getattr(s, "address", "") for s in cluster.services}
    return {
        "Gateway": cluster.gateway_address,
        "Compiler": cluster.compiler_address,
        "Coordinator": cluster.coordinator_address,
        "Worker": by_class["WorkerService"],
        "DataEngine": by_class["DataEngineService"],
    }


async def assert_healthy(cluster: EmbeddedCluster) -> None:
    for service, address in addresses(cluster).items():
        async with raw_channel(address) as chan:
            reply = await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    async with raw_channel(cluster.gateway_address) as chan:
        gateway = gateway_pb2_grpc.GatewayStub(chan)
        inputs = to_values({"prompt": "a red circle", "steps": 2, "height": 64, "width": 64})
        reply = await gateway.Generate(
            gateway_pb2.GenerateRequest(workflow=TINY_SD15_TXT2IMG, inputs=inputs), timeout=60
        )
        assert reply.png.startswith(b"\x89PNG") and (reply.width, reply.height) == (64, 64)
        view = await gateway.ClusterStatus(common_pb2.Empty(), timeout=10)
        assert len(view.cluster.workers) == 1  # the worker's stream survived


def bad_inputs() -> list[dict[str, common_pb2.Value]]:
    """Request inputs each with one thing wrong (the rest valid): never a request that would run."""
    prompt = common_pb2.Value(string_value="a red circle")
    wrong: list[tuple[str, common_pb2.Value]] = [
        ("prompt", common_pb2.Value(float_value=math.nan)),
        ("prompt", common_pb2.Value()),
        ("prompt", common_pb2.Value(string_value="x" * 1_000_000)),
        (
            "prompt",
            common_pb2.Value(tensor=common_pb2.TensorHandle(tensor_id="t", locations=[LOOPBACK_NOWHERE])),
        ),
        ("steps", common_pb2.Value(float_value=math.inf)),
        ("steps", common_pb2.Value(int_value=-5)),
        ("steps", common_pb2.Value(int_value=0)),
        ("steps", common_pb2.Value(bool_value=True)),
        ("steps", common_pb2.Value(int_value=2**63 - 1)),
        ("guidance_scale", common_pb2.Value(float_value=math.nan)),
        ("guidance_scale", common_pb2.Value(float_value=-math.inf)),
        ("seed", common_pb2.Value(int_value=-1)),
        ("seed", common_pb2.Value(float_value=1.5)),
        ("height", common_pb2.Value(int_value=0)),
        ("width", common_pb2.Value(int_value=-64)),
        ("height", common_pb2.Value(int_value=2**62)),
        ("width", common_pb2.Value(string_value="64")),
        ("nope", common_pb2.Value(int_value=1)),
        ("é" * 100_000, common_pb2.Value(int_value=1)),
    ]
    return [{"prompt": prompt, name: value} for name, value in wrong]


# ---- the test ----


async def test_garbage_to_every_method_is_refused_and_the_cluster_keeps_serving() -> None:
    problems: list[str] = []
    async with EmbeddedCluster(workers=1) as cluster:
        where = addresses(cluster)
        channels = {service: raw_channel(address) for service, address in where.items()}
        limit = asyncio.Semaphore(32)
        answers: dict[str, int] = {}

        async def send(service: str, method: descriptor.MethodDescriptor, data: list[bytes]) -> None:
            async with limit:
                code, details = await call(channels[service], service, method, data)
            answers[code.name] = answers.get(code.name, 0) + 1
            wrong = judge(service, method, data, code, details)
            if wrong:
                problems.append(wrong)

        jobs = []
        for service, method in methods():
            if method.client_streaming and method.server_streaming:  # WorkerStream: a garbage first message
                first = [
                    b"\xff\xff\xff",
                    coordinator_pb2.WorkerMessage(drain=coordinator_pb2.DrainWorker()).SerializeToString(),
                    coordinator_pb2.WorkerMessage(
                        result=coordinator_pb2.BatchResult(batch_id="x", error="boom")
                    ).SerializeToString(),
                ]
                jobs += [send(service, method, [data]) for data in first]
                jobs.append(send(service, method, []))
                continue
            for data in payloads(service, method):
                jobs.append(send(service, method, [data]))
                if method.client_streaming:
                    jobs.append(send(service, method, [data, data, b"\x00"]))
        await asyncio.gather(*jobs)
        assert answers.get("OK", 0) > 10 and len(answers) > 3, answers  # the fuzz reached real code

        # Messages with one huge repeated (or map) field, well under the 64 MiB limit.
        for service, method in methods():
            if method.client_streaming and method.server_streaming:
                continue
            message = huge_repeated(request_class(method))
            if message is not None:
                data = [message.SerializeToString()]
                code, details = await call(channels[service], service, method, data, timeout_s=15)
                wrong = judge(service, method, data, code, details)
                if wrong:
                    problems.append(wrong)

        # Over the limit: the server refuses before decoding, RESOURCE_EXHAUSTED.
        oversized = b"\x0a" + b"\x80\x80\x80\x20" + b"x" * (MAX_MESSAGE_BYTES + 1024)
        for service in where:
            method = next(m for s, m in methods() if s == service and not m.client_streaming)
            code, details = await call(channels[service], service, method, [oversized], timeout_s=30)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (service, code, details)

        # Requests that are well-formed but each carry one bad input: INVALID_ARGUMENT, through the
        # gateway and straight to the coordinator.
        for index, inputs in enumerate(bad_inputs()):
            for slo_ms in (0.0, math.nan, -1.0, math.inf):
                request = gateway_pb2.GenerateRequest(
                    workflow=TINY_SD15_TXT2IMG, inputs=inputs, slo_ms=slo_ms
                )
                submit = coordinator_pb2.SubmitRequest(
                    request_id=f"bad-{index}-{slo_ms}",
                    workflow=TINY_SD15_TXT2IMG,
                    inputs=inputs,
                    slo_ms=slo_ms,
                )
                for service, name, message in (
                    ("Gateway", "Generate", request),
                    ("Gateway", "Submit", request),
                    ("Coordinator", "Submit", submit),
                ):
                    module = gateway_pb2 if service == "Gateway" else coordinator_pb2
                    method = module.DESCRIPTOR.services_by_name[service].methods_by_name[name]
                    code, details = await call(
                        channels[service], service, method, [message.SerializeToString()], timeout_s=15
                    )
                    if code != grpc.StatusCode.INVALID_ARGUMENT:
                        shown = {k[:20]: str(v)[:40] for k, v in inputs.items()}
                        problems.append(
                            f"{service}.{name} {shown} slo_ms={slo_ms}: {code.name} {(details or '')[:200]}"
                        )

        for chan in channels.values():
            await chan.close()
        await assert_healthy(cluster)
    assert not problems, "\n".join(problems)


async def test_read_parts_with_a_negative_start_is_invalid_and_leaves_no_stream() -> None:
    engine = await dataengine.serve(None, arena_mib=8)
    try:
        async with raw_channel(engine.address) as chan:
            stub = dataengine_pb2_grpc.DataEngineStub(chan)
            stream = stub.ReadParts(dataengine_pb2.ReadPartsRequest(stream_id="s", start=-1), timeout=2)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [part async for part in stream]
    finally:
        await engine.stop()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "start must be ≥ 0, got -1" in (caught.value.details() or "")


async def test_a_reader_of_a_stream_nobody_publishes_leaves_nothing_behind() -> None:
    streams = PartStreams()
    with pytest.raises(TimeoutError):
        _ = [part async for part in streams.read("never-published", 0, timeout_s=0.05)]
    assert len(streams) == 0
