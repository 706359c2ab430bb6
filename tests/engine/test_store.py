"""The per-process table handle: cached, reset on setting changes, and never left on an orphan."""

from __future__ import annotations

import logging
import os

import pytest

from django_shmsession import store
from django_shmsession.backend import SessionStore
from django_shmsession.segment import segment_path
from django_shmsession.table import SessionTable


def saved_session(value: str) -> SessionStore:
    s = SessionStore()
    s["v"] = value
    s.save()
    return s


def test_handle_is_cached() -> None:
    assert store.get_table() is store.get_table()


def test_no_stat_between_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    table = store.get_table()

    def fail(name: str) -> None:
        raise AssertionError("stat on the hot path")

    monkeypatch.setattr(store, "_stat_identity", fail)
    assert store.get_table() is table  # within RECHECK_INTERVAL: no system call


def test_reset_reopens_same_segment() -> None:
    s = saved_session("kept")
    first = store.get_table()
    store.reset()
    assert store.get_table() is not first
    assert SessionStore(s.session_key)["v"] == "kept"


def test_removed_segment_is_recreated_not_orphaned(
    shm_name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """systemd's RemoveIPC (or `shmsession unlink` from another process) removed the segment:
    after the next check this process uses a new one that every other process can see too."""
    old = saved_session("old")
    SessionTable.unlink_name(shm_name)
    monkeypatch.setattr(store, "_next_check", 0.0)
    with caplog.at_level(logging.WARNING, logger="django_shmsession"):
        new = saved_session("new")
    assert "was removed or replaced" in caplog.text
    assert os.path.exists(segment_path(shm_name))
    with SessionTable(shm_name) as fresh_view:  # what a newly started process sees
        assert fresh_view.get(new.session_key or "") is not None
    assert SessionStore(old.session_key).load() == {}


def test_replaced_segment_is_followed(shm_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store.get_table()
    SessionTable.unlink_name(shm_name)
    with SessionTable(shm_name, 1024 * 1024) as other:  # another process recreated it
        monkeypatch.setattr(store, "_next_check", 0.0)
        s = saved_session("seen-by-both")
        assert other.get(s.session_key or "") is not None
