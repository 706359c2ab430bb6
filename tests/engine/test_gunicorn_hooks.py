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


def test_child_exit_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Any:
        raise LockTimeout("held by a live process")

    monkeypatch.setattr(store, "get_table", broken)
    server = fake_server()
    gunicorn.child_exit(server, SimpleNamespace(pid=4242))
    assert server.log.lines[0][0] == "error"
    assert "worker 4242" in server.log.lines[0][1]


@pytest.mark.multiprocess
def test_child_exit_recovers_lock_of_worker_killed_mid_write() -> None:
    """A 'worker' SIGKILLed while holding the lock half-way through a write: the master's
    child_exit hook takes the lock over at once and every acknowledged session survives."""
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
                    os.kill(os.getpid(), signal.SIGKILL)
                    if point == "update:chunks_written"
                    else None
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
