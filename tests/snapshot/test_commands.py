"""`manage.py shmsession dump|restore [PATH|-]` and the snapshot lines of `stats`."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_shmsession import store
from django_shmsession.backend import SessionStore
from django_shmsession.table import SessionTable

from ..engine import servers


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def make_sessions(n: int) -> dict[str, int]:
    made = {}
    for i in range(n):
        s = SessionStore()
        s["i"] = i
        s.save()
        assert s.session_key is not None
        made[s.session_key] = i
    return made


def logged_in(made: dict[str, int]) -> bool:
    return all(SessionStore(key).get("i") == i for key, i in made.items())


def recreate(name: str) -> None:
    """What a reboot does to the table: it is gone; the next use creates an empty one."""
    store.reset()
    SessionTable.unlink_name(name)


def test_dump_unlink_restore(shm_name: str, tmp_path: Path) -> None:
    made = make_sessions(25)
    path = str(tmp_path / "s.snap")
    out = run("shmsession", "dump", path)
    assert f"Dumped 25 session(s) from '{shm_name}' to {path}" in out
    assert "longest lock hold" in out
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    recreate(shm_name)
    out = run("shmsession", "restore", path)  # creates the table
    assert "Restored 25 of 25 session(s)" in out
    assert logged_in(made)


def test_paths_default_to_the_snapshot_setting(
    settings: Any, shm_name: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "s.snap")
    settings.SHMSESSION = {**settings.SHMSESSION, "SNAPSHOT": {"PATH": path, "INTERVAL": 0}}
    made = make_sessions(3)
    run("shmsession", "dump")
    recreate(shm_name)
    assert "Restored 3 of 3" in run("shmsession", "restore")
    assert logged_in(made)
    stats = json.loads(run("shmsession", "stats", "--json"))
    assert stats["snapshot_path"] == path
    assert stats["last_dump_sessions"] == 3
    assert stats["last_dump_bytes"] == os.path.getsize(path)
    assert stats["last_restore_sessions"] == 3
    assert stats["last_dump_duration"] > 0
    human = run("shmsession", "stats")
    lines = dict(line.split(None, 1) for line in human.splitlines())
    assert lines["last_dump_at"].endswith(" s ago)")
    assert lines["last_restore_sessions"] == "3"
    assert lines["last_dump_duration"].endswith(" s")


def test_stats_without_snapshot_says_never(tmp_path: Path) -> None:
    make_sessions(1)
    lines = dict(line.split(None, 1) for line in run("shmsession", "stats").splitlines())
    assert lines["last_dump_at"] == "never"
    assert lines["snapshot_path"].startswith("(none")
    run("shmsession", "dump", str(tmp_path / "x.snap"))
    out = run("shmsession", "stats", "--snapshot", str(tmp_path / "x.snap"))
    assert dict(line.split(None, 1) for line in out.splitlines())["last_dump_sessions"] == "1"


def test_no_path_and_no_setting_is_an_error() -> None:
    make_sessions(1)
    with pytest.raises(CommandError, match=r"Give the snapshot's PATH"):
        run("shmsession", "dump")
    with pytest.raises(CommandError, match=r"Give the snapshot's PATH"):
        run("shmsession", "restore")


def test_dump_without_a_table_creates_none(shm_name: str, tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="No session table named"):
        run("shmsession", "dump", str(tmp_path / "s.snap"))
    assert not (tmp_path / "s.snap").exists()


def test_dump_into_a_missing_directory(tmp_path: Path) -> None:
    make_sessions(1)
    with pytest.raises(CommandError, match="does not exist; create it"):
        run("shmsession", "dump", str(tmp_path / "no" / "s.snap"))


def test_restore_of_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a snapshot\n")
    with pytest.raises(CommandError, match="not a django-shmsession snapshot"):
        run("shmsession", "restore", str(path))


def test_partial_restore_restores_and_fails(shm_name: str, tmp_path: Path) -> None:
    made = make_sessions(40)
    path = tmp_path / "s.snap"
    run("shmsession", "dump", str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    recreate(shm_name)
    out = io.StringIO()
    with pytest.raises(CommandError, match=r"is damaged: .*truncated.*session\(s\) that verified"):
        call_command("shmsession", "restore", str(path), stdout=out)
    assert "Restored " in out.getvalue()
    restored = int(out.getvalue().split("Restored ", 1)[1].split()[0])
    assert 0 < restored < 40
    assert sum(SessionStore(key).get("i") == i for key, i in made.items()) == restored


def test_restore_into_a_smaller_table_says_what_did_not_fit(
    settings: Any, shm_name: str, tmp_path: Path
) -> None:
    settings.SHMSESSION = {"NAME": shm_name, "SIZE": "4M"}
    for _ in range(4000):
        s = SessionStore()
        s["pad"] = "x" * 200
        s.save()
    path = str(tmp_path / "s.snap")
    run("shmsession", "dump", path)
    recreate(shm_name)
    settings.SHMSESSION = {"NAME": shm_name, "SIZE": "1M"}  # the resize procedure, smaller
    out = run("shmsession", "restore", path)
    assert "did not fit in the table (1048576 bytes)" in out
    assert "Raise SHMSESSION['SIZE']" in out


@pytest.mark.multiprocess
def test_dump_to_stdout_and_restore_from_stdin(shm_name: str) -> None:
    """Through a pipe, as in `dump - | ssh host manage.py shmsession restore -`."""
    made = make_sessions(12)
    store.reset()
    env = servers.project_env(shm_name, "1M")
    manage = [sys.executable, "manage.py", "shmsession"]
    dump = subprocess.run(
        [*manage, "dump", "-"], cwd=servers.PROJECT, env=env, capture_output=True, timeout=60
    )
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout.startswith(b"\x89SHMSNAP")
    assert b"Dumped 12 session(s)" in dump.stderr  # the report never mixes with the snapshot
    SessionTable.unlink_name(shm_name)
    restore = subprocess.run(
        [*manage, "restore", "-"],
        cwd=servers.PROJECT,
        env=env,
        input=dump.stdout,
        capture_output=True,
        timeout=60,
    )
    assert restore.returncode == 0, restore.stderr
    assert b"Restored 12 of 12 session(s) from -" in restore.stdout
    assert logged_in(made)


def test_prometheus_gets_the_last_dump_once_there_is_one(
    settings: Any, shm_name: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "s.snap")
    settings.SHMSESSION = {**settings.SHMSESSION, "SNAPSHOT": {"PATH": path, "INTERVAL": 0}}
    make_sessions(2)
    before = run("shmsession", "stats", "--format", "prometheus")
    assert "last_dump" not in before  # never ran: no sample (never a "None")
    run("shmsession", "dump")
    after = run("shmsession", "stats", "--format", "prometheus")
    assert f'django_shmsession_last_dump_sessions{{table="{shm_name}"}} 2' in after
    assert "django_shmsession_last_dump_at{" in after
    assert "snapshot_path" not in after
    assert "None" not in after


def test_dump_and_restore_take_name(shm_name: str, tmp_path: Path) -> None:
    made = make_sessions(3)
    path = str(tmp_path / "s.snap")
    run("shmsession", "dump", path, "--name", shm_name)
    other = f"{shm_name}-copy"
    try:
        assert "Restored 3 of 3" in run("shmsession", "restore", path, "--name", other)
        with SessionTable(other) as copy:
            assert {item.key for item in copy.scan()[0]} == set(made)
    finally:
        SessionTable.unlink_name(other)
