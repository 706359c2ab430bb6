"""Dump and restore over real tables: round trips, other sizes, expiry, newer sessions, damage,
writers during the dump, and the dumping process SIGKILLed at random points."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
import zlib
from pathlib import Path

import pytest

from django_shmsession import faults, snapshot, snapshot_files, snapshot_ops
from django_shmsession.exceptions import CorruptSnapshot, ForeignSnapshot, SnapshotError
from django_shmsession.snapshot import SnapshotRecord, SnapshotWriter
from django_shmsession.table import SessionTable

from ..table.helpers import FakeClock
from .conftest import TableFactory

MAX = 65536  # the table's default max_value_size


def fill(
    table: SessionTable, n: int, sizes: list[int], now: float, seed: int = 0
) -> dict[str, tuple[bytes, float, int]]:
    """``n`` sessions, values cycling through ``sizes``; returns key -> (value, expiry, prio)."""
    rng = random.Random(seed)
    made: dict[str, tuple[bytes, float, int]] = {}
    for i in range(n):
        key = f"{seed:04d}{i:028d}"
        made[key] = (rng.randbytes(sizes[i % len(sizes)]), now + 3600 + rng.randrange(10**6), i % 4)
    items = list(made.items())
    for start in range(0, n, 256):
        table.batch(add_all, table, items[start : start + 256])
    return made


def add_all(table: SessionTable, items: list[tuple[str, tuple[bytes, float, int]]]) -> None:
    for key, (value, expires, priority) in items:
        assert table.add(key, value, expires, priority)


def contents(table: SessionTable) -> dict[str, tuple[bytes, float, int]]:
    found: dict[str, tuple[bytes, float, int]] = {}
    cursor = 0
    while True:
        items, cursor = table.scan(cursor)
        for item in items:
            found[item.key] = (item.value, item.expires_at, item.priority)
        if cursor == 0:
            return found


@pytest.mark.parametrize("n", [0, 1, 1000])
def test_round_trip(make_table: TableFactory, clock: FakeClock, tmp_path: Path, n: int) -> None:
    source = make_table(4 << 20)
    made = fill(source, n, [50, 300, 700], clock())
    path = str(tmp_path / "s.snap")
    dumped = snapshot_ops.dump(source, path, clock=clock)
    assert dumped.sessions == n
    assert dumped.bytes == os.path.getsize(path)
    assert dumped.longest_hold > 0
    target = make_table(4 << 20)
    restored = snapshot_ops.restore(target, path, clock=clock)
    assert restored.restored == restored.records == n
    assert not restored.damaged
    assert contents(target) == made
    assert target.check().ok


def test_round_trip_100k_sessions_from_50_bytes_to_the_maximum(
    make_table: TableFactory, clock: FakeClock, tmp_path: Path
) -> None:
    """Values are derived from their keys, so the test keeps digests, not 70 MB of values (a big
    heap makes every later fork of the test process slower)."""
    sizes = [50, 120, 300, 511, 512, 513, 900, 2000] * 100 + [4096, 16384, MAX]
    source = make_table(160 << 20)
    expected: dict[str, tuple[bytes, float, int]] = {}
    now = clock()
    for start in range(0, 100_000, 256):
        batch = []
        for i in range(start, min(start + 256, 100_000)):
            key = f"big{i:029d}"
            value = derived(key, sizes[i % len(sizes)])
            batch.append((key, (value, now + 3600 + i, i % 4)))
            expected[key] = (digest(value), now + 3600 + i, i % 4)
        source.batch(add_all, source, batch)
    assert {sizes[i % len(sizes)] for i in range(100_000)} >= {50, 512, MAX}
    path = str(tmp_path / "s.snap")
    dumped = snapshot_ops.dump(source, path, clock=clock)
    assert dumped.sessions == 100_000
    target = make_table(160 << 20)
    restored = snapshot_ops.restore(target, path, clock=clock)
    assert restored.restored == 100_000
    found: dict[str, tuple[bytes, float, int]] = {}
    cursor = 0
    while True:
        items, cursor = target.scan(cursor)
        for item in items:
            found[item.key] = (digest(item.value), item.expires_at, item.priority)
        if cursor == 0:
            break
    assert found == expected


def derived(key: str, size: int) -> bytes:
    return (key.encode() * (size // len(key) + 1))[:size]


def digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=16).digest()


def test_restore_into_a_smaller_table_keeps_the_sessions_that_expire_last(
    make_table: TableFactory, clock: FakeClock, tmp_path: Path
) -> None:
    source = make_table(8 << 20)
    made = fill(source, 5000, [300], clock())
    path = str(tmp_path / "s.snap")
    snapshot_ops.dump(source, path, clock=clock)
    small = make_table(1 << 20)
    result = snapshot_ops.restore(small, path, clock=clock)
    kept = contents(small)
    assert 0 < len(kept) < 5000
    assert result.restored == len(kept)
    assert result.did_not_fit == 5000 - len(kept)
    assert "did not fit" in result.summary()
    lowest_kept = min(expires for _v, expires, _p in kept.values())
    dropped = [expires for key, (_v, expires, _p) in made.items() if key not in kept]
    assert max(dropped) <= lowest_kept
    assert all(made[key] == value for key, value in kept.items())
    assert small.stats().evictions == 0
    assert small.check().ok


def test_restore_into_a_larger_table(
    make_table: TableFactory, clock: FakeClock, tmp_path: Path
) -> None:
    source = make_table(1 << 20)
    made = fill(source, 800, [300, 600], clock())
    path = str(tmp_path / "s.snap")
    snapshot_ops.dump(source, path, clock=clock)
    target = make_table(16 << 20)
    assert snapshot_ops.restore(target, path, clock=clock).restored == 800
    assert contents(target) == made


def test_expired_sessions_are_skipped(
    make_table: TableFactory, clock: FakeClock, tmp_path: Path
) -> None:
    source = make_table()
    now = clock()
    for i in range(100):
        source.add(f"key{i:05d}", b"v" * 10, now + 10 + i)  # key i expires at now+10+i
    path = str(tmp_path / "s.snap")
    snapshot_ops.dump(source, path, clock=clock)
    clock.advance(60)  # keys 0..50 expire (now+10+i <= now+60)
    target = make_table()
    result = snapshot_ops.restore(target, path, clock=clock)
    assert result.expired == 51
    assert result.restored == 49
    assert sorted(contents(target)) == [f"key{i:05d}" for i in range(51, 100)]


def test_newer_sessions_in_the_table_are_kept(
    make_table: TableFactory, clock: FakeClock, tmp_path: Path
) -> None:
    source = make_table()
    made = fill(source, 50, [100], clock())
    path = str(tmp_path / "s.snap")
    snapshot_ops.dump(source, path, clock=clock)
    target = make_table()
    newer = sorted(made)[:10]
    for key in newer:
        target.set(key, b"written after the dump", clock() + 5)
    result = snapshot_ops.restore(target, path, clock=clock)
    assert result.kept_newer == 10
    assert result.restored == 40
    found = contents(target)
    assert all(found[key][0] == b"written after the dump" for key in newer)
    assert all(found[key] == made[key] for key in made if key not in newer)


def test_a_second_restore_changes_nothing(
    make_table: TableFactory, clock: FakeClock, tmp_path: Path
) -> None:
    source = make_table()
    fill(source, 30, [100], clock())
    path = str(tmp_path / "s.snap")
    snapshot_ops.dump(source, path, clock=clock)
    target = make_table()
    snapshot_ops.restore(target, path, clock=clock)
    again = snapshot_ops.restore(target, path, clock=clock)
    assert (again.restored, again.kept_newer) == (0, 30)


def test_restore_into_a_table_with_a_smaller_session_limit(
    make_table: TableFactory, clock: FakeClock, tmp_path: Path
) -> None:
    source = make_table(4 << 20)
    fill(source, 20, [100, 5000], clock())
    path = str(tmp_path / "s.snap")
    snapshot_ops.dump(source, path, clock=clock)
    target = make_table(4 << 20, max_value_size=4096)
    result = snapshot_ops.restore(target, path, clock=clock)
    assert (result.restored, result.too_large) == (10, 10)


def write_snapshot(path: Path, records: list[SnapshotRecord]) -> None:
    with open(path, "wb") as handle:
        writer = SnapshotWriter(handle, {"created_at": 1.0})
        writer.write_block(records)
        writer.finish(0.0, 1.0)


def test_duplicate_keys_keep_the_copy_that_expires_last(
    make_table: TableFactory, clock: FakeClock, tmp_path: Path
) -> None:
    now = clock()
    path = tmp_path / "dup.snap"
    write_snapshot(
        path,
        [
            SnapshotRecord("a" * 32, b"old", now + 100),
            SnapshotRecord("b" * 32, b"only", now + 50),
            SnapshotRecord("a" * 32, b"new", now + 200, flags=snapshot.F_SUPERSEDES),
            SnapshotRecord("c" * 32, b"newer first", now + 300),
            SnapshotRecord("c" * 32, b"older later", now + 30, flags=snapshot.F_SUPERSEDES),
        ],
    )
    target = make_table()
    result = snapshot_ops.restore(target, str(path), clock=clock)
    assert (result.restored, result.superseded, result.kept_newer) == (3, 2, 0)
    assert target.get("a" * 32) == b"new"
    assert target.get("c" * 32) == b"newer first"


def test_priority_survives(make_table: TableFactory, clock: FakeClock, tmp_path: Path) -> None:
    source = make_table()
    made = fill(source, 40, [64], clock())
    path = str(tmp_path / "s.snap")
    snapshot_ops.dump(source, path, clock=clock)
    target = make_table()
    snapshot_ops.restore(target, path, clock=clock)
    assert {k: p for k, (_v, _e, p) in contents(target).items()} == {
        k: p for k, (_v, _e, p) in made.items()
    }
    assert {p for _v, _e, p in made.values()} == {0, 1, 2, 3}


# -- damaged snapshots ----------------------------------------------------------------------------


def dumped(
    make_table: TableFactory, clock: FakeClock, tmp_path: Path, n: int = 600
) -> tuple[str, dict[str, tuple[bytes, float, int]]]:
    source = make_table(4 << 20)
    made = fill(source, n, [200], clock())
    path = str(tmp_path / "s.snap")
    snapshot_ops.dump(source, path, clock=clock)
    return path, made


def test_bit_flips_restore_what_verifies_and_count_the_rest(
    make_table: TableFactory, clock: FakeClock, tmp_path: Path
) -> None:
    path, made = dumped(make_table, clock, tmp_path)
    data = bytearray(Path(path).read_bytes())
    rng = random.Random(4)
    for _ in range(5):
        data[rng.randrange(200, len(data) - 100)] ^= 1 << rng.randrange(8)
    Path(path).write_bytes(bytes(data))
    target = make_table(4 << 20)
    result = snapshot_ops.restore(target, path, clock=clock)
    assert result.damaged
    assert 0 < result.unreadable <= 5 * 256  # at worst, each flip cost the rest of a block
    assert result.restored + result.unreadable == 600
    found = contents(target)
    assert all(made[key] == value for key, value in found.items())  # only true records
    with pytest.raises(CorruptSnapshot, match=rf"{result.restored} session\(s\) that verified"):
        result.raise_if_damaged()


def test_truncated_snapshot_restores_its_complete_blocks(
    make_table: TableFactory, clock: FakeClock, tmp_path: Path
) -> None:
    path, made = dumped(make_table, clock, tmp_path)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    target = make_table(4 << 20)
    result = snapshot_ops.restore(target, path, clock=clock)
    assert result.damage.truncated
    assert 0 < result.restored < 600
    assert result.unreadable >= 1
    with pytest.raises(CorruptSnapshot, match="truncated"):
        result.raise_if_damaged()
    assert all(made[key] == value for key, value in contents(target).items())


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (b"", CorruptSnapshot, "is empty"),
        (b"SQLite format 3\x00" + bytes(100), ForeignSnapshot, "not a django-shmsession"),
        (snapshot.MAGIC + b"\x01", CorruptSnapshot, "truncated"),
    ],
)
def test_refused_files_restore_nothing(
    make_table: TableFactory,
    tmp_path: Path,
    content: bytes,
    error: type[Exception],
    message: str,
) -> None:
    path = tmp_path / "bad.snap"
    path.write_bytes(content)
    target = make_table()
    with pytest.raises(error, match=message):
        snapshot_ops.restore(target, str(path))
    assert target.stats().entries == 0


def test_missing_snapshot(make_table: TableFactory, tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="does not exist"):
        snapshot_ops.restore(make_table(), str(tmp_path / "none.snap"))


def test_state_is_recorded(make_table: TableFactory, clock: FakeClock, tmp_path: Path) -> None:
    path, _made = dumped(make_table, clock, tmp_path, n=10)
    snapshot_ops.restore(make_table(4 << 20), path, clock=clock)
    runs = snapshot_ops.last_runs(path)
    assert runs["snapshot_path"] == path
    assert runs["last_dump_sessions"] == 10
    assert runs["last_dump_bytes"] == os.path.getsize(path)
    assert runs["last_restore_sessions"] == 10
    assert runs["last_dump_at"] == runs["last_restore_at"] == clock()
    assert runs["last_restore_duration"] > 0
    assert snapshot_ops.last_runs(None)["last_dump_at"] is None


# -- dumps under concurrent writes, and killed dumps -----------------------------------------------


def versioned(key: str, version: int, size: int) -> bytes:
    """A value that proves itself whole: its CRC is in its first 4 bytes."""
    body = (f"{key}:{version}:".encode() * (size // 40 + 1))[: size - 4]
    return zlib.crc32(body).to_bytes(4, "little") + body


def whole(value: bytes) -> bool:
    return zlib.crc32(value[4:]).to_bytes(4, "little") == value[:4]


@pytest.mark.multiprocess
def test_dump_during_writes_has_no_torn_value(tmp_path: Path, make_table: TableFactory) -> None:
    table = make_table(8 << 20, clock=time.time)
    keys = [f"key{i:029d}" for i in range(3000)]
    expires = time.time() + 3600
    for key in keys:
        table.set(key, versioned(key, 0, 700), expires)
    pid = os.fork()
    if pid == 0:  # a writer updating, deleting and re-creating keys all the time
        code = 1
        try:
            writer = SessionTable(table.name, max_value_size=65536)
            rng = random.Random(1)
            version = 0
            while True:
                version += 1
                key = rng.choice(keys)
                if version % 7 == 0:
                    writer.delete(key)
                    writer.add(key, versioned(key, version, 1200), expires)
                else:
                    writer.set(key, versioned(key, version, rng.choice([300, 700, 1500])), expires)
        finally:
            os._exit(code)
    try:
        time.sleep(0.05)
        for round_ in range(3):
            path = str(tmp_path / f"s{round_}.snap")
            result = snapshot_ops.dump(table, path)
            records = list(snapshot_ops.iter_records(path))
            assert result.sessions == len(records)
            assert all(whole(r.value) for r in records)
            assert {r.key for r in records} <= set(keys)
            assert len({r.key for r in records}) >= 2900  # a few may be mid-delete
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert table.check().ok


def dump_in_child(table_name: str, path: str, point: str | None, delay: float | None) -> int:
    """Fork a process that dumps ``table_name`` to ``path``; it SIGKILLs itself at ``point`` or
    is killed by the parent after ``delay`` seconds. Returns its wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            if point is not None:
                faults.set_fault_hook(
                    lambda at: os.kill(os.getpid(), signal.SIGKILL) if at == point else None
                )
            with SessionTable(table_name) as table:
                snapshot_ops.dump(table, path, batch_size=64)
        finally:
            os._exit(0)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def snapshot_keys(path: str) -> set[str]:
    return {record.key for record in snapshot_ops.iter_records(path)}


@pytest.mark.multiprocess
@pytest.mark.parametrize("point", snapshot_files.FAULT_POINTS)
def test_dump_killed_at_each_step(
    make_table: TableFactory, clock: FakeClock, tmp_path: Path, point: str
) -> None:
    table = make_table(4 << 20, clock=time.time)
    old = fill(table, 500, [300], time.time(), seed=1)
    path = str(tmp_path / "s.snap")
    snapshot_ops.dump(table, path)
    new = fill(table, 500, [300], time.time(), seed=2)
    status = dump_in_child(table.name, path, point, None)
    assert os.WIFSIGNALED(status), point
    expected = set(old) | set(new) if point == "dump:after-rename" else set(old)
    assert snapshot_keys(path) == expected
    reader_ok = snapshot_ops.restore(make_table(4 << 20, clock=time.time), path)
    assert not reader_ok.damaged
    assert reader_ok.restored == len(expected)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_dump_killed_at_random_instants_leaves_the_previous_snapshot_intact(
    make_table: TableFactory, tmp_path: Path
) -> None:
    """25 dumps SIGKILLed at random instants: the file is always the old snapshot or the new
    one, each complete and verifying; killed dumps' temporary files go at the next dump."""
    table = make_table(32 << 20, clock=time.time)
    old = set(fill(table, 20_000, [300, 900], time.time(), seed=1))
    path = str(tmp_path / "s.snap")
    full = snapshot_ops.dump(table, path)
    reference = Path(path).read_bytes()
    everything = old | set(fill(table, 5000, [300], time.time(), seed=2))
    rng = random.Random(9)
    killed_mid_dump = completed = 0
    for _ in range(25):
        status = dump_in_child(table.name, path, None, rng.uniform(0, 1.3 * full.duration))
        keys = snapshot_keys(path)
        with snapshot_files.read_buffer(path) as (buf, name):
            reader = snapshot.SnapshotReader(buf, name)
            assert sum(1 for _ in reader.refs()) == len(keys)
            assert reader.damage.ok
        if keys == old:
            assert os.WIFSIGNALED(status)
            killed_mid_dump += 1
        else:
            assert keys == everything
            completed += 1
            Path(path).write_bytes(reference)  # start the next round from the old snapshot
    assert killed_mid_dump >= 10, (killed_mid_dump, completed)
    snapshot_ops.dump(table, path)
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []
    assert snapshot_keys(path) == everything


def test_a_priority_this_table_lacks_becomes_its_highest(
    make_table: TableFactory, clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "prio.snap"
    write_snapshot(path, [SnapshotRecord("p" * 32, b"v", clock() + 100, priority=200)])
    target = make_table()
    assert snapshot_ops.restore(target, str(path), clock=clock).restored == 1
    assert contents(target)["p" * 32][2] == 3
