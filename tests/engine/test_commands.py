"""`manage.py shmsession stats|check|clear|unlink` and `manage.py clearsessions`."""

from __future__ import annotations

import io
import json
import os

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_shmsession import checks, store
from django_shmsession.backend import SessionStore


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def make_sessions(n: int, expiry: int | None = None) -> list[str]:
    made = []
    for i in range(n):
        s = SessionStore()
        s["i"] = i
        if expiry is not None:
            s.set_expiry(expiry)
        s.save()
        assert s.session_key is not None
        made.append(s.session_key)
    return made


def segment_exists(name: str) -> bool:
    return os.path.exists(checks.segment_path(name))


def test_stats_json() -> None:
    make_sessions(3)
    stats = json.loads(run("shmsession", "stats", "--json"))
    assert stats["entries"] == 3
    assert stats["sets"] >= 3
    assert stats["segment_size"] == 1024 * 1024
    assert 0 < stats["occupancy"] < 1
    for field in ("evictions", "lock_waits", "lock_recoveries", "value_bytes", "chunks_used"):
        assert field in stats


def test_stats_human(shm_name: str) -> None:
    make_sessions(2)
    text = run("shmsession", "stats")
    lines = dict(line.split(None, 1) for line in text.splitlines())
    assert lines["name"] == shm_name
    assert lines["entries"] == "2"
    assert lines["occupancy"].endswith(" %")
    assert lines["segment_size"] == "1048576 (1.0 MiB)"


def test_stats_without_segment_says_so_and_creates_nothing(shm_name: str) -> None:
    with pytest.raises(CommandError, match=r"No session table named .* exists yet"):
        run("shmsession", "stats")
    assert not segment_exists(shm_name)


def test_check_ok() -> None:
    make_sessions(2)
    assert "ok, 2 entries" in run("shmsession", "check")


def test_check_json_and_repair() -> None:
    make_sessions(1)
    report = json.loads(run("shmsession", "check", "--repair", "--json"))
    assert report["ok"] is True
    assert report["entries"] == 1


def test_clear_noinput() -> None:
    keys = make_sessions(4)
    assert "Deleted 4 session(s)" in run("shmsession", "clear", "--noinput")
    assert not any(SessionStore().exists(k) for k in keys)


def test_clear_asks_and_no_keeps_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = make_sessions(2)
    questions: list[str] = []
    monkeypatch.setattr("builtins.input", lambda q: questions.append(q) or "no")
    assert "Nothing deleted." in run("shmsession", "clear")
    assert "Delete every session" in questions[0]
    assert all(SessionStore().exists(k) for k in keys)


def test_clear_asks_and_yes_deletes(monkeypatch: pytest.MonkeyPatch) -> None:
    make_sessions(2)
    monkeypatch.setattr("builtins.input", lambda q: "yes")
    assert "Deleted 2 session(s)" in run("shmsession", "clear")


def test_unlink_noinput_removes_segment(shm_name: str) -> None:
    make_sessions(1)
    assert segment_exists(shm_name)
    assert f"Removed '{shm_name}'" in run("shmsession", "unlink", "--noinput")
    assert not segment_exists(shm_name)
    # The engine recreates an empty table on next use.
    assert make_sessions(1)
    assert segment_exists(shm_name)


def test_unlink_asks_and_no_keeps_segment(shm_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make_sessions(1)
    monkeypatch.setattr("builtins.input", lambda q: "n")
    assert "Nothing removed." in run("shmsession", "unlink")
    assert segment_exists(shm_name)


def test_unlink_with_stdin_closed_keeps_segment(
    shm_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From cron or a pipe there is nobody to answer: cancel, never a traceback or a removal."""
    make_sessions(1)

    def closed(question: str) -> str:
        raise EOFError

    monkeypatch.setattr("builtins.input", closed)
    assert "Nothing removed." in run("shmsession", "unlink")
    assert segment_exists(shm_name)


def test_unlink_without_segment(shm_name: str) -> None:
    assert "nothing to remove" in run("shmsession", "unlink", "--noinput")


def test_unknown_action_is_an_error() -> None:
    with pytest.raises(CommandError):
        call_command("shmsession", "explode")


def test_clearsessions_removes_expired_only() -> None:
    live = make_sessions(3, expiry=3600)
    expired = make_sessions(2, expiry=-10)
    assert store.get_table().stats().entries == 5
    call_command("clearsessions")
    assert store.get_table().stats().entries == 3
    assert all(SessionStore().exists(k) for k in live)
    assert not any(SessionStore().exists(k) for k in expired)
