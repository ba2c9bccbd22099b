"""One etcd member on loopback with its own data dir, started and stopped by PID (the tests' `etcd`
fixture and `lego chaos` use it). `stop()` then `start()` keeps the data dir: an etcd restart."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 20.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
FIRST_START_ATTEMPTS = 3  # a port picked free can be taken by another process before etcd binds it


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdNotInstalled(RuntimeError):
    pass


class EtcdProcess:
    """One etcd member on loopback; `stop()`/`start()` keep the data dir (an etcd restart)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / "etcd.log"
        self._served = False  # once it has, its URL is known to clients: a restart keeps the ports

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        binary = shutil.which("etcd")
        if binary is None:
            raise EtcdNotInstalled("etcd is not installed: run `bash scripts/ensure-etcd` (make test does)")
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            binary,
            "--name",
            "test",
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"test={peer}",
        ]

    def start(self) -> None:
        for _ in range(1 if self._served else FIRST_START_ATTEMPTS):
            logged = self.log.stat().st_size if self.log.exists() else 0
            if self._launch():
                self._served = True
                return
            if self._served or b"address already in use" not in self.log.read_bytes()[logged:]:
                break
            self.client_port, self.peer_port = free_port(), free_port()
        raise RuntimeError(f"etcd did not start; see {self.log}")

    def _launch(self) -> bool:
        command = self.command()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self._healthy():
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def _healthy(self) -> bool:
        """etcd's own /health answers: a mere TCP connect could reach whatever else holds the port."""
        url = f"http://127.0.0.1:{self.client_port}/health"
        try:
            with _DIRECT.open(url, timeout=0.5) as reply:
                return bool(json.loads(reply.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
