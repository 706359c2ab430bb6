"""The warm-restart side of the gunicorn hooks, called as gunicorn's master calls them."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from django_shmsession import conf, gunicorn, snapshot_hooks, snapshot_ops, store
from django_shmsession.backend import SessionStore
from django_shmsession.table import SessionTable

from ..engine.test_gunicorn_hooks import fake_server


@pytest.fixture
def snap(settings: Any, shm_name: str, tmp_path: Path) -> Path:
    path = tmp_path / "sessions.snap"
    settings.SHMSESSION = {
        "NAME": shm_name,
        "SIZE": "1M",
        "SNAPSHOT": {"PATH": str(path), "INTERVAL": 1},
    }
    return path


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


def reboot(name: str) -> None:
    store.reset()
    SessionTable.unlink_name(name)


def reap_children() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def messages(server: Any, level: str) -> list[str]:
    return [text for lvl, text in server.log.lines if lvl == level]


@pytest.fixture(autouse=True)
def _no_timer_left() -> Any:
    yield
    periodic = snapshot_hooks._periodic
    if periodic is not None:
        periodic.stop(5)
        snapshot_hooks._periodic = None
    signal.setitimer(signal.ITIMER_REAL, 0)


def test_on_exit_dumps_and_on_starting_restores_a_new_segment(snap: Path, shm_name: str) -> None:
    made = make_sessions(20)
    server = fake_server()
    gunicorn.on_exit(server)
    assert any("Dumped 20 session(s)" in m for m in messages(server, "info"))
    reboot(shm_name)
    server = fake_server()
    gunicorn.on_starting(server)
    assert any("Restored 20 of 20 session(s)" in m for m in messages(server, "info"))
    assert store._table is None  # the master keeps no mapping
    assert logged_in(made)


def test_an_existing_segment_is_not_restored_into(snap: Path, shm_name: str) -> None:
    make_sessions(5)
    gunicorn.on_exit(fake_server())
    later = make_sessions(1)
    server = fake_server()
    gunicorn.on_starting(server)  # a plain restart: the table is newer than the snapshot
    assert not any("Restored" in m for m in messages(server, "info"))
    assert logged_in(later)


def test_no_snapshot_yet(snap: Path) -> None:
    server = fake_server()
    gunicorn.on_starting(server)
    assert f"django-shmsession: no snapshot at {snap} yet; starting empty" in messages(
        server, "info"
    )


def test_a_damaged_snapshot_is_restored_partly_and_set_aside(snap: Path, shm_name: str) -> None:
    made = make_sessions(30)
    gunicorn.on_exit(fake_server())
    data = snap.read_bytes()
    snap.write_bytes(data[:-300])
    reboot(shm_name)
    server = fake_server()
    gunicorn.on_starting(server)
    errors = messages(server, "error")
    assert len(errors) == 1
    assert "is damaged" in errors[0]
    assert "truncated" in errors[0]
    aside = [p for p in snap.parent.iterdir() if p.name.startswith("sessions.snap.unrestored-")]
    assert len(aside) == 1
    assert str(aside[0]) in errors[0]
    assert aside[0].read_bytes() == data[:-300]
    assert not snap.exists()  # no dump can overwrite what the damaged file still holds
    assert 0 < sum(SessionStore(k).get("i") == i for k, i in made.items()) < 30


def test_a_foreign_snapshot_is_set_aside_and_the_server_starts(snap: Path) -> None:
    snap.write_bytes(b"GIF89a" + bytes(200))
    server = fake_server()
    gunicorn.on_starting(server)
    errors = messages(server, "error")
    assert len(errors) == 1
    assert "not a django-shmsession snapshot" in errors[0]
    assert "restore it by hand" in errors[0]
    assert not snap.exists()


def test_on_exit_without_a_table_keeps_the_snapshot(snap: Path, shm_name: str) -> None:
    make_sessions(2)
    gunicorn.on_exit(fake_server())
    before = snap.read_bytes()
    reboot(shm_name)
    server = fake_server()
    gunicorn.on_exit(server)
    assert snap.read_bytes() == before
    assert any("no table to dump at exit" in m for m in messages(server, "warning"))


def test_on_exit_without_snapshot_setting_does_nothing(tmp_path: Path) -> None:
    make_sessions(1)
    server = fake_server()
    gunicorn.on_exit(server)
    assert server.log.lines == []


def test_on_exit_logs_a_failed_dump(settings: Any, shm_name: str, tmp_path: Path) -> None:
    settings.SHMSESSION = {
        "NAME": shm_name,
        "SIZE": "1M",
        "SNAPSHOT": {"PATH": str(tmp_path / "missing" / "s.snap"), "INTERVAL": 0},
    }
    make_sessions(1)
    server = fake_server()
    gunicorn.on_exit(server)  # never raises
    assert any("does not exist; create it" in m for m in messages(server, "error"))


@pytest.mark.multiprocess
def test_periodic_dumps_from_a_forked_child(snap: Path) -> None:
    made = make_sessions(8)
    server = SimpleNamespace(log=fake_server().log, LISTENERS=[])
    snapshot_hooks.start_periodic(server, conf.get_config())
    periodic = snapshot_hooks._periodic
    assert periodic is not None
    deadline = time.monotonic() + 20
    while not snap.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert snap.exists()
    first = periodic.pid
    assert first is not None
    assert first != os.getpid()
    more = make_sessions(4)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # a later dump picks the new sessions up
        time.sleep(0.05)
        if periodic.pid != first and snapshot_ops.last_runs(str(snap))["last_dump_sessions"] == 12:
            break
    assert snapshot_ops.last_runs(str(snap))["last_dump_sessions"] == 12
    snapshot_hooks.dump_at_exit(server, conf.get_config())
    assert snapshot_hooks._periodic is None
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    reap_children()  # gunicorn's reaper does this in a real master
    keys = {r.key for r in snapshot_ops.iter_records(str(snap))}
    assert keys == set(made) | set(more)


def test_interval_zero_arms_no_timer(settings: Any, shm_name: str, tmp_path: Path) -> None:
    settings.SHMSESSION = {
        "NAME": shm_name,
        "SIZE": "1M",
        "SNAPSHOT": {"PATH": str(tmp_path / "s.snap"), "INTERVAL": 0},
    }
    snapshot_hooks.start_periodic(fake_server(), conf.get_config())
    assert snapshot_hooks._periodic is None
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_dump_running_for_three_intervals_is_reported_once(snap: Path) -> None:
    server = fake_server()
    periodic = snapshot_hooks.PeriodicDumps(server, conf.get_config())
    hung = subprocess.Popen(["sleep", "30"])
    try:
        periodic.pid = hung.pid
        periodic.pidfd = os.pidfd_open(hung.pid)
        periodic.spawned_at = time.monotonic() - 3.5 * periodic.interval
        periodic._on_alarm(signal.SIGALRM, None)
        periodic._on_alarm(signal.SIGALRM, None)
        warnings = messages(server, "warning")
        assert len(warnings) == 1
        assert f"the periodic dump (pid {hung.pid}) has run for" in warnings[0]
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= snapshot_hooks.RETRY
        assert periodic.pid == hung.pid  # no second dump while the first runs
    finally:
        periodic.stop(5)  # sends SIGTERM to the "dump" and waits for it
        hung.wait(timeout=10)
    assert hung.returncode == -signal.SIGTERM


@pytest.mark.multiprocess
def test_a_stopped_dump_child_never_returns_into_the_master(snap: Path) -> None:
    """SIGTERM at random instants of the child's life, even while it exits: it always ends
    in os._exit, never by an exception climbing the (master's) stack it was forked from."""
    make_sessions(50)
    rng = random.Random(5)
    periodic = snapshot_hooks.PeriodicDumps(fake_server(), conf.get_config())
    parent = os.getpid()
    for _ in range(20):
        try:
            periodic._spawn()
        finally:
            if os.getpid() != parent:  # the child escaped: what the test must never see
                os._exit(99)
        pid = periodic.pid
        assert pid is not None
        time.sleep(rng.uniform(0, 0.05))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):  # killed before it set its own handler
            assert os.WTERMSIG(status) == signal.SIGTERM
        else:
            assert os.WEXITSTATUS(status) in (0, 128 + signal.SIGTERM), status
        periodic._forget_child()
