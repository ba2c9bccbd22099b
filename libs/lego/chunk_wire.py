"""`TensorChunk` streams on the wire without protobuf's extra copies of the payload.

A data-only chunk is, in protobuf's wire format, tag 0x12 (field 2, length-delimited), a varint
length, then the bytes. The sender builds that in one copy from the arena; the receiver takes a
memoryview of the payload instead of a copy. The bytes are ordinary `TensorChunk` messages, so any
protobuf client can read the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from lego.v1 import common_pb2, dataengine_pb2

GET_METHOD = "/lego.v1.DataEngine/Get"
_DATA_TAG = b"\x12"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(raw):
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, pos


def encode_data(payload: memoryview) -> bytes:
    """A data-only `TensorChunk`, serialised: the only copy of the payload on the sending side."""
    return b"".join((_DATA_TAG, _varint(len(payload)), payload))


def serialize(message: dataengine_pb2.TensorChunk | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


@dataclass
class WireChunk:
    header: common_pb2.TensorHandle | None
    data: memoryview


def parse(raw: bytes) -> WireChunk:
    """A received chunk; a data-only one is not copied."""
    if raw[:1] == _DATA_TAG:
        length, pos = _read_varint(raw, 1)
        if pos + length == len(raw):
            return WireChunk(None, memoryview(raw)[pos:])
    message = dataengine_pb2.TensorChunk.FromString(raw)
    return WireChunk(message.header if message.HasField("header") else None, memoryview(message.data))


def get_stream(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamMultiCallable:
    """`DataEngine.Get` on `channel`, answering `WireChunk`s."""
    return channel.unary_stream(
        GET_METHOD,
        request_serializer=dataengine_pb2.GetTensorRequest.SerializeToString,
        response_deserializer=parse,
    )
