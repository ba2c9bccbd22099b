"""The etcd store against a real etcd process: leases, watches, and surviving an etcd restart."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from lego.errors import StoreUnavailable
from lego.etcd_store import EtcdStore
from lego.store import StoreEvent, open_store

from tests.conftest import EtcdProcess, free_port


async def test_put_get_prefix_delete(etcd: EtcdProcess) -> None:
    store = await open_store(etcd.url)
    try:
        await store.put("/lego/t/a", b"1")
        await store.put("/lego/t/b", b"2")
        assert await store.get("/lego/t/a") == b"1"
        assert await store.get("/lego/t/missing") is None
        assert await store.get_prefix("/lego/t/") == {"/lego/t/a": b"1", "/lego/t/b": b"2"}
        assert await store.delete("/lego/t/a") is True
        assert await store.get_prefix("/lego/t/") == {"/lego/t/b": b"2"}
    finally:
        await store.close()


async def test_registration_is_kept_alive_and_removed_on_close(etcd: EtcdProcess) -> None:
    store = await open_store(etcd.url)
    try:
        registration = await store.register("/lego/workers/w1", b"info", ttl_s=2)
        await asyncio.sleep(3.0)  # longer than the TTL: only the keep-alive keeps it there
        assert await store.get("/lego/workers/w1") == b"info"
        await registration.close()
        assert await store.get("/lego/workers/w1") is None
    finally:
        await store.close()


async def test_registration_of_a_dead_owner_expires(etcd: EtcdProcess) -> None:
    owner = await EtcdStore.connect("127.0.0.1", etcd.client_port)
    observer = await open_store(etcd.url)
    try:
        registration = await owner.register("/lego/workers/dies", b"x", ttl_s=2)
        registration._task.cancel()  # type: ignore[attr-defined]  # the owner stops refreshing (dies)
        await asyncio.sleep(3.5)
        assert await observer.get("/lego/workers/dies") is None
    finally:
        await owner.close()
        await observer.close()


async def _collect(store, prefix: str, count: int, into: list[StoreEvent]) -> None:
    async for event in store.watch_prefix(prefix):
        into.append(event)
        if len(into) >= count:
            return


async def test_watch_sees_changes_and_survives_an_etcd_restart(etcd: EtcdProcess) -> None:
    writer = await open_store(etcd.url)
    watcher_store = await open_store(etcd.url)
    events: list[StoreEvent] = []
    watcher = asyncio.create_task(_collect(watcher_store, "/lego/w/", 3, events))
    try:
        await asyncio.sleep(0.3)
        await writer.put("/lego/w/before", b"1")
        await asyncio.sleep(0.3)
        etcd.stop()
        await asyncio.sleep(1.0)
        etcd.start()
        # changes made after the restart reach the watcher through its re-watch loop
        for _ in range(150):  # up to 30 s: a loaded machine restarts etcd slowly
            try:
                await writer.put("/lego/w/after", b"2")
                await writer.delete("/lego/w/before")
                break
            except Exception:  # noqa: BLE001 - the client reconnects; retry
                await asyncio.sleep(0.2)
        await asyncio.wait_for(watcher, 60)
    finally:
        watcher.cancel()
        await writer.close()
        await watcher_store.close()
    assert events[0] == StoreEvent("put", "/lego/w/before", b"1")
    assert StoreEvent("put", "/lego/w/after", b"2") in events
    assert StoreEvent("delete", "/lego/w/before", b"") in events


async def test_unreachable_etcd_is_a_clear_error() -> None:
    port = free_port()
    with pytest.raises(StoreUnavailable, match=f"cannot reach etcd at 127.0.0.1:{port}"):
        await EtcdStore.connect("127.0.0.1", port, timeout_s=1.0)


def test_etcd_starts_on_other_ports_when_a_picked_one_was_taken_meanwhile(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EtcdProcess(tmp_path / "etcd-data")
        server.client_port = taken.getsockname()[1]  # as if another process had bound it first
        server.start()
        try:
            assert server.client_port != taken.getsockname()[1]
            assert b"address already in use" in server.log.read_bytes()
        finally:
            server.stop()
