"""The engine's shared-memory segment: created once at start, unlinked at stop."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from lego import arena_layout

DEFAULT_DIRECTORY = Path("/dev/shm")


class Arena:
    def __init__(self, data_bytes: int, directory: Path = DEFAULT_DIRECTORY) -> None:
        self.token = secrets.token_bytes(arena_layout.TOKEN_BYTES)
        self.path = directory / f"lego-dataengine-{os.getpid()}-{self.token[:6].hex()}"
        self.data_bytes = data_bytes
        self.buffer = arena_layout.create(self.path, data_bytes, self.token)
        self._memory = memoryview(self.buffer)

    def view(self, offset: int, nbytes: int) -> memoryview:
        """Bytes `[offset, offset + nbytes)` of the data region (no copy)."""
        start = arena_layout.DATA_START + offset
        return self._memory[start : start + nbytes]

    def publish(self, tensor_id: str, offset: int, nbytes: int) -> None:
        arena_layout.publish(self.buffer, tensor_id, offset, nbytes)

    def retract(self, tensor_id: str) -> None:
        arena_layout.retract(self.buffer, tensor_id)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self._memory.release()
        with contextlib.suppress(BufferError):  # a view is still alive here: the mapping goes with it
            self.buffer.close()
