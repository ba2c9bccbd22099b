"""Shared fixtures: free loopback ports and a real etcd process with a temporary data dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lego_cli import etcd_process
from lego_cli.etcd_process import EtcdNotInstalled, free_port

__all__ = ["EtcdProcess", "free_port"]


class EtcdProcess(etcd_process.EtcdProcess):
    """One etcd member on loopback; `stop()`/`start()` keep the data dir (an etcd restart)."""

    def start(self) -> None:
        try:
            super().start()
        except EtcdNotInstalled as error:
            pytest.fail(str(error))


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    server = EtcdProcess(tmp_path / "etcd-data")
    server.start()
    try:
        yield server
    finally:
        server.stop()
