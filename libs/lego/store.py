"""The cluster store: a small key-value interface with leases and prefix watches.

Two implementations: `MemoryStore` (embedded mode, one process) and `EtcdStore` (lego.etcd_store).
`open_store("memory")` or `open_store("etcd://HOST:PORT")` picks one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

EventKind = Literal["put", "delete"]


@dataclass(frozen=True)
class StoreEvent:
    kind: EventKind
    key: str
    value: bytes


class Registration(Protocol):
    """A key kept alive by a lease until `close()`; it vanishes if its owner dies."""

    async def close(self) -> None: ...


class Leadership(Protocol):
    """Held after winning an election: `epoch` orders leaders (a newer one is larger); `lost` is set
    when the lease behind it could not be kept (the holder must stop acting as leader)."""

    epoch: int
    lost: asyncio.Event

    async def resign(self) -> None: ...


class ClusterStore(Protocol):
    async def put(self, key: str, value: bytes) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def get_prefix(self, prefix: str) -> dict[str, bytes]: ...

    async def delete(self, key: str) -> bool: ...

    async def register(self, key: str, value: bytes, ttl_s: float) -> Registration: ...

    def watch_prefix(self, prefix: str) -> AsyncIterator[StoreEvent]:
        """Events under `prefix`, forever; survives store restarts (state is re-read, not lost)."""
        ...

    async def campaign(self, key: str, value: bytes, ttl_s: float) -> Leadership:
        """Wait until `key` is free, then hold it (lease-bound) with `value`: leader election."""
        ...

    async def close(self) -> None: ...


class _MemoryRegistration:
    def __init__(self, store: MemoryStore, key: str) -> None:
        self._store = store
        self._key = key

    async def close(self) -> None:
        await self._store.delete(self._key)


class _MemoryLeadership:
    def __init__(self, store: MemoryStore, key: str, epoch: int) -> None:
        self._store = store
        self._key = key
        self.epoch = epoch
        self.lost = asyncio.Event()

    async def resign(self) -> None:
        await self._store.delete(self._key)


class MemoryStore:
    """In-process store for the embedded cluster; same semantics, no leases to expire."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._watchers: list[tuple[str, asyncio.Queue[StoreEvent]]] = []
        self._epochs = 0

    def _notify(self, event: StoreEvent) -> None:
        for prefix, queue in self._watchers:
            if event.key.startswith(prefix):
                queue.put_nowait(event)

    async def put(self, key: str, value: bytes) -> None:
        self._data[key] = value
        self._notify(StoreEvent("put", key, value))

    async def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in sorted(self._data.items()) if k.startswith(prefix)}

    async def delete(self, key: str) -> bool:
        if key not in self._data:
            return False
        del self._data[key]
        self._notify(StoreEvent("delete", key, b""))
        return True

    async def register(self, key: str, value: bytes, ttl_s: float) -> Registration:
        await self.put(key, value)
        return _MemoryRegistration(self, key)

    async def campaign(self, key: str, value: bytes, ttl_s: float) -> Leadership:
        while key in self._data:
            await asyncio.sleep(0.05)
        self._epochs += 1
        await self.put(key, value)
        return _MemoryLeadership(self, key, self._epochs)

    async def watch_prefix(self, prefix: str) -> AsyncIterator[StoreEvent]:
        queue: asyncio.Queue[StoreEvent] = asyncio.Queue()
        entry = (prefix, queue)
        self._watchers.append(entry)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.remove(entry)

    async def close(self) -> None:
        self._watchers.clear()


def parse_store_url(url: str) -> tuple[str, str, int]:
    """`memory` → ("memory", "", 0); `etcd://HOST:PORT` → ("etcd", HOST, PORT)."""
    if url == "memory":
        return "memory", "", 0
    if url.startswith("etcd://"):
        host, _, port = url.removeprefix("etcd://").rstrip("/").rpartition(":")
        if host and port.isdigit():
            return "etcd", host, int(port)
    raise ValueError(f"store must be 'memory' or 'etcd://HOST:PORT', got {url!r}")


async def open_store(url: str) -> ClusterStore:
    kind, host, port = parse_store_url(url)
    if kind == "memory":
        return MemoryStore()
    from lego.etcd_store import EtcdStore

    return await EtcdStore.connect(host, port)


async def wait_for_key(store: ClusterStore, key: str, timeout_s: float) -> bytes:
    """The value of `key`, waiting for it to appear (a service registering itself), and for the store
    to answer again while it cannot (an etcd restart): TimeoutError after `timeout_s` either way."""
    async with asyncio.timeout(timeout_s):
        while True:
            with contextlib.suppress(Exception):  # the store is unreachable for now: ask again
                value = await store.get(key)
                if value is not None:
                    return value
            await asyncio.sleep(0.05)


async def wait_for_prefix(store: ClusterStore, prefix: str, timeout_s: float) -> dict[str, bytes]:
    async with asyncio.timeout(timeout_s):
        while True:
            with contextlib.suppress(Exception):  # as in wait_for_key
                values = await store.get_prefix(prefix)
                if values:
                    return values
            await asyncio.sleep(0.05)


async def cancel_task(task: asyncio.Task[object] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
