"""Snapshot files: atomic replacement, mode 0600, leftovers of killed writers, the state sidecar."""

from __future__ import annotations

import io
import logging
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from django_shmsession import faults, snapshot_files
from django_shmsession.exceptions import SnapshotError
from django_shmsession.snapshot import SnapshotReader, SnapshotRecord, SnapshotWriter
from django_shmsession.snapshot_files import AtomicFile, read_buffer

from .test_format import make_records


def write_file(path: Path, records: list[SnapshotRecord]) -> None:
    with AtomicFile(str(path)) as target:
        writer = SnapshotWriter(target.stream, {"created_at": 1.0})
        writer.write_block(records)
        writer.finish(0.0, 2.0)
        target.commit()


def load(path: Path) -> list[SnapshotRecord]:
    with read_buffer(str(path)) as (buf, name):
        reader = SnapshotReader(buf, name)
        found = [reader.record(ref) for ref in reader.refs()]
        assert reader.damage.ok, reader.damage.problems
    return [r for r in found if r is not None]


def temp_files(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path.parent) if n.startswith(f".{path.name}.tmp-"))


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077, 0o277])
def test_created_mode_0600_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    os.umask(mask)
    path = tmp_path / "s.snap"
    write_file(path, make_records(3))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load(path) == make_records(3)


def test_commit_replaces_the_old_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "s.snap"
    write_file(path, make_records(3, seed=1))
    write_file(path, make_records(5, seed=2))
    assert load(path) == make_records(5, seed=2)
    assert temp_files(path) == []


def test_failure_before_commit_keeps_the_old_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "s.snap"
    write_file(path, make_records(3))

    def interrupted_dump() -> None:
        with AtomicFile(str(path)) as target:
            target.stream.write(b"half a snapshot")
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError):
        interrupted_dump()
    assert load(path) == make_records(3)
    assert temp_files(path) == []


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match=r"directory .*missing.* does not exist; create it"):
        AtomicFile(str(tmp_path / "missing" / "s.snap"))


def test_unwritable_directory_is_a_clear_error() -> None:
    """/sys refuses new files even to root (the suite may run as root, which ignores modes)."""
    with pytest.raises(SnapshotError, match="no permission to create files in /sys"):
        AtomicFile("/sys/s.snap")


def test_a_directory_is_not_a_snapshot_path(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="is a directory"):
        AtomicFile(str(tmp_path))


def test_leftover_of_a_dead_writer_is_removed_a_live_ones_is_not(tmp_path: Path) -> None:
    path = tmp_path / "s.snap"
    pid = os.fork()
    if pid == 0:  # a dumper killed before its rename
        try:
            target = AtomicFile(str(path))
            target.stream.write(b"x" * 1000)
            target.stream.flush()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert len(temp_files(path)) == 1
    with AtomicFile(str(path)) as live:  # removes the dead writer's file, keeps its own
        assert temp_files(path) == [os.path.basename(live.temp)]
        with AtomicFile(str(path)) as other:  # a second live writer leaves the first alone
            assert sorted(temp_files(path)) == sorted(
                os.path.basename(t) for t in (live.temp, other.temp)
            )
    assert temp_files(path) == []


@pytest.mark.multiprocess
@pytest.mark.parametrize("point", snapshot_files.FAULT_POINTS)
def test_sigkill_at_each_step_leaves_a_complete_snapshot(tmp_path: Path, point: str) -> None:
    """Old snapshot intact before the rename, new one complete after it: never half of one."""
    path = tmp_path / "s.snap"
    old, new = make_records(50, seed=1), make_records(80, seed=2)
    write_file(path, old)
    pid = os.fork()
    if pid == 0:
        try:
            faults.set_fault_hook(
                lambda at: os.kill(os.getpid(), signal.SIGKILL) if at == point else None
            )
            write_file(path, new)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    if point == "dump:after-block":  # not a point of write_file (dump_to_stream's)
        assert os.WIFEXITED(status)
        assert load(path) == new
        return
    assert os.WIFSIGNALED(status)
    assert load(path) == (new if point == "dump:after-rename" else old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_file(path, new)  # the next dump cleans up after the killed one
    assert temp_files(path) == []


def test_reading_missing_or_odd_files(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="does not exist"), read_buffer(str(tmp_path / "no")):
        pass
    with pytest.raises(SnapshotError, match="not a regular file"), read_buffer(str(tmp_path)):
        pass


def test_a_snapshot_readable_by_others_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.snap"
    write_file(path, make_records(2))
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, "django_shmsession"), read_buffer(str(path)):
        pass
    assert "readable by other users (mode 644)" in caplog.text
    assert "chmod 600" in caplog.text


def test_empty_file_reads_as_empty_buffer(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with read_buffer(str(path)) as (buf, _name):
        assert len(buf) == 0


def test_stdin_is_spooled(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.BytesIO()
    writer = SnapshotWriter(out, {})
    writer.write_block(make_records(4))
    writer.finish(0.0, 0.0)

    class Stdin:
        buffer = io.BytesIO(out.getvalue())

    monkeypatch.setattr("sys.stdin", Stdin)
    with read_buffer("-") as (buf, name):
        assert name == "the snapshot on stdin"
        assert bytes(buf) == out.getvalue()


def test_state_sidecar(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "s.snap")
    assert snapshot_files.read_state(path) == {}
    snapshot_files.record_state(path, "last_dump", {"sessions": 3})
    snapshot_files.record_state(path, "last_restore", {"sessions": 2})
    assert snapshot_files.read_state(path) == {
        "last_dump": {"sessions": 3},
        "last_restore": {"sessions": 2},
    }
    sidecar = Path(snapshot_files.state_path(path))
    assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600
    sidecar.write_text("{not json")
    with caplog.at_level(logging.WARNING, "django_shmsession"):
        assert snapshot_files.read_state(path) == {}
    assert "cannot read" in caplog.text
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


def test_state_sidecar_failure_is_only_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "django_shmsession"):
        snapshot_files.record_state(str(tmp_path / "gone" / "s.snap"), "last_dump", {})
    assert "cannot record the last_dump" in caplog.text
