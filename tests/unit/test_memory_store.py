import asyncio

import pytest
from lego.store import MemoryStore, StoreEvent, parse_store_url


async def test_put_get_prefix_delete() -> None:
    store = MemoryStore()
    await store.put("/a/1", b"x")
    await store.put("/a/2", b"y")
    await store.put("/b/1", b"z")
    assert await store.get("/a/1") == b"x"
    assert await store.get_prefix("/a/") == {"/a/1": b"x", "/a/2": b"y"}
    assert await store.delete("/a/1") is True
    assert await store.delete("/a/1") is False
    assert await store.get("/a/1") is None


async def test_watch_sees_puts_and_deletes_and_registrations_vanish_on_close() -> None:
    store = MemoryStore()
    events: list[StoreEvent] = []

    async def watch() -> None:
        async for event in store.watch_prefix("/w/"):
            events.append(event)
            if len(events) == 2:
                return

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)
    registration = await store.register("/w/worker-1", b"info", ttl_s=5)
    await store.put("/other", b"ignored")
    await registration.close()
    await asyncio.wait_for(watcher, 2)
    assert events == [StoreEvent("put", "/w/worker-1", b"info"), StoreEvent("delete", "/w/worker-1", b"")]


def test_store_urls() -> None:
    assert parse_store_url("memory") == ("memory", "", 0)
    assert parse_store_url("etcd://127.0.0.1:2379") == ("etcd", "127.0.0.1", 2379)
    with pytest.raises(ValueError, match="etcd://HOST:PORT"):
        parse_store_url("redis://x")
