"""The data engine's shared-memory arena as both sides see it: one file in /dev/shm, mapped once.

Layout: a 64-byte header (magic + a random token that proves a client mapped the right segment), then
an index of fixed slots, then the data region the engine's allocator carves.
The index is a direct-mapped cache `tensor id -> (offset, nbytes)` that clients read without a call:
slot = crc32(id) mod SLOTS; a newer tensor may take an older one's slot, and a miss just means "ask
the engine" (the `Locate` RPC). Each slot is guarded by a sequence number (odd while the engine writes
it), so a reader never accepts a half-written slot.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from pathlib import Path

MAGIC = b"LEGOARN1"
TOKEN_BYTES = 16
HEADER_BYTES = 64
SLOTS = 16384
SLOT_BYTES = 128
_SLOT_FIELDS = struct.Struct("<QQQQ")  # seq, offset, nbytes, id length
MAX_INDEXED_ID = SLOT_BYTES - _SLOT_FIELDS.size
INDEX_BYTES = SLOTS * SLOT_BYTES
DATA_START = HEADER_BYTES + INDEX_BYTES  # a multiple of 64: data offsets stay 64-byte aligned


def create(path: Path, data_bytes: int, token: bytes) -> mmap.mmap:
    """A new sparse segment at `path` (pages are allocated on first touch), header written."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, DATA_START + data_bytes)
        buffer = mmap.mmap(fd, DATA_START + data_bytes)
    finally:
        os.close(fd)
    buffer[: len(MAGIC) + TOKEN_BYTES] = MAGIC + token
    return buffer


def attach(path: str, token: bytes) -> mmap.mmap | None:
    """Map an existing segment read-write, or None if it is absent or is not the one with `token`."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        buffer = mmap.mmap(fd, 0)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if buffer[: len(MAGIC) + TOKEN_BYTES] != MAGIC + token:
        buffer.close()
        return None
    return buffer


def _slot(key: bytes) -> int:
    return HEADER_BYTES + (zlib.crc32(key) % SLOTS) * SLOT_BYTES


def publish(buffer: mmap.mmap, tensor_id: str, offset: int, nbytes: int) -> None:
    """Engine side: record where a committed tensor lives (ids longer than a slot are not indexed)."""
    key = tensor_id.encode()
    if len(key) > MAX_INDEXED_ID:
        return
    pos = _slot(key)
    seq = struct.unpack_from("<Q", buffer, pos)[0]
    struct.pack_into("<Q", buffer, pos, seq + 1)
    struct.pack_into("<QQQ", buffer, pos + 8, offset, nbytes, len(key))
    buffer[pos + _SLOT_FIELDS.size : pos + _SLOT_FIELDS.size + len(key)] = key
    struct.pack_into("<Q", buffer, pos, seq + 2)


def retract(buffer: mmap.mmap, tensor_id: str) -> None:
    """Engine side: forget a freed tensor, if its slot still names it."""
    key = tensor_id.encode()
    if len(key) > MAX_INDEXED_ID or lookup(buffer, tensor_id) is None:
        return
    pos = _slot(key)
    seq = struct.unpack_from("<Q", buffer, pos)[0]
    struct.pack_into("<Q", buffer, pos, seq + 1)
    struct.pack_into("<QQQ", buffer, pos + 8, 0, 0, 0)
    struct.pack_into("<Q", buffer, pos, seq + 2)


def lookup(buffer: mmap.mmap, tensor_id: str) -> tuple[int, int] | None:
    """Client side: (absolute offset, nbytes) of a tensor in the index, or None (ask the engine)."""
    key = tensor_id.encode()
    if len(key) > MAX_INDEXED_ID:
        return None
    pos = _slot(key)
    seq, offset, nbytes, length = _SLOT_FIELDS.unpack_from(buffer, pos)
    if seq % 2 or length != len(key):
        return None
    if buffer[pos + _SLOT_FIELDS.size : pos + _SLOT_FIELDS.size + length] != key:
        return None
    if struct.unpack_from("<Q", buffer, pos)[0] != seq:
        return None
    return DATA_START + offset, nbytes
