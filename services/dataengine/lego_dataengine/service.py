"""The DataEngine gRPC servicer: Put/Get as chunked streams; Get pulls from a peer when needed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import structlog
from lego import dataplane
from lego.grpc_server import RunningServer, channel, start_server
from lego.store import ClusterStore
from lego.v1 import common_pb2, dataengine_pb2, dataengine_pb2_grpc

from lego_dataengine.tensor_store import TensorStore

log = structlog.get_logger("lego.dataengine")
LAZY_WAIT_S = 60.0


class DataEngineServicer(dataengine_pb2_grpc.DataEngineServicer):
    def __init__(self) -> None:
        self.store = TensorStore()
        self.address = ""
        self._peers: dict[str, dataengine_pb2_grpc.DataEngineStub] = {}

    def _peer(self, address: str) -> dataengine_pb2_grpc.DataEngineStub:
        if address not in self._peers:
            self._peers[address] = dataengine_pb2_grpc.DataEngineStub(channel(address))
        return self._peers[address]

    async def Put(
        self, request_iterator: AsyncIterator[dataengine_pb2.TensorChunk], context: grpc.aio.ServicerContext
    ) -> common_pb2.TensorHandle:
        header, data = await dataplane.read_chunks(request_iterator)
        handle = common_pb2.TensorHandle()
        handle.CopyFrom(header)
        del handle.locations[:]
        handle.locations.append(self.address)
        try:
            self.store.put(handle, bytes(data))
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return handle

    async def _pull(self, handle: common_pb2.TensorHandle) -> None:
        for location in handle.locations:
            if location == self.address:
                continue
            header, data = await dataplane.read_chunks(
                self._peer(location).Get(dataengine_pb2.GetTensorRequest(handle=handle))
            )
            replica = common_pb2.TensorHandle()
            replica.CopyFrom(header)
            replica.locations.append(self.address)
            self.store.put(replica, bytes(data))
            self.store.bytes_pulled += len(data)
            return
        raise LookupError(f"tensor {handle.tensor_id} is held by no reachable data engine")

    async def Get(
        self, request: dataengine_pb2.GetTensorRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dataengine_pb2.TensorChunk]:
        tensor_id = request.handle.tensor_id
        if self.store.get(tensor_id) is None and any(loc != self.address for loc in request.handle.locations):
            try:
                await self._pull(request.handle)
            except (LookupError, grpc.aio.AioRpcError) as error:
                log.warning("pull_failed", tensor_id=tensor_id, error=str(error))
        try:
            stored = await self.store.wait_for(tensor_id, LAZY_WAIT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"tensor {tensor_id} did not arrive")
        for chunk in dataplane.chunks(stored.handle, stored.data):
            yield chunk

    async def Free(
        self, request: dataengine_pb2.FreeRequest, context: grpc.aio.ServicerContext
    ) -> dataengine_pb2.FreeReply:
        return dataengine_pb2.FreeReply(freed=self.store.free(list(request.tensor_ids), request.request_id))

    async def Stats(
        self, request: common_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> dataengine_pb2.DataEngineStats:
        return dataengine_pb2.DataEngineStats(
            tensors=len(self.store),
            bytes_stored=self.store.bytes_stored,
            bytes_pulled=self.store.bytes_pulled,
        )


class DataEngineService:
    def __init__(self, servicer: DataEngineServicer, server: RunningServer) -> None:
        self.servicer = servicer
        self.server = server
        self.address = server.address

    async def stop(self) -> None:
        await self.server.stop()


async def serve(store: ClusterStore | None, host: str = "127.0.0.1", port: int = 0) -> DataEngineService:
    servicer = DataEngineServicer()
    server = await start_server(
        lambda s: dataengine_pb2_grpc.add_DataEngineServicer_to_server(servicer, s),
        [dataengine_pb2.DESCRIPTOR.services_by_name["DataEngine"].full_name],
        host,
        port,
    )
    servicer.address = server.address
    log.info("dataengine_started", address=server.address)
    return DataEngineService(servicer, server)
