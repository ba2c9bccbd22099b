"""The etcd cluster store (aetcd), with our own lease keep-alive and re-watch loop.

Both loops survive an etcd restart: a lost lease is re-created and its key re-put; a broken watch is
re-established after re-reading the prefix, so a watcher sees every change as put/delete events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aetcd
import structlog

from lego.errors import StoreUnavailable
from lego.store import Leadership, Registration, StoreEvent, cancel_task

log = structlog.get_logger("lego.etcd")
RETRY_S = 0.5


class _LeaseRegistration:
    def __init__(self, store: EtcdStore, key: str, value: bytes, ttl_s: float) -> None:
        self._store = store
        self._key = key
        self._value = value
        self._ttl = max(2, round(ttl_s))
        self._lease: aetcd.Lease | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._grant_and_put()
        self._task = asyncio.create_task(self._keep_alive())

    async def _grant_and_put(self) -> None:
        self._lease = await self._store.client.lease(self._ttl)
        await self._store.client.put(self._key.encode(), self._value, lease=self._lease)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                assert self._lease is not None
                reply = await self._lease.refresh()
                if reply.TTL <= 0:  # expired while we were away (etcd restart, long pause)
                    raise RuntimeError("lease expired")
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure: re-register when etcd answers
                log.warning("lease_lost", key=self._key, error=str(error))
                try:
                    await self._grant_and_put()
                    log.info("lease_restored", key=self._key)
                except Exception as retry_error:  # noqa: BLE001
                    log.warning("lease_restore_failed", key=self._key, error=str(retry_error))

    async def close(self) -> None:
        await cancel_task(self._task)
        if self._lease is not None:
            with contextlib.suppress(Exception):  # etcd gone: the lease expires on its own
                await self._lease.revoke()


class _EtcdLeadership:
    """The leader key, bound to a lease we keep alive; losing the lease ends the leadership."""

    def __init__(self, store: EtcdStore, key: str, lease: aetcd.Lease, ttl: int, epoch: int) -> None:
        self._store = store
        self._key = key
        self._lease = lease
        self._ttl = ttl
        self.epoch = epoch
        self.lost = asyncio.Event()
        self._task = asyncio.create_task(self._keep_alive())

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                reply = await asyncio.wait_for(self._lease.refresh(), self._ttl / 3)
                if reply.TTL <= 0:
                    raise RuntimeError("lease expired")
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - we cannot prove we still lead: step down
                log.warning("leadership_lost", key=self._key, error=str(error))
                self.lost.set()
                return

    async def resign(self) -> None:
        await cancel_task(self._task)
        with contextlib.suppress(Exception):
            await self._lease.revoke()


class EtcdStore:
    def __init__(self, client: aetcd.Client, address: str) -> None:
        self.client = client
        self.address = address

    @classmethod
    async def connect(cls, host: str, port: int, timeout_s: float = 5.0) -> EtcdStore:
        address = f"{host}:{port}"
        client = aetcd.Client(host=host, port=port, timeout=timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                await client.status()
        except Exception as error:  # noqa: BLE001 - any failure means the same to the user
            await client.close()
            raise StoreUnavailable(
                f"cannot reach etcd at {address} ({type(error).__name__}); is it running?"
            ) from None
        return cls(client, address)

    async def put(self, key: str, value: bytes) -> None:
        await self.client.put(key.encode(), value)

    async def get(self, key: str) -> bytes | None:
        result = await self.client.get(key.encode())
        return None if result is None else bytes(result.value)

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        result = await self.client.get_prefix(prefix.encode())
        return {kv.key.decode(): bytes(kv.value) for kv in result}

    async def _read_prefix_with_revision(self, prefix: str) -> tuple[dict[str, bytes], int]:
        result = await self.client.get_prefix(prefix.encode())
        values = {kv.key.decode(): bytes(kv.value) for kv in result}
        return values, int(result.header.revision)

    async def delete(self, key: str) -> bool:
        return bool(await self.client.delete(key.encode()))

    async def register(self, key: str, value: bytes, ttl_s: float) -> Registration:
        registration = _LeaseRegistration(self, key, value, ttl_s)
        await registration.start()
        return registration

    async def campaign(self, key: str, value: bytes, ttl_s: float) -> Leadership:
        ttl = max(2, round(ttl_s))
        encoded = key.encode()
        while True:
            try:
                lease = await self.client.lease(ttl)
                won, _ = await self.client.transaction(
                    compare=[self.client.transactions.version(encoded) == 0],
                    success=[self.client.transactions.put(encoded, value, lease=lease)],
                    failure=[],
                )
                if won:
                    held = await self.client.get(encoded)
                    return _EtcdLeadership(self, key, lease, ttl, int(held.create_revision))
                await lease.revoke()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - etcd unavailable: keep campaigning
                log.warning("campaign_retry", key=key, error=str(error))
            await asyncio.sleep(RETRY_S)

    async def watch_prefix(self, prefix: str) -> AsyncIterator[StoreEvent]:
        known: dict[str, bytes] | None = None
        while True:
            try:
                current, revision = await self._read_prefix_with_revision(prefix)
                if known is not None:  # a re-watch: report what changed while we were not watching
                    for event in _diff(known, current):
                        yield event
                known = current
                watch = await self.client.watch_prefix(prefix.encode(), start_revision=revision + 1)
                try:
                    async for raw in watch:
                        key = raw.kv.key.decode()
                        if raw.kind == "PUT":
                            known[key] = bytes(raw.kv.value)
                            yield StoreEvent("put", key, bytes(raw.kv.value))
                        else:
                            known.pop(key, None)
                            yield StoreEvent("delete", key, b"")
                finally:
                    await watch.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - etcd restarts: keep watching
                log.warning("watch_broken", prefix=prefix, error=str(error))
                await asyncio.sleep(RETRY_S)

    async def close(self) -> None:
        await self.client.close()


def _diff(before: dict[str, bytes], after: dict[str, bytes]) -> list[StoreEvent]:
    events = [StoreEvent("delete", key, b"") for key in before if key not in after]
    events += [StoreEvent("put", key, value) for key, value in after.items() if before.get(key) != value]
    return events
