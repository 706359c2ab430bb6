"""The tiered engine on a real Redis: L2 is the truth, L1 a host-wide copy that is never wrong
for longer than the rules allow."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from django.contrib.sessions.backends.base import CreateError, UpdateError

from django_shmsession import store
from django_shmsession.tiered import codec, counters, words
from django_shmsession.tiered.config import L2Config
from django_shmsession.tiered.engine import SessionStore
from django_shmsession.tiered.l2 import REFRESH_LIMIT, L2Unavailable
from django_shmsession.tiered.redis_l2 import RedisL2

from .conftest import ListenerThread, wait_for
from .l2servers import RedisServer

pytestmark = pytest.mark.usefixtures("redis_tiered")


def l2_client(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def saved(**data: Any) -> SessionStore:
    s = SessionStore()
    for k, v in data.items():
        s[k] = v
    s.save()
    return s


def test_save_writes_l2_then_l1(redis_server: RedisServer, redis_tiered: str) -> None:
    s = saved(a=1)
    assert s.session_key is not None
    stored = l2_client(redis_server).hgetall(redis_tiered + s.session_key)
    assert stored[b"d"] == b'{"a":1}'
    copy = codec.decode(store.get_table().get(s.session_key) or b"")
    assert copy is not None
    assert copy.version == int(stored[b"v"])
    assert copy.payload == b'{"a":1}'


def test_must_create_is_atomic_in_l2(redis_server: RedisServer, redis_tiered: str) -> None:
    s = saved(a=1)
    key = s.session_key
    store.get_table().clear()  # another host's L1 knows nothing of the key
    other = SessionStore(key)
    other["b"] = 2
    with pytest.raises(CreateError):
        other.save(must_create=True)
    assert SessionStore(key).load() == {"a": 1}


def test_update_of_a_session_deleted_in_l2_is_refused(
    redis_server: RedisServer, redis_tiered: str
) -> None:
    s = saved(a=1)
    key = s.session_key
    assert key is not None
    s2 = SessionStore(key)
    assert s2["a"] == 1
    l2_client(redis_server).delete(redis_tiered + key)  # deleted by another host
    s2["a"] = 2
    with pytest.raises(UpdateError):
        s2.save()
    assert not l2_client(redis_server).exists(redis_tiered + key)  # never resurrected
    assert store.get_table().get(key) is None


def test_trusted_hit_needs_listener(settings: Any, listener: ListenerThread) -> None:
    s = saved(a=1)
    before = counters.snapshot()
    assert SessionStore(s.session_key).load() == {"a": 1}
    after = counters.snapshot()
    assert after["l1_hits"] == before["l1_hits"] + 1
    assert after["revalidations"] == before["revalidations"]


def test_without_listener_every_read_is_revalidated() -> None:
    s = saved(a=1)
    assert not words.listener_up(store.get_table())
    before = counters.snapshot()
    assert SessionStore(s.session_key).load() == {"a": 1}
    after = counters.snapshot()
    assert after["revalidations"] == before["revalidations"] + 1
    assert after["l1_hits"] == before["l1_hits"]


def test_stale_copy_after_max_staleness_is_revalidated(
    settings: Any, listener: ListenerThread
) -> None:
    settings.SHMSESSION = {**settings.SHMSESSION, "MAX_STALENESS": 0.2}
    wait_for(lambda: words.listener_up(store.get_table()), "the listener")
    s = saved(a=1)
    time.sleep(0.25)
    before = counters.snapshot()
    assert SessionStore(s.session_key).load() == {"a": 1}
    assert counters.snapshot()["revalidations"] == before["revalidations"] + 1
    copy = codec.decode(store.get_table().get(s.session_key) or b"")
    assert copy is not None
    assert time.time() - copy.confirmed_at < 0.2


def test_change_behind_l1s_back_is_seen_after_max_staleness(
    settings: Any, redis_server: RedisServer, redis_tiered: str, listener: ListenerThread
) -> None:
    """A write that bypassed our scripts (no invalidation) is honoured within MAX_STALENESS."""
    settings.SHMSESSION = {**settings.SHMSESSION, "MAX_STALENESS": 0.3}
    wait_for(lambda: words.listener_up(store.get_table()), "the listener")
    s = saved(a=1)
    client = l2_client(redis_server)
    client.hset(redis_tiered + s.session_key, mapping={"v": 999999, "d": b'{"a":2}'})
    deadline = time.monotonic() + 0.3 + 0.2
    while SessionStore(s.session_key).load() != {"a": 2}:
        assert time.monotonic() < deadline, "a stale copy outlived MAX_STALENESS"
        time.sleep(0.01)


def other_host(redis_server: RedisServer, prefix: str) -> RedisL2:
    """Another host's client of the same Redis and key space."""
    return RedisL2(L2Config(backend="redis", location=redis_server.url, key_prefix=prefix))


def test_invalidation_refreshes_other_hosts_copies(
    redis_server: RedisServer, redis_tiered: str, listener: ListenerThread
) -> None:
    s = saved(a=1)
    key = s.session_key
    assert key is not None
    # Another host updates: a version this host's copy does not have, and its copy.
    version = other_host(redis_server, redis_tiered).update(key, b'{"a":3}', time.time() + 60)
    assert version is not None
    wait_for(
        lambda: codec.version_of(store.get_table().get(key)) == version,
        "the invalidation to refresh the copy",
        2,
    )
    hits = counters.snapshot()["l1_hits"]
    assert SessionStore(key).load() == {"a": 3}
    assert counters.snapshot()["l1_hits"] == hits + 1


def test_invalidation_of_a_session_too_large_to_carry_drops_the_copy(
    redis_server: RedisServer, redis_tiered: str, listener: ListenerThread
) -> None:
    s = saved(a=1)
    key = s.session_key
    assert key is not None
    big = ('{"a":"' + "x" * REFRESH_LIMIT + '"}').encode()
    assert other_host(redis_server, redis_tiered).update(key, big, time.time() + 60) is not None
    wait_for(lambda: store.get_table().get(key) is None, "the invalidation to drop the copy", 2)
    assert SessionStore(key).load() == {"a": "x" * REFRESH_LIMIT}


def test_own_write_keeps_its_copy(listener: ListenerThread) -> None:
    s = saved(a=1)
    s["a"] = 2
    s.save()
    time.sleep(0.3)  # the invalidation of our own write has arrived
    copy = codec.decode(store.get_table().get(s.session_key) or b"")
    assert copy is not None
    assert copy.payload == b'{"a":2}'


def test_delete_goes_to_l2_first(redis_server: RedisServer, redis_tiered: str) -> None:
    s = saved(a=1)
    key = s.session_key
    s.delete()
    assert not l2_client(redis_server).exists(redis_tiered + key)
    assert store.get_table().get(key) is None
    assert SessionStore(key).load() == {}


def test_l1_lost_warms_from_l2() -> None:
    s = saved(a=1)
    store.get_table().clear()
    assert SessionStore(s.session_key).load() == {"a": 1}
    assert store.get_table().get(s.session_key) is not None


def test_cycle_key_and_flush(redis_server: RedisServer, redis_tiered: str) -> None:
    s = saved(a=1)
    old = s.session_key
    s.cycle_key()
    assert s.session_key != old
    assert not l2_client(redis_server).exists(redis_tiered + old)
    assert SessionStore(s.session_key).load() == {"a": 1}
    new = s.session_key
    s.flush()
    assert s.session_key is None
    assert not l2_client(redis_server).exists(redis_tiered + new)


def test_expiry_is_kept_in_l2(redis_server: RedisServer, redis_tiered: str) -> None:
    s = SessionStore()
    s.set_expiry(100)
    s.save()
    ttl = l2_client(redis_server).pttl(redis_tiered + s.session_key)
    assert 98_000 < ttl <= 100_000


@pytest.mark.slow
def test_l2_down_saves_raise_fresh_reads_go_on(settings: Any) -> None:
    """Redis stopped: saves raise naming Redis and its URL; a fresh copy is still served within
    MAX_STALENESS, an older one raises; after the restart everything works again."""
    server = RedisServer().start()
    try:
        settings.SHMSESSION = {
            **settings.SHMSESSION,
            "L2": {"BACKEND": "redis", "LOCATION": server.url},
            "MAX_STALENESS": 1.0,
        }
        s = saved(a=1)
        server.stop()
        assert SessionStore(s.session_key).load() == {"a": 1}  # confirmed < 1 s ago
        s["a"] = 2
        with pytest.raises(L2Unavailable, match=f"Redis at {server.url}"):
            s.save()
        with pytest.raises(L2Unavailable, match="Nothing was written"):
            SessionStore().save()
        with pytest.raises(L2Unavailable):
            SessionStore(s.session_key).delete()
        time.sleep(1.05)
        with pytest.raises(L2Unavailable):
            SessionStore(s.session_key).load()
        server.start()
        # Without persistence the restarted Redis is empty: the session is gone for everyone.
        assert SessionStore(s.session_key).load() == {}
        t = saved(b=1)
        assert SessionStore(t.session_key).load() == {"b": 1}
    finally:
        server.cleanup()


def test_bad_location_names_it(settings: Any) -> None:
    settings.SHMSESSION = {
        **settings.SHMSESSION,
        "L2": {"BACKEND": "redis", "LOCATION": "redis://:secret@127.0.0.1:1/0"},
    }
    with pytest.raises(L2Unavailable) as info:
        saved(a=1)
    assert "Redis at redis://:***@127.0.0.1:1/0" in str(info.value)
    assert "secret" not in str(info.value)


def test_every_store_operation_is_the_tiered_engines_own() -> None:
    """The tiered engine inherits helpers from the plain one; an inherited store operation
    would write the table only (a success that never reached L2), so each is overridden."""
    from django_shmsession import backend

    for name in (
        "load",
        "exists",
        "create",
        "save",
        "delete",
        "clear_expired",
        "aload",
        "aexists",
        "acreate",
        "asave",
        "adelete",
        "aclear_expired",
    ):
        ours = getattr(SessionStore, name)
        plain = getattr(backend.SessionStore, name)
        assert getattr(ours, "__func__", ours) is not getattr(plain, "__func__", plain), name


def test_create_goes_to_l2(redis_server: RedisServer, redis_tiered: str) -> None:
    s = SessionStore()
    s.create()
    assert l2_client(redis_server).exists(redis_tiered + (s.session_key or ""))
