"""GPU transports between two processes. They run only where cupy and CUDA devices are present
(NVSHMEM: nvshmem4py and two GPUs) and are skipped otherwise."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest
from lego.dataplane import DataPlane
from lego_dataengine.service import serve

from tests.conftest import EtcdProcess

cupy = pytest.importorskip("cupy")
if cupy.cuda.runtime.getDeviceCount() == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

CONSUMER = textwrap.dedent(
    """
    import asyncio, sys
    from lego.dataplane import DataPlane
    from lego.gpu_transport import CudaIpcTransport
    from lego.v1 import common_pb2

    async def main():
        handle = common_pb2.TensorHandle.FromString(bytes.fromhex(sys.argv[2]))
        tensor = await CudaIpcTransport(DataPlane(sys.argv[1])).get(handle)
        print(float(tensor.sum()), tensor.shape, tensor.dtype)

    asyncio.run(main())
    """
)


async def test_cuda_ipc_hands_a_device_tensor_to_another_process() -> None:
    from lego.gpu_transport import CudaIpcTransport

    engine = await serve(None, arena_mib=16)
    try:
        producer = CudaIpcTransport(DataPlane(engine.address))
        array = cupy.arange(1024, dtype=cupy.float32).reshape(32, 32)
        handle = await producer.put("r/n/out", array)
        command = [sys.executable, "-c", CONSUMER, engine.address, handle.SerializeToString().hex()]
        out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
        assert out.split()[0] == str(float(array.sum()))
    finally:
        await engine.stop()


NVSHMEM_PE = textwrap.dedent(
    """
    import asyncio, sys
    import cupy
    from lego.dataplane import DataPlane
    from lego.gpu_transport import NvshmemTransport
    from lego.store import open_store
    from lego.v1 import common_pb2

    async def main():
        engine, store_url, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
        store = await open_store(store_url)
        plane = DataPlane(engine)
        transport = await NvshmemTransport.bootstrap(plane, store, "test", rank, 2, 64 << 20, device_id=rank)
        handle = common_pb2.TensorHandle(tensor_id="r/n/out", dtype="float32", shape=[32, 32], nbytes=4096)
        if rank == 0:
            await transport.put("r/n/out", cupy.arange(1024, dtype=cupy.float32).reshape(32, 32))
            done = common_pb2.TensorHandle(tensor_id="r/done/out", dtype="uint8", shape=[1], nbytes=1)
            await plane.get(done)  # the consumer has read it
        else:
            print(float((await transport.get(handle)).sum()))
            await plane.put("r/done/out", __import__("numpy").ones(1, "uint8"))
        transport.close()
        await store.close()

    asyncio.run(main())
    """
)


async def test_nvshmem_moves_a_tensor_between_two_gpus(etcd: EtcdProcess) -> None:
    pytest.importorskip("nvshmem.core")
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("NVSHMEM needs two GPUs here (one PE per GPU)")
    engine = await serve(None, arena_mib=16)
    try:
        pes = [
            subprocess.Popen(
                [sys.executable, "-c", NVSHMEM_PE, engine.address, etcd.url, str(rank)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for rank in (0, 1)
        ]
        outputs = [await asyncio.to_thread(pe.communicate, timeout=180) for pe in pes]
        assert [pe.returncode for pe in pes] == [0, 0]
        assert outputs[1][0].split()[0] == str(float(sum(range(1024))))
    finally:
        await engine.stop()
