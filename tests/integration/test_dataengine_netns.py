"""Two data engines in two network namespaces joined by a veth pair (private 10.x addresses): a
client in B's namespace writes into A's arena and reads through B, which pulls from A over the veth.
Skipped unless root with `ip` available."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from lego_cli.bench_dataengine import engine_process

CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    from lego.dataplane import DataPlane
    from lego.v1 import common_pb2

    async def main():
        producer, consumer = DataPlane(sys.argv[1]), DataPlane(sys.argv[2])
        array = np.arange(1 << 20, dtype=np.float32)
        handle = await producer.put("r/n/out", array)
        pulled = await consumer.get(handle)
        stats = await consumer._stub.Stats(common_pb2.Empty())
        print(bool(np.array_equal(pulled, array)), stats.bytes_pulled, list(handle.locations))

    asyncio.run(main())
    """
)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str, str, str]]:
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b, subnet = f"lego-a-{tag}", f"lego-b-{tag}", f"10.213.{os.getpid() % 250}"
    try:
        ip("netns", "add", ns_a)
    except subprocess.CalledProcessError as error:
        pytest.skip(f"cannot create network namespaces: {error.stderr.decode().strip()}")
    try:
        ip("netns", "add", ns_b)
        ip("link", "add", f"lva{tag}", "type", "veth", "peer", "name", f"lvb{tag}")
        for ns, end, host in ((ns_a, f"lva{tag}", 1), (ns_b, f"lvb{tag}", 2)):
            ip("link", "set", end, "netns", ns)
            ip("-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", end)
            ip("-n", ns, "link", "set", end, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b, f"{subnet}.1", f"{subnet}.2"
    finally:
        for ns in (ns_a, ns_b):  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_engines_in_two_namespaces_pull_over_the_veth(namespaces: tuple[str, str, str, str]) -> None:
    ns_a, ns_b, host_a, host_b = namespaces
    with (
        engine_process(64, host=host_a, wrapper=["ip", "netns", "exec", ns_a]) as a,
        engine_process(64, host=host_b, wrapper=["ip", "netns", "exec", ns_b]) as b,
    ):
        command = ["ip", "netns", "exec", ns_b, sys.executable, "-c", CLIENT, a, b]
        out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    equal, pulled, locations = out.split(" ", 2)
    assert equal == "True" and int(pulled) == 4 << 20
    assert locations.strip() == repr([a])
