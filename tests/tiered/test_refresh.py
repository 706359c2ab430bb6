"""Invalidations that carry the new copy: the wire format of both L2s, checked field by field,
and the listener's rules for using it (only over an older copy it still holds, by a
compare-and-set; never adding a copy). Real Redis and PostgreSQL for the listener tests."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from django_shmsession import store
from django_shmsession.tiered import codec, counters, db_l2, redis_l2
from django_shmsession.tiered.engine import SessionStore
from django_shmsession.tiered.l2 import DELETED, REFRESH_LIMIT, Invalidation, Refresh
from django_shmsession.tiered.listener import Listener
from django_shmsession.tiered.runtime import get_l2

KEY = "a" * 32
EXPIRES_MS = 1_900_000_000_000


# -- the wire format ----------------------------------------------------------------------------


def test_a_plain_invalidation_parses_on_both_l2s() -> None:
    assert redis_l2._parse(f"7 {KEY}".encode()) == [Invalidation(KEY, 7)]
    assert db_l2._parse(f"7 {KEY}") == [Invalidation(KEY, 7)]


def test_an_update_carries_its_copy_on_redis() -> None:
    payload = b'{"a": "x y z", "\\u00e9": 1}'  # spaces and escapes in the payload
    found = redis_l2._parse(f"9 {KEY} {EXPIRES_MS} 2 ".encode() + payload)
    assert found == [Invalidation(KEY, 9, Refresh(payload, EXPIRES_MS / 1000, 2))]


@pytest.mark.parametrize("payload", [b'{"a": "x y"}', '{"é": 1}'.encode(), b"\x00\xff"])
def test_an_update_carries_its_copy_on_postgres(payload: bytes) -> None:
    notice = f"9 {KEY} {EXPIRES_MS} 1 {db_l2.encode_body(payload)}"
    assert db_l2._parse(notice) == [Invalidation(KEY, 9, Refresh(payload, EXPIRES_MS / 1000, 1))]


@pytest.mark.parametrize(
    "tail",
    [
        f"{EXPIRES_MS} 9 :{{}}",  # no such eviction class
        f"{EXPIRES_MS} -1 :{{}}",
        "0 1 :{}",  # no expiry
        "99999999999999999999 1 :{}",
        f"{EXPIRES_MS} 1 x{{}}",  # not our body encoding
        f"{EXPIRES_MS} 1 b!!notbase64",
        f"{EXPIRES_MS} 1",  # a field missing
        "soon 1 :{}",
        f"{EXPIRES_MS} 1 :" + "x" * (REFRESH_LIMIT + 1),
    ],
)
def test_a_malformed_copy_is_left_out_but_the_invalidation_stays(
    tail: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="django_shmsession"):
        assert db_l2._parse(f"9 {KEY} {tail}") == [Invalidation(KEY, 9)]
        raw = tail.replace(" :", " ", 1).encode() if " :" in tail else tail.encode()
        if "x{" not in tail and "b!!" not in tail:
            assert redis_l2._parse(f"9 {KEY} ".encode() + raw) == [Invalidation(KEY, 9)]
    assert "malformed copy" in caplog.text


@pytest.mark.parametrize("notice", ["", "x", "seven " + KEY, "7"])
def test_a_malformed_invalidation_is_ignored(notice: str) -> None:
    assert db_l2._parse(notice) == []
    assert redis_l2._parse(notice.encode()) == []


def test_a_large_session_travels_as_a_plain_invalidation() -> None:
    from django_shmsession.tiered.l2 import refresh_fields

    assert refresh_fields(b"x" * REFRESH_LIMIT, EXPIRES_MS / 1000, 1) == f"{EXPIRES_MS} 1"
    assert refresh_fields(b"x" * (REFRESH_LIMIT + 1), EXPIRES_MS / 1000, 1) is None


# -- the listener's use of it (real L2s, a listener that is not running) ------------------------


def _saved(**data: Any) -> str:
    s = SessionStore()
    s.update(data)
    s.save()
    return s.session_key or ""


def _held(key: str) -> codec.L1Copy | None:
    value = store.get_table().get(key)
    return None if value is None else codec.decode(value)


def _refresh(payload: bytes) -> Refresh:
    return Refresh(payload, time.time() + 600, 0)


def test_an_older_copy_is_refreshed(bare_listener: Listener) -> None:
    key = _saved(n=1)
    held = _held(key)
    assert held is not None
    refreshed = counters.snapshot()["refreshed"]
    bare_listener._apply(store.get_table(), Invalidation(key, held.version + 1, _refresh(b"{}")))
    now = _held(key)
    assert now is not None
    assert (now.version, now.payload) == (held.version + 1, b"{}")
    assert counters.snapshot()["refreshed"] == refreshed + 1


def test_no_copy_is_added_for_a_session_this_host_does_not_hold(bare_listener: Listener) -> None:
    key = _saved(n=1)
    store.get_table().delete(key)
    bare_listener._apply(store.get_table(), Invalidation(key, 10**12, _refresh(b"{}")))
    assert store.get_table().get(key) is None


def test_a_newer_copy_is_not_refreshed_back(bare_listener: Listener) -> None:
    key = _saved(n=1)
    table = store.get_table()
    newer = codec.encode(1000, time.time(), time.time() + 600, b'{"n": 1}')
    table.set(key, newer, time.time() + 600)
    bare_listener._apply(table, Invalidation(key, 999, _refresh(b"{}")))
    assert table.get(key) == newer


def test_a_delete_drops_even_with_a_copy_attached(bare_listener: Listener) -> None:
    key = _saved(n=1)
    bare_listener._apply(store.get_table(), Invalidation(key, DELETED, _refresh(b"{}")))
    assert store.get_table().get(key) is None


def test_a_copy_stored_after_the_listener_looked_is_not_overwritten(
    bare_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save on this host stores a newer copy between the listener's read and its refresh:
    the compare-and-set fails and the listener drops the key instead (a miss, never an older
    copy over a newer one)."""
    key = _saved(n=1)
    table = store.get_table()
    held = _held(key)
    assert held is not None
    real_get = table.get

    def get(k: str) -> bytes | None:
        found = real_get(k)
        newer = codec.encode(held.version + 5, time.time(), held.expires_at, b'{"n": 5}')
        table.set(k, newer, held.expires_at)
        return found

    monkeypatch.setattr(table, "get", get)
    bare_listener._apply(table, Invalidation(key, held.version + 1, _refresh(b"{}")))
    monkeypatch.undo()
    now = _held(key)
    assert now is None or now.version == held.version + 5


def test_the_copy_an_update_sends_reaches_the_listener(bare_listener: Listener) -> None:
    """End to end through L2: an update's invalidation carries payload, expiry and class."""
    sub = get_l2().subscribe()
    try:
        key = _saved(_auth_user_id="1", n=1)
        record = get_l2().fetch(key)
        assert record is not None
        version = get_l2().update(key, b'{"n": 2}', record.expires_at, 3)
        deadline = time.monotonic() + 5
        found: list[Invalidation] = []
        while not found and time.monotonic() < deadline:
            found = [i for i in sub.poll(0.1) if i.key == key]
        expires_at = int(record.expires_at * 1000) / 1000
        assert found == [Invalidation(key, version or 0, Refresh(b'{"n": 2}', expires_at, 3))]
    finally:
        sub.close()
