"""What the fault tests share: requests in flight on threads (each ends with an image, an explicit
error, or is reported as hung), and a cluster of real processes on the test's etcd."""

from __future__ import annotations

import threading
import time
from typing import IO, Any

from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego.client import GatewayClient, GeneratedImage, LegoError
from lego_cli.cluster import ProcessCluster

from tests.conftest import EtcdProcess

EMULATED = ("--backend", "emulated", "--time-scale", "20")  # a 200-step request (the limit) runs 2-4 s


def start_cluster(etcd: EtcdProcess, log: IO[Any], **kwargs: Any) -> ProcessCluster:
    return ProcessCluster(etcd.url, log_file=log, worker_args=EMULATED, **kwargs).start()


def nodes_of(steps: int) -> int:
    """Nodes a CFG tiny-sd15 request runs: 3 per denoise iteration (PNDM runs steps + 1) and 4 more."""
    return 3 * (steps + 1) + 4


class InFlight:
    """One blocking generate on a thread, with our own request id, so the test can inject a fault."""

    def __init__(self, gateway: str, request_id: str, steps: int, timeout_s: float = 120.0) -> None:
        self.request_id = request_id
        self.steps = steps
        self.image: GeneratedImage | None = None
        self.error: LegoError | None = None
        self.unexpected: BaseException | None = None
        self.answered_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(gateway, timeout_s), daemon=True)
        self._thread.start()

    def _run(self, gateway: str, timeout_s: float) -> None:
        inputs: dict[str, str | int | float | bool] = {"prompt": self.request_id, "steps": self.steps}
        try:
            with GatewayClient(gateway, timeout_s=timeout_s) as client:
                self.image = client.generate(TINY_SD15_TXT2IMG, inputs, request_id=self.request_id)
        except LegoError as error:
            self.error = error
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.unexpected = error
        self.answered_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout_s: float) -> InFlight:
        """Joined: it ended with an image or an explicit error within `timeout_s`."""
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"{self.request_id} got no answer within {timeout_s}s"
        assert self.unexpected is None, self.unexpected
        assert (self.image is None) != (self.error is None), (self.image, self.error)
        if self.image is not None:
            assert self.image.request_id == self.request_id
            assert self.image.nodes_executed == nodes_of(self.steps)
        return self


def serve_again(gateway: str, within_s: float, steps: int = 4) -> tuple[float, int]:
    """Send requests until one is answered with an image: (seconds it took, explicit errors before)."""
    started = time.monotonic()
    errors = 0
    with GatewayClient(gateway, timeout_s=within_s) as client:
        while True:
            try:
                reply = client.generate(TINY_SD15_TXT2IMG, {"prompt": "after the fault", "steps": steps})
                assert reply.png and reply.nodes_executed == nodes_of(steps)
                return time.monotonic() - started, errors
            except LegoError:
                errors += 1
                assert time.monotonic() - started < within_s, "the cluster did not serve again"
                time.sleep(0.5)


def wait_until(condition: Any, within_s: float, what: str) -> float:
    """Poll `condition()` until it is true: the seconds that took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within_s, f"not within {within_s}s: {what}"
        time.sleep(0.1)
    return time.monotonic() - started
