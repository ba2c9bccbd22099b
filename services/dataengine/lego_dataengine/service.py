"""The DataEngine gRPC servicer: tensors in the shared-memory arena, reached by local clients through
the arena and by everyone else as chunked gRPC streams; replicas pulled from peers and cached."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
import structlog
from lego import arena_layout, dataplane, metrics
from lego.allocator import ArenaFull
from lego.chunk_wire import encode_data, get_stream, serialize
from lego.grpc_server import RunningServer, channel, start_server
from lego.store import ClusterStore
from lego.v1 import common_pb2, dataengine_pb2, dataengine_pb2_grpc

from lego_dataengine.arena import Arena
from lego_dataengine.parts import PartStreams
from lego_dataengine.tensor_store import Entry, FreedBeforeArrival, TensorStore

log = structlog.get_logger("lego.dataengine")
LAZY_WAIT_S = 60.0
DEFAULT_ARENA_MIB = 1024
# Pulls of large tensors run over parallel range streams: on the 2-core test VM one gRPC stream moves
# ~0.95 GB/s over loopback, 2 streams ~1.26 GB/s, 4 streams ~1.39 GB/s (64 MiB).
PULL_STREAMS = 4
PARALLEL_PULL_BYTES = 16 * 1024 * 1024
# A peer engine: its stub, and its Get answering zero-copy `lego.chunk_wire.WireChunk`s.
Peer = tuple[dataengine_pb2_grpc.DataEngineStub, grpc.aio.UnaryStreamMultiCallable]
SERVICE = dataengine_pb2.DESCRIPTOR.services_by_name["DataEngine"].full_name


class Refused(Exception):
    """A request the engine turns down: the gRPC status it answers with, and why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DataEngineServicer(dataengine_pb2_grpc.DataEngineServicer):
    def __init__(self, arena: Arena, chunk_bytes: int = dataplane.CHUNK_BYTES) -> None:
        self.arena = arena
        self.chunk_bytes = chunk_bytes
        self.store = TensorStore(arena.data_bytes)
        self.parts = PartStreams()
        self.address = ""
        self.bytes_pulled = 0
        self._peers: dict[str, Peer] = {}
        self._pulls: dict[str, asyncio.Task[Entry]] = {}
        self._background: set[asyncio.Task[None]] = set()

    def _peer(self, address: str) -> Peer:
        """A peer's stub and its `Get` answering zero-copy `WireChunk`s."""
        if address not in self._peers:
            peer_channel = channel(address)
            self._peers[address] = dataengine_pb2_grpc.DataEngineStub(peer_channel), get_stream(peer_channel)
        return self._peers[address]

    def _here(self, header: common_pb2.TensorHandle) -> common_pb2.TensorHandle:
        handle = common_pb2.TensorHandle()
        handle.CopyFrom(header)
        del handle.locations[:]
        handle.locations.append(self.address)
        return handle

    def _commit(self, tensor_id: str) -> Entry:
        entry, replaced = self.store.commit(tensor_id)
        if replaced is not None:
            self._drop([replaced])
        self.arena.publish(tensor_id, entry.offset, entry.handle.nbytes)
        metrics.TENSOR_BYTES.labels(direction="stored").inc(entry.handle.nbytes)
        metrics.ARENA_USED.set(self.store.allocator.used_bytes)
        return entry

    def _drop(self, entries: list[Entry]) -> None:
        """Forget freed tensors in the index and free their replicas on the engines that pulled them."""
        by_peer: dict[str, list[str]] = {}
        for entry in entries:
            self.arena.retract(entry.handle.tensor_id)
            for peer in entry.replicas:
                by_peer.setdefault(peer, []).append(entry.handle.tensor_id)
        for peer, tensor_ids in by_peer.items():
            self._spawn(self._free_replicas(peer, tensor_ids))
        metrics.ARENA_USED.set(self.store.allocator.used_bytes)

    async def _free_replicas(self, peer: str, tensor_ids: list[str]) -> None:
        try:
            await self._peer(peer)[0].Free(dataengine_pb2.FreeRequest(tensor_ids=tensor_ids), timeout=5)
        except grpc.aio.AioRpcError as error:
            log.warning("replica_free_failed", peer=peer, error=error.details())

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _receive(
        self, location: str, handle: common_pb2.TensorHandle, entry: Entry, start: int = 0, length: int = 0
    ) -> None:
        """Stream bytes [start, start + length) (0: to the end) of a peer's tensor into `entry`'s block."""
        request = dataengine_pb2.GetTensorRequest(
            handle=handle, requester=self.address, offset=start, length=length
        )
        expected = length or entry.handle.nbytes - start
        written = 0
        async for chunk in self._peer(location)[1](request):
            if chunk.header is not None and chunk.header.nbytes != entry.handle.nbytes:
                raise ValueError(
                    f"peer {location} holds {chunk.header.nbytes} bytes, not {entry.handle.nbytes}"
                )
            if written + len(chunk.data) > expected:
                raise ValueError(f"peer {location} sent more than {expected} bytes")
            self.arena.view(entry.offset + start + written, len(chunk.data))[:] = chunk.data
            written += len(chunk.data)
        if written != expected:
            raise ValueError(f"peer {location} sent {written} of {expected} bytes")

    async def _pull_from(self, location: str, handle: common_pb2.TensorHandle) -> Entry:
        """Copy a tensor from one peer straight into the arena, large ones over parallel streams."""
        if not handle.dtype:  # a handle without metadata: ask the peer first
            header = await self._peer(location)[0].Locate(dataengine_pb2.GetTensorRequest(handle=handle))
            handle = header.handle
        entry = self.store.reserve(self._here(handle))
        streams = PULL_STREAMS if handle.nbytes >= PARALLEL_PULL_BYTES else 1
        step = -(-handle.nbytes // streams)
        ranges = [(start, min(step, handle.nbytes - start)) for start in range(0, handle.nbytes, step)]
        outcomes = await asyncio.gather(
            *(self._receive(location, handle, entry, start, length) for start, length in ranges or [(0, 0)]),
            return_exceptions=True,  # every stream has stopped writing before the block can be given back
        )
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failures:
            self.store.abort(handle.tensor_id)
            raise failures[0]
        self.bytes_pulled += handle.nbytes
        metrics.TENSOR_BYTES.labels(direction="pulled").inc(handle.nbytes)
        try:
            return self._commit(handle.tensor_id)
        except KeyError as error:  # freed while it was being pulled
            raise LookupError(str(error.args[0])) from error

    async def _pull(self, handle: common_pb2.TensorHandle) -> Entry:
        """The tensor from the first peer that has it; ArenaFull if there is no room here."""
        for location in handle.locations:
            if location == self.address:
                continue
            try:
                return await self._pull_from(location, handle)
            except (grpc.aio.AioRpcError, ValueError) as error:
                log.warning("pull_failed", tensor_id=handle.tensor_id, peer=location, error=str(error))
        raise LookupError(f"tensor {handle.tensor_id} is held by no reachable data engine")

    async def _pull_once(self, handle: common_pb2.TensorHandle) -> Entry:
        """One pull per tensor at a time: a Get that finds a prefetch in flight waits for it."""
        task = self._pulls.get(handle.tensor_id)
        if task is None:
            task = asyncio.create_task(self._pull(handle))
            self._pulls[handle.tensor_id] = task
            task.add_done_callback(lambda _: self._pulls.pop(handle.tensor_id, None))
        return await asyncio.shield(task)

    async def _local(self, handle: common_pb2.TensorHandle, context: grpc.aio.ServicerContext) -> Entry:
        """The tensor here: already held, pulled from a peer, or waited for until it is put."""
        entry = self.store.get(handle.tensor_id)
        if entry is not None:
            return entry
        if any(location != self.address for location in handle.locations):
            try:
                return await self._pull_once(handle)
            except ArenaFull as error:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"tensor {handle.tensor_id}: {error}")
            except LookupError as error:
                log.warning("pull_failed", tensor_id=handle.tensor_id, error=str(error))
        try:
            return await self.store.wait_for(handle.tensor_id, LAZY_WAIT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"tensor {handle.tensor_id} did not arrive")
        except FreedBeforeArrival as error:
            await context.abort(grpc.StatusCode.ABORTED, str(error))
        raise AssertionError("unreachable: abort raises")

    def _allocate(self, request: dataengine_pb2.AllocateRequest) -> dataengine_pb2.Placement:
        """Reserve a block; with data, also write and commit it. Refused: nothing is kept."""
        header = request.header
        try:
            entry = self.store.reserve(self._here(header), request.consumers)
        except ArenaFull as error:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"tensor {header.tensor_id}: {error}") from None
        except ValueError as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        if request.data:
            if len(request.data) != entry.handle.nbytes:
                self.store.abort(entry.handle.tensor_id)
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"tensor {entry.handle.tensor_id}: header says {entry.handle.nbytes} bytes, "
                    f"got {len(request.data)}",
                )
            self.arena.view(entry.offset, entry.handle.nbytes)[:] = request.data
            self._commit_written(entry.handle.tensor_id)
        return dataengine_pb2.Placement(handle=entry.handle, offset=arena_layout.DATA_START + entry.offset)

    def _commit_written(self, tensor_id: str) -> common_pb2.TensorHandle:
        try:
            return self._commit(tensor_id).handle
        except KeyError as error:
            raise Refused(grpc.StatusCode.ABORTED, str(error.args[0])) from None

    async def Put(
        self, request_iterator: AsyncIterator[dataengine_pb2.TensorChunk], context: grpc.aio.ServicerContext
    ) -> common_pb2.TensorHandle:
        entry: Entry | None = None
        written = 0
        async for chunk in request_iterator:
            if entry is None:
                try:
                    entry = self.store.reserve(self._here(chunk.header), chunk.consumers)
                except (ArenaFull, ValueError) as error:
                    # Read the rest before answering: a status sent while the client is still
                    # streaming reaches it as a broken stream, not as the status.
                    async for _ in request_iterator:
                        pass
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED
                    if not isinstance(error, ArenaFull):
                        code = grpc.StatusCode.INVALID_ARGUMENT
                    await context.abort(code, f"tensor {chunk.header.tensor_id}: {error}")
                    raise AssertionError("unreachable: abort raises") from error
            if written + len(chunk.data) <= entry.handle.nbytes:
                self.arena.view(entry.offset + written, len(chunk.data))[:] = chunk.data
            written += len(chunk.data)
        if entry is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty tensor stream")
            raise AssertionError("unreachable: abort raises")
        tensor_id = entry.handle.tensor_id
        if written != entry.handle.nbytes:
            self.store.abort(tensor_id)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor {tensor_id}: header says {entry.handle.nbytes} bytes, got {written}",
            )
        try:
            return self._commit_written(tensor_id)
        except Refused as refused:
            await context.abort(refused.code, refused.message)
        raise AssertionError("unreachable: abort raises")

    async def Get(  # type: ignore[override]  # yields pre-serialised chunks too (see add_servicer)
        self, request: dataengine_pb2.GetTensorRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dataengine_pb2.TensorChunk | bytes]:
        """The header, then data-only chunks already serialised (see `lego.chunk_wire`)."""
        entry = await self._local(request.handle, context)
        if request.requester:
            entry.replicas.add(request.requester)
        self.store.pin(entry)
        try:
            yield dataengine_pb2.TensorChunk(header=entry.handle)
            start = min(max(request.offset, 0), entry.handle.nbytes)
            end = (
                entry.handle.nbytes
                if request.length <= 0
                else min(entry.handle.nbytes, start + request.length)
            )
            data = self.arena.view(entry.offset + start, end - start)
            metrics.TENSOR_BYTES.labels(direction="served").inc(end - start)
            for offset in range(0, len(data), self.chunk_bytes):
                yield encode_data(data[offset : offset + self.chunk_bytes])
        finally:
            self.store.unpin(entry)

    async def Arena(
        self, request: common_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> dataengine_pb2.ArenaInfo:
        return dataengine_pb2.ArenaInfo(
            path=str(self.arena.path),
            size=arena_layout.DATA_START + self.arena.data_bytes,
            token=self.arena.token,
        )

    async def Allocate(
        self, request: dataengine_pb2.AllocateRequest, context: grpc.aio.ServicerContext
    ) -> dataengine_pb2.Placement:
        try:
            return self._allocate(request)
        except Refused as refused:
            await context.abort(refused.code, refused.message)
        raise AssertionError("unreachable: abort raises")

    async def Commit(
        self, request: dataengine_pb2.CommitRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.TensorHandle:
        try:
            return self._commit_written(request.tensor_id)
        except Refused as refused:
            await context.abort(refused.code, refused.message)
        raise AssertionError("unreachable: abort raises")

    async def Publish(
        self,
        request_iterator: AsyncIterator[dataengine_pb2.PublishRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[dataengine_pb2.PublishReply]:
        reserved: set[str] = set()  # blocks reserved on this stream and not committed yet
        try:
            async for request in request_iterator:
                yield self._publish_step(request, reserved)
        finally:
            for tensor_id in reserved:
                self.store.abort(tensor_id)

    def _publish_step(
        self, request: dataengine_pb2.PublishRequest, reserved: set[str]
    ) -> dataengine_pb2.PublishReply:
        """All of a step or, refused, none of its reservations (tensors it committed stay)."""
        reply = dataengine_pb2.PublishReply()
        step: list[str] = []
        try:
            for tensor in request.tensors:
                reply.placements.append(self._allocate(tensor))
                if not tensor.data:
                    step.append(tensor.header.tensor_id)
            reserved.update(step)
            for tensor_id in request.commit:
                if tensor_id not in reserved:
                    raise Refused(grpc.StatusCode.ABORTED, f"tensor {tensor_id} is not being written here")
                reserved.discard(tensor_id)
                reply.committed.append(self._commit_written(tensor_id))
        except Refused as refused:
            for tensor_id in step:
                reserved.discard(tensor_id)
                self.store.abort(tensor_id)
            return dataengine_pb2.PublishReply(code=refused.code.value[0], error=refused.message)
        return reply

    async def Locate(
        self, request: dataengine_pb2.GetTensorRequest, context: grpc.aio.ServicerContext
    ) -> dataengine_pb2.Placement:
        entry = await self._local(request.handle, context)
        return dataengine_pb2.Placement(handle=entry.handle, offset=arena_layout.DATA_START + entry.offset)

    async def Prefetch(
        self, request: dataengine_pb2.GetTensorRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Empty:
        handle = request.handle
        if self.store.get(handle.tensor_id) is None and any(loc != self.address for loc in handle.locations):
            self._spawn(self._prefetch(handle))
        return common_pb2.Empty()

    async def _prefetch(self, handle: common_pb2.TensorHandle) -> None:
        try:
            await self._pull_once(handle)
        except (ArenaFull, LookupError) as error:
            log.warning("prefetch_failed", tensor_id=handle.tensor_id, error=str(error))

    async def PublishPart(
        self, request: dataengine_pb2.TensorPart, context: grpc.aio.ServicerContext
    ) -> common_pb2.Empty:
        try:
            await self.parts.publish(request)
        except ValueError as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return common_pb2.Empty()

    async def ReadParts(
        self, request: dataengine_pb2.ReadPartsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dataengine_pb2.TensorPart]:
        try:
            async for part in self.parts.read(request.stream_id, request.start, LAZY_WAIT_S):
                yield part
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"stream {request.stream_id}: no part came"
            )
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    async def Release(
        self, request: dataengine_pb2.ReleaseTensorsRequest, context: grpc.aio.ServicerContext
    ) -> dataengine_pb2.FreeReply:
        freed = self.store.release(list(request.tensor_ids))
        self._drop(freed)
        return dataengine_pb2.FreeReply(freed=len(freed))

    def _free(self, request: dataengine_pb2.FreeRequest) -> int:
        freed = self.store.free(list(request.tensor_ids), request.request_id, frozenset(request.keep))
        self._drop(freed)
        return len(freed) + self.parts.free(list(request.tensor_ids), request.request_id)

    async def Free(
        self, request: dataengine_pb2.FreeRequest, context: grpc.aio.ServicerContext
    ) -> dataengine_pb2.FreeReply:
        return dataengine_pb2.FreeReply(freed=self._free(request))

    async def FreeStream(
        self, request_iterator: AsyncIterator[dataengine_pb2.FreeRequest], context: grpc.aio.ServicerContext
    ) -> dataengine_pb2.FreeReply:
        freed = 0
        async for request in request_iterator:
            freed += self._free(request)
        return dataengine_pb2.FreeReply(freed=freed)

    async def Stats(
        self, request: common_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> dataengine_pb2.DataEngineStats:
        allocator = self.store.allocator
        return dataengine_pb2.DataEngineStats(
            tensors=len(self.store),
            bytes_stored=self.store.bytes_stored,
            bytes_pulled=self.bytes_pulled,
            arena_capacity=allocator.capacity,
            arena_used=allocator.used_bytes,
            arena_largest_free=allocator.largest_free,
            part_streams=len(self.parts),
        )


class _Recorder:
    """Stands in for a server to capture the generated method handlers."""

    methods: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, methods: dict[str, grpc.RpcMethodHandler]) -> None:
        self.methods = dict(methods)


def add_servicer(servicer: DataEngineServicer, server: grpc.aio.Server) -> None:
    """The generated registration, except that `Get` may send chunks it has serialised itself."""
    recorder = _Recorder()
    dataengine_pb2_grpc.add_DataEngineServicer_to_server(servicer, recorder)
    methods = recorder.methods
    methods["Get"] = methods["Get"]._replace(response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    server.add_registered_method_handlers(SERVICE, methods)


class DataEngineService:
    def __init__(self, servicer: DataEngineServicer, server: RunningServer) -> None:
        self.servicer = servicer
        self.server = server
        self.address = server.address

    async def stop(self) -> None:
        await self.server.stop()
        self.servicer.arena.close()


async def serve(
    store: ClusterStore | None,
    host: str = "127.0.0.1",
    port: int = 0,
    arena_mib: int = DEFAULT_ARENA_MIB,
    chunk_bytes: int = dataplane.CHUNK_BYTES,
) -> DataEngineService:
    servicer = DataEngineServicer(Arena(arena_mib * 1024 * 1024), chunk_bytes)
    try:
        server = await start_server(
            lambda s: add_servicer(servicer, s),
            [SERVICE],
            host,
            port,
        )
    except BaseException:
        servicer.arena.close()
        raise
    servicer.address = server.address
    log.info(
        "dataengine_started", address=server.address, arena=str(servicer.arena.path), arena_mib=arena_mib
    )
    return DataEngineService(servicer, server)
