"""The gunicorn server hooks, called as gunicorn's master would call them."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace
from typing import Any

import pytest

from django_shmsession import checks, gunicorn, store
from django_shmsession import table as table_module
from django_shmsession.backend import SessionStore
from django_shmsession.exceptions import LockTimeout


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _add(self, level: str, msg: str, *args: Any) -> None:
        self.lines.append((level, msg % args))

    def info(self, msg: str, *args: Any) -> None:
        self._add("info", msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self._add("warning", msg, *args)

    def error(self, msg: str, *args: Any) -> None:
        self._add("error", msg, *args)


def fake_server() -> Any:
    return SimpleNamespace(log=FakeLog())


def test_on_starting_creates_the_table(shm_name: str) -> None:
    assert not os.path.exists(checks.segment_path(shm_name))
    server = fake_server()
    gunicorn.on_starting(server)
    assert os.path.exists(checks.segment_path(shm_name))
    assert server.log.lines == [
        ("info", f"django-shmsession: table {shm_name} ready ({1024 * 1024} bytes)")
    ]


def test_on_starting_keeps_existing_sessions(shm_name: str) -> None:
    s = SessionStore()
    s["kept"] = True
    s.save()
    store.reset()  # a new master process: nothing cached
    gunicorn.on_starting(fake_server())
    assert SessionStore(s.session_key)["kept"] is True


def test_child_exit_without_dead_holder_does_nothing() -> None:
    server = fake_server()
    gunicorn.child_exit(server, SimpleNamespace(pid=12345))
    assert server.log.lines == []


class NotAnException(BaseException):
    """What a C extension or a stray ``raise`` could throw that ``except Exception`` misses."""


@pytest.mark.parametrize(
    "error",
    [
        LockTimeout("held by a live process"),
        OSError(24, "Too many open files"),
        MemoryError(),
        NotAnException("odd"),
        RuntimeError("bug"),
    ],
    ids=lambda err: type(err).__name__,
)
def test_child_exit_never_raises(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """An exception escaping child_exit would end gunicorn's master and every worker with it."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise error

    store.get_table()  # the table exists
    monkeypatch.setattr(store, "open_table", broken)
    server = fake_server()
    gunicorn.child_exit(server, SimpleNamespace(pid=4242))
    assert server.log.lines[0][0] == "error"
    assert "worker 4242" in server.log.lines[0][1]
    assert type(error).__name__ in server.log.lines[0][1]


def test_child_exit_lets_a_shutdown_through(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "open_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gunicorn.child_exit(fake_server(), SimpleNamespace(pid=1))


def test_child_exit_never_creates_a_table(shm_name: str) -> None:
    server = fake_server()
    gunicorn.child_exit(server, SimpleNamespace(pid=12345))
    assert server.log.lines == []
    assert not os.path.exists(checks.segment_path(shm_name))


def mapped_shm_files() -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line.split()[-1] for line in maps if "/dev/shm/" in line]


def test_the_master_keeps_no_mapping(shm_name: str) -> None:
    """on_starting and child_exit close what they open: a mapping kept by the master would pin
    a replaced segment's pages in /dev/shm forever."""
    store.reset()
    before = mapped_shm_files()
    gunicorn.on_starting(fake_server())
    gunicorn.child_exit(fake_server(), SimpleNamespace(pid=12345))
    assert mapped_shm_files() == before
    assert store.retired_handles() == 0
    assert store._table is None  # workers open their own after the fork


@pytest.mark.multiprocess
def test_child_exit_recovers_lock_of_worker_killed_mid_write() -> None:
    """A 'worker' SIGKILLed while holding the lock half-way through a write: the master's
    child_exit hook takes the lock over at once and every acknowledged session survives."""
    assert "update:after-value" in table_module.FAULT_POINTS
    kept = SessionStore()
    kept["v"] = "before"
    kept.save()
    victim = SessionStore(kept.session_key)
    victim["v"] = "half-written"
    store.get_table()  # opened before fork, as in gunicorn's master

    pid = os.fork()
    if pid == 0:  # the worker
        try:
            table_module.set_fault_hook(
                lambda point: (
                    os.kill(os.getpid(), signal.SIGKILL) if point == "update:after-value" else None
                )
            )
            victim.save()
        finally:
            os._exit(3)  # only reached if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGKILL

    server = fake_server()
    gunicorn.child_exit(server, SimpleNamespace(pid=pid))
    assert server.log.lines
    assert server.log.lines[0][0] == "warning"
    assert f"worker {pid} died holding the session lock" in server.log.lines[0][1]
    assert SessionStore(kept.session_key)["v"] == "before"  # the lost write is the only loss
    assert store.get_table().check().ok
    assert store.get_table().stats().lock_recoveries >= 1


@pytest.mark.multiprocess
def test_child_exit_claims_no_repair_when_nothing_was_half_done() -> None:
    """A worker killed holding the lock between writes left nothing to repair: the master's
    line must not say it recovered or repaired a write (the table logs what it really did)."""
    SessionStore().create()
    table = store.get_table()
    pid = os.fork()
    if pid == 0:  # the worker: dies inside the critical section, before any write
        try:
            table._locked(os.kill, os.getpid(), signal.SIGKILL)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WTERMSIG(status) == signal.SIGKILL
    server = fake_server()
    gunicorn.child_exit(server, SimpleNamespace(pid=pid))
    assert [level for level, _ in server.log.lines] == ["warning"]
    line = server.log.lines[0][1]
    assert f"worker {pid} died holding the session lock" in line
    assert "took the lock over and released it" in line
    assert "repaired" not in line
    assert "interrupted write" not in line
    assert store.get_table().check().ok
