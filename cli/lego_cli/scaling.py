"""`lego scale-workers N`: grow or shrink a running local process cluster (`lego up --store etcd://…`).

The cluster store holds the desired count (`/lego/config/workers`); `lego up` polls it, spawns new
worker processes, or sends SIGTERM to the newest ones, which drain (no new work, finish what they
hold, unload, leave the store) and exit. This command sets the key and waits until exactly N workers
are registered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from lego import keys
from lego.store import ClusterStore, open_store

POLL_S = 0.25


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("count", type=int, help="the number of workers to run")
    parser.add_argument("--store", default="etcd://127.0.0.1:2379", help="the cluster's etcd://HOST:PORT")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="how long to wait (0: do not wait)")


async def registered_workers(store: ClusterStore) -> list[str]:
    return sorted(key.removeprefix(keys.WORKERS) for key in await store.get_prefix(keys.WORKERS))


async def scale(store_url: str, count: int, timeout_s: float) -> list[str]:
    """Set the desired count; return the workers registered once there are exactly `count`."""
    if count < 0:
        raise ValueError(f"count must be ≥ 0, got {count}")
    store = await open_store(store_url)
    try:
        await store.put(keys.DESIRED_WORKERS, str(count).encode())
        deadline = time.monotonic() + timeout_s
        while True:
            workers = await registered_workers(store)
            if len(workers) == count or timeout_s <= 0:
                return workers
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(workers)} workers registered, not {count}, after {timeout_s:.0f}s")
            await asyncio.sleep(POLL_S)
    finally:
        await store.close()


def run(args: argparse.Namespace) -> int:
    workers = asyncio.run(scale(args.store, args.count, args.timeout_s))
    print(json.dumps({"workers": len(workers), "ids": workers}), flush=True)
    return 0


class DesiredWorkers:
    """`lego up`'s side: reads the desired count from the store (None: not set)."""

    def __init__(self, store_url: str, initial: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._store = self._loop.run_until_complete(open_store(store_url))
        self._loop.run_until_complete(self._store.put(keys.DESIRED_WORKERS, str(initial).encode()))

    def get(self) -> int | None:
        raw = self._loop.run_until_complete(self._store.get(keys.DESIRED_WORKERS))
        try:
            return max(0, int(raw)) if raw is not None else None
        except ValueError:
            return None

    def close(self) -> None:
        self._loop.run_until_complete(self._store.close())
        self._loop.close()
