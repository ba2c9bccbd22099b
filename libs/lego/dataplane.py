"""Client side of the data engine: put and get whole tensors as chunked gRPC streams."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np

from lego import tensors
from lego.grpc_server import channel
from lego.v1 import common_pb2, dataengine_pb2, dataengine_pb2_grpc

CHUNK_BYTES = 1024 * 1024


def chunks(handle: common_pb2.TensorHandle, data: bytes | memoryview) -> list[dataengine_pb2.TensorChunk]:
    view = memoryview(data)
    parts = [dataengine_pb2.TensorChunk(header=handle, data=bytes(view[:CHUNK_BYTES]))]
    parts += [
        dataengine_pb2.TensorChunk(data=bytes(view[offset : offset + CHUNK_BYTES]))
        for offset in range(CHUNK_BYTES, len(view), CHUNK_BYTES)
    ]
    return parts


async def read_chunks(
    stream: AsyncIterator[dataengine_pb2.TensorChunk],
) -> tuple[common_pb2.TensorHandle, bytearray]:
    header: common_pb2.TensorHandle | None = None
    buffer = bytearray()
    async for chunk in stream:
        if header is None:
            header = chunk.header
            buffer = bytearray()
        buffer += chunk.data
    if header is None:
        raise ValueError("empty tensor stream")
    return header, buffer


async def put_array(
    stub: dataengine_pb2_grpc.DataEngineStub, tensor_id: str, array: np.ndarray
) -> common_pb2.TensorHandle:
    handle = tensors.make_handle(tensor_id, array)
    reply: common_pb2.TensorHandle = await stub.Put(iter(chunks(handle, tensors.to_bytes(array))))
    return reply


async def get_array(stub: dataengine_pb2_grpc.DataEngineStub, handle: common_pb2.TensorHandle) -> np.ndarray:
    header, data = await read_chunks(stub.Get(dataengine_pb2.GetTensorRequest(handle=handle)))
    return tensors.from_bytes(header, data)


class DataPlane:
    """A process's access to its host's data engine: publish outputs, read inputs by handle.

    Reads of tensors held elsewhere go through the local data engine, which pulls and caches them.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self._stub = dataengine_pb2_grpc.DataEngineStub(channel(address))

    async def put(self, tensor_id: str, array: np.ndarray) -> common_pb2.TensorHandle:
        return await put_array(self._stub, tensor_id, array)

    async def get(self, handle: common_pb2.TensorHandle) -> np.ndarray:
        return await get_array(self._stub, handle)
