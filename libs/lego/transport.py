"""The data-plane interface a worker programs against, whatever moves the bytes.

`lego.dataplane.DataPlane` is the CPU implementation (the host's shared-memory arena, gRPC between
hosts); `lego.gpu_transport` has CUDA IPC (same host) and NVSHMEM (across GPUs), which keep tensors on
the device and use the data engine only for their small descriptors.
"""

from __future__ import annotations

from typing import Any, Protocol

from lego.v1 import common_pb2


class Transport(Protocol):
    async def put(self, tensor_id: str, array: Any, consumers: int = 0) -> common_pb2.TensorHandle:
        """Publish a tensor; with `consumers` > 0 it is freed after that many releases."""
        ...

    async def get(self, handle: common_pb2.TensorHandle) -> Any:
        """The tensor behind a handle, waiting for it if it has not been published yet."""
        ...
