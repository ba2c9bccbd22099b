"""The tensor codec: raw bytes + dtype + shape (safetensors-compatible layout, C order). No pickle."""

from __future__ import annotations

import numpy as np

from lego.v1 import common_pb2

SUPPORTED_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"}
)


def make_handle(tensor_id: str, array: np.ndarray, location: str = "") -> common_pb2.TensorHandle:
    dtype = array.dtype.name
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"tensor {tensor_id}: dtype {dtype} is not supported ({sorted(SUPPORTED_DTYPES)})")
    return common_pb2.TensorHandle(
        tensor_id=tensor_id,
        dtype=dtype,
        shape=list(array.shape),
        nbytes=array.nbytes,
        locations=[location] if location else [],
    )


def inline_handle(tensor_id: str, array: np.ndarray) -> common_pb2.TensorHandle:
    """A scalar (0-d) tensor's handle with its bytes: it travels inside the messages that name it
    (DESIGN §1.4), so no data engine stores it and no round trip publishes or reads it."""
    handle = make_handle(tensor_id, array)
    handle.data = to_bytes(array)
    return handle


def is_pending(handle: common_pb2.TensorHandle) -> bool:
    """A handle the coordinator gave for a tensor still being produced: its id only."""
    return not handle.dtype and not handle.data and not handle.locations


def to_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def from_bytes(handle: common_pb2.TensorHandle, data: bytes | bytearray | memoryview) -> np.ndarray:
    if handle.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"tensor {handle.tensor_id}: unsupported dtype {handle.dtype!r}")
    if len(data) != handle.nbytes:
        raise ValueError(f"tensor {handle.tensor_id}: expected {handle.nbytes} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=np.dtype(handle.dtype)).reshape(tuple(handle.shape))
