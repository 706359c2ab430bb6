"""Invalidations are ordered by version: a listener drops a copy older than the version it is
told about and keeps one that is newer (its own host's later write, reaching a listener that
runs behind the workers), and records every invalidation in the key's guard stripe.
Both L2s number the writes of one session in increasing order. Real Redis, real PostgreSQL,
the real listener (in a thread, on its own connection)."""

from __future__ import annotations

import time

import redis
from django.db import connections

from django_shmsession import store
from django_shmsession.tiered import codec, counters, words
from django_shmsession.tiered.engine import SessionStore
from django_shmsession.tiered.l2 import DELETED, Invalidation, L2Record
from django_shmsession.tiered.listener import Listener
from django_shmsession.tiered.runtime import get_l2

from .conftest import PG_ALIAS, ListenerThread, held_version, saved, wait_for


def test_versions_of_one_session_increase(l2_kind: str) -> None:
    s = saved(n=0)
    key = s.session_key or ""
    seen = [held_version(key)]
    for n in range(1, 6):
        s = SessionStore(key)
        s["n"] = n
        s.save()
        seen.append(held_version(key))
    assert None not in seen
    assert seen == sorted(seen), seen
    assert len(set(seen)) == len(seen), seen
    assert get_l2().version(key) == seen[-1]


def _copy_at(key: str, version: int) -> None:
    """Put an L1 copy of ``version`` under ``key`` (as a worker's fill or save would)."""
    record = get_l2().fetch(key)
    assert record is not None
    value = codec.encode(version, time.time(), record.expires_at, record.payload)
    store.get_table().set(key, value, record.expires_at)


def test_older_copy_is_dropped(bare_listener: Listener) -> None:
    key = saved(a=1).session_key or ""
    table = store.get_table()
    _copy_at(key, 5)
    guard = words.guard(table, key)
    bare_listener._apply(table, Invalidation(key, 7))
    assert table.get(key) is None
    assert words.guard_count(words.guard(table, key)) == words.guard_count(guard) + 1


def test_newer_copy_is_kept_but_the_guard_moves(bare_listener: Listener) -> None:
    key = saved(a=1).session_key or ""
    table = store.get_table()
    _copy_at(key, 9)
    guard = words.guard(table, key)
    kept = counters.snapshot()["kept_newer"]
    bare_listener._apply(table, Invalidation(key, 7))
    assert held_version(key) == 9
    # A fill or save in flight on the stripe must still check before keeping its copy.
    assert words.guard_count(words.guard(table, key)) == words.guard_count(guard) + 1
    assert counters.snapshot()["kept_newer"] == kept + 1


def test_copy_of_exactly_that_version_is_kept_and_the_guard_still_moves(
    bare_listener: Listener,
) -> None:
    """The guard moves for every invalidation: a slower save of an older version in flight
    must see this one too (tests/tiered/test_guard_words.py, two saves of one session)."""
    key = saved(a=1).session_key or ""
    table = store.get_table()
    _copy_at(key, 7)
    guard = words.guard(table, key)
    bare_listener._apply(table, Invalidation(key, 7))
    assert held_version(key) == 7
    assert words.guard_count(words.guard(table, key)) == words.guard_count(guard) + 1


def test_delete_drops_any_copy(bare_listener: Listener) -> None:
    key = saved(a=1).session_key or ""
    table = store.get_table()
    _copy_at(key, 2**62)
    guard = words.guard(table, key)
    bare_listener._apply(table, Invalidation(key, DELETED))
    assert table.get(key) is None
    assert words.guard_count(words.guard(table, key)) == words.guard_count(guard) + 1


def test_no_copy_still_moves_the_guard(bare_listener: Listener) -> None:
    key = saved(a=1).session_key or ""
    table = store.get_table()
    table.delete(key)
    guard = words.guard(table, key)
    bare_listener._apply(table, Invalidation(key, 3))
    assert table.get(key) is None
    assert words.guard_count(words.guard(table, key)) == words.guard_count(guard) + 1


def _send(l2_kind: str, key: str, version: int) -> None:
    """An invalidation as L2 itself delivers it (Redis PUBLISH, PostgreSQL NOTIFY)."""
    from django.conf import settings

    l2 = settings.SHMSESSION["L2"]
    payload = f"{version} {key}"
    if l2_kind == "redis":
        client = redis.Redis.from_url(l2["LOCATION"])
        client.publish(f"{l2['KEY_PREFIX']}_invalidate", payload)
        client.close()
    else:
        with connections[PG_ALIAS].cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [l2["CHANNEL"], payload])


def test_late_invalidation_through_l2_keeps_the_newer_copy(
    l2_kind: str, listener: ListenerThread
) -> None:
    """The self-invalidation a lagging listener caused: its host's worker stored v2, then the
    listener received v1. The copy stays (the next request is an L1 hit); a later version
    sent the same way still drops it."""
    s = saved(n=1)
    key = s.session_key or ""
    s["n"] = 2
    s.save()
    newest = held_version(key)
    table = store.get_table()
    assert newest is not None, (
        f"the save left no copy: guard drops {counters.snapshot()['guard_drops']}, "
        f"L2 version {get_l2().version(key)}, flushes {table.read_app_word(words.FLUSHES)}"
    )
    seen = table.read_app_word(words.INVALIDATIONS)
    _send(l2_kind, key, newest - 1)
    wait_for(lambda: table.read_app_word(words.INVALIDATIONS) > seen, "the old invalidation")
    assert held_version(key) == newest
    assert SessionStore(key).load() == {"n": 2}
    _send(l2_kind, key, newest + 1)
    wait_for(lambda: table.get(key) is None, "the newer invalidation to drop the copy", 2)


def test_fill_after_a_miss_does_not_overwrite_a_copy_stored_meanwhile(l2_kind: str) -> None:
    """A worker read L2 (old version) on a miss; a save on this host stored a newer copy
    before the fill finished: the fill must not put the older version over it."""
    key = saved(n=1).session_key or ""
    table = store.get_table()
    old = get_l2().fetch(key)
    assert old is not None
    before = words.guard(table, key)
    table.delete(key)
    newer = SessionStore(key)
    newer["n"] = 2
    newer.save()  # stores its copy in L1
    stored = held_version(key)
    assert stored is not None
    assert stored > old.version
    record = L2Record(old.version, old.payload, old.expires_at)
    data = SessionStore(key)._filled(table, key, record, time.time(), before, absent=True)
    assert data == {"n": 1}  # what this request read, as Django would serve it
    assert held_version(key) == stored


def test_postgres_poll_returns_what_came_during_the_heartbeat(db_tiered: str) -> None:
    """poll waits in select(); a NOTIFY that psycopg read while the heartbeat's query ran is
    no longer on the socket, and must still come out of the next poll at once."""
    from django.conf import settings

    from django_shmsession.tiered.db_l2 import PostgresSubscription

    sub = get_l2().subscribe()
    assert isinstance(sub, PostgresSubscription)
    try:
        assert sub.poll(0.05) == []
        channel = settings.SHMSESSION["L2"]["CHANNEL"]
        with connections[PG_ALIAS].cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [channel, "5 somekey"])
        time.sleep(0.2)  # delivered to the LISTEN connection's socket
        sub.ping()  # reads it off the socket while waiting for SELECT 1
        started = time.monotonic()
        assert sub.poll(5.0) == [Invalidation("somekey", 5)]
        assert time.monotonic() - started < 1.0
    finally:
        sub.close()


def test_revalidation_does_not_overwrite_a_copy_saved_meanwhile(l2_kind: str) -> None:
    """A read revalidated copy v with L2 (still v); meanwhile a save on this host stored v+1:
    refreshing the copy's confirmation time must not put v back over it."""
    key = saved(n=1).session_key or ""
    table = store.get_table()
    copy = codec.decode(table.get(key) or b"")
    assert copy is not None
    newer = SessionStore(key)
    newer["n"] = 2
    newer.save()
    stored = held_version(key)
    assert stored is not None
    assert stored != copy.version
    data = SessionStore(key)._after_revalidation(table, key, copy, copy.version, time.time())
    assert data == {"n": 1}
    assert held_version(key) == stored
