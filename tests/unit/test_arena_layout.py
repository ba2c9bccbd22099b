from pathlib import Path

from lego import arena_layout


def test_publish_lookup_retract_and_token_check(tmp_path: Path) -> None:
    path = tmp_path / "arena"
    buffer = arena_layout.create(path, 4096, b"t" * 16)
    client = arena_layout.attach(str(path), b"t" * 16)
    assert client is not None
    assert arena_layout.attach(str(path), b"x" * 16) is None  # another engine's segment
    assert arena_layout.attach(str(tmp_path / "absent"), b"t" * 16) is None

    arena_layout.publish(buffer, "r/n/out", 128, 40)
    assert arena_layout.lookup(client, "r/n/out") == (arena_layout.DATA_START + 128, 40)
    assert arena_layout.lookup(client, "r/n/other") is None
    arena_layout.retract(buffer, "r/n/other")  # not in its slot: leaves "r/n/out" alone
    assert arena_layout.lookup(client, "r/n/out") is not None
    arena_layout.retract(buffer, "r/n/out")
    assert arena_layout.lookup(client, "r/n/out") is None


def test_long_ids_are_not_indexed_and_half_written_slots_are_ignored(tmp_path: Path) -> None:
    buffer = arena_layout.create(tmp_path / "arena", 4096, b"t" * 16)
    long_id = "r/" + "n" * arena_layout.MAX_INDEXED_ID
    arena_layout.publish(buffer, long_id, 0, 8)
    assert arena_layout.lookup(buffer, long_id) is None
    arena_layout.publish(buffer, "r/n/out", 0, 8)
    pos = arena_layout._slot(b"r/n/out")
    buffer[pos] += 1  # odd sequence number: the engine is writing this slot
    assert arena_layout.lookup(buffer, "r/n/out") is None
