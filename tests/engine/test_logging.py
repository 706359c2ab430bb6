"""The engine's log lines on the ``django_shmsession`` logger, captured with caplog: each event
an operator must be able to act on logs one line, at the level the README documents."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from django_shmsession import store
from django_shmsession import table as table_module
from django_shmsession.backend import SessionStore
from django_shmsession.exceptions import LockTimeout, WouldBlock
from django_shmsession.table import SessionTable
from tests.table.helpers import raw_mapping
from tests.table.test_corruption import region_bounds

LOGGER = "django_shmsession"


def records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


def test_creating_the_table_logs_info(shm_name: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        SessionStore().create()
        SessionStore().create()  # the second use finds it open: no more lines
    assert records(caplog) == [
        (logging.INFO, f"django-shmsession: created the session table {shm_name} (1048576 bytes)")
    ]


def test_opening_an_existing_table_logs_nothing(
    shm_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    SessionTable(shm_name, 1024 * 1024).close()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        SessionStore().create()
    assert records(caplog) == []


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_segment_replaced_under_a_running_worker_logs_a_warning(
    shm_name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """Users are logged out: WARNING, naming the table and what happened to it."""
    SessionStore().create()
    SessionTable.unlink_name(shm_name)
    if how == "replaced":
        SessionTable(shm_name, 1024 * 1024).close()  # another process made a new one
    monkeypatch.setattr(store, "_next_check", 0.0)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        SessionStore().create()
    lines = records(caplog)
    assert lines[0][0] == logging.WARNING
    assert shm_name in lines[0][1]
    assert f"was {how}" in lines[0][1]
    assert "sessions in the old one are gone" in lines[0][1]


# --- the table's events, seen through the engine (the table layer logs them) --------------------


class LockProbe(logging.Handler):
    """Records each django_shmsession line with whether the table lock was free when it was
    emitted: the lines must come after the lock is released, never inside it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        table = store._table
        free = True
        if table is not None:
            try:
                table.inline(table.exists, "probe-key")
            except WouldBlock:
                free = False
        self.lines.append((record.levelno, record.getMessage(), free))


@pytest.fixture
def probe() -> Iterator[LockProbe]:
    handler = LockProbe()
    logger = logging.getLogger(LOGGER)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _die_in(point: str, session: SessionStore) -> int:
    """Fork a 'worker' that saves ``session`` and SIGKILLs itself at fault point ``point``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child dies
        try:
            table_module.set_fault_hook(
                lambda at: os.kill(os.getpid(), signal.SIGKILL) if at == point else None
            )
            session.save()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), "the worker did not die at its fault point"
    return pid


@pytest.mark.multiprocess
def test_a_dead_holders_lock_and_its_write_are_logged_as_warnings(probe: LockProbe) -> None:
    kept = SessionStore()
    kept["v"] = "before"
    kept.save()
    victim = SessionStore(kept.session_key)
    victim["v"] = "half-written"
    pid = _die_in("update:after-value", victim)
    probe.lines.clear()
    assert SessionStore(kept.session_key)["v"] == "before"
    warnings = [(msg, free) for level, msg, free in probe.lines if level == logging.WARNING]
    took_over = [m for m, _ in warnings if "took over the session table lock" in m]
    recovered = [m for m, _ in warnings if "recovered an interrupted update" in m]
    assert len(took_over) == 1, probe.lines
    assert str(pid) in took_over[0]
    assert "after waiting" in took_over[0]
    assert len(recovered) == 1, probe.lines
    assert "rolled" in recovered[0]
    assert all(free for _, _, free in probe.lines), "a line was logged inside the lock"


_HOLDER = """
import os, signal, sys
from django_shmsession.table import SessionTable
table = SessionTable(sys.argv[1])
print("holding", flush=True)
table._locked(os.kill, os.getpid(), signal.SIGSTOP)
"""


@pytest.mark.multiprocess
def test_lock_timeout_is_logged_as_an_error(settings: Any, shm_name: str, probe: LockProbe) -> None:
    """A live holder stuck in the lock: the refused request logs ERROR naming it and the wait."""
    settings.SHMSESSION = {"NAME": shm_name, "SIZE": "1M", "LOCK_TIMEOUT": 0.5}
    key = SessionStore()
    key.create()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, shm_name],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        time.sleep(0.2)  # let it reach SIGSTOP
        with pytest.raises(LockTimeout):
            SessionStore(key.session_key).load()
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    # (The lock is the stopped holder's here, so the probe's "free" says nothing.)
    errors = [msg for level, msg, _ in probe.lines if level == logging.ERROR]
    assert len(errors) == 1, probe.lines
    assert shm_name in errors[0]
    assert "0.5 s" in errors[0]
    assert str(holder.pid) in errors[0]


def test_corruption_detected_is_logged_as_an_error(shm_name: str, probe: LockProbe) -> None:
    session = SessionStore()
    session["v"] = "x" * 300
    session.save()
    start, _end = region_bounds(shm_name, "chunks")
    with raw_mapping(shm_name) as mapping:
        mapping[start : start + 64] = bytes(b ^ 0xFF for b in mapping[start : start + 64])
    probe.lines.clear()
    assert SessionStore(session.session_key).load() == {}  # the damaged session alone is gone
    errors = [msg for level, msg, _ in probe.lines if level == logging.ERROR]
    assert any("corruption detected" in m and shm_name in m for m in errors), probe.lines
    assert any(
        level == logging.WARNING and "dropped one damaged session" in m
        for level, m, _ in probe.lines
    ), probe.lines
    assert all(free for _, _, free in probe.lines), "a line was logged inside the lock"
