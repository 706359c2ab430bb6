"""The async variants keep L2 calls off the event loop: while L2 makes a call wait, other
coroutines of the same loop keep running."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import django
import pytest
import redis
from asgiref.sync import sync_to_async
from django.db import connections

from django_shmsession.tiered.engine import SessionStore

from .l2servers import RedisServer

pytestmark = pytest.mark.skipif(
    django.VERSION < (5, 1), reason="SessionBase async methods exist from Django 5.1"
)

PAUSE = 0.4


async def ticks_during(coro: Any) -> tuple[Any, int]:
    """Run ``coro`` beside a 10 ms ticker; how many ticks happened while it ran."""
    count = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal count
        while not done.is_set():
            await asyncio.sleep(0.01)
            count += 1

    task = asyncio.create_task(ticker())
    try:
        result = await coro
    finally:
        done.set()
        await task
    return result, count


def test_redis_calls_do_not_block_the_loop(redis_server: RedisServer, redis_tiered: str) -> None:
    s = SessionStore()
    s["a"] = 1
    s.save()
    key = s.session_key

    async def main() -> tuple[Any, int]:
        redis.Redis.from_url(redis_server.url).client_pause(int(PAUSE * 1000))
        started = time.monotonic()
        other = SessionStore(key)
        result = await ticks_during(other.asave())  # the update waits for the paused Redis
        assert time.monotonic() - started >= PAUSE * 0.8
        return result

    _, ticks = asyncio.run(main())
    assert ticks >= 10, f"the loop was blocked: {ticks} ticks in {PAUSE} s"


def test_db_calls_do_not_block_the_loop(db_tiered: str, pg_database: str) -> None:
    import psycopg

    s = SessionStore()
    s["a"] = 1
    s.save()
    key = s.session_key
    settings_dict = connections[pg_database].settings_dict
    conninfo = (
        f"host={settings_dict['HOST']} port={settings_dict['PORT']} "
        f"user={settings_dict['USER']} dbname={settings_dict['NAME']}"
    )
    holder = psycopg.connect(conninfo)
    holder.execute("SELECT 1 FROM django_session WHERE session_key = %s FOR UPDATE", [key])
    release = threading.Timer(PAUSE, holder.rollback)
    release.start()
    try:

        async def main() -> tuple[Any, int]:
            other = SessionStore(key)
            try:
                return await ticks_during(other.asave())  # waits for the row lock
            finally:
                await sync_to_async(connections.close_all)()

        _, ticks = asyncio.run(main())
    finally:
        release.join()
        holder.close()
    assert ticks >= 10, f"the loop was blocked: {ticks} ticks in {PAUSE} s"
    assert SessionStore(key).load() == {"a": 1}


def test_async_outage_raises(settings: Any, redis_tiered: str) -> None:
    from django_shmsession.tiered.l2 import L2Unavailable

    server = RedisServer().start()
    try:
        settings.SHMSESSION = {
            **settings.SHMSESSION,
            "L2": {"BACKEND": "redis", "LOCATION": server.url},
        }
        server.stop()
        with pytest.raises(L2Unavailable, match=server.url):
            asyncio.run(SessionStore().asave())
    finally:
        server.cleanup()


@pytest.mark.parametrize("engine", ["redis", "db"])
def test_l1_waits_happen_off_the_loop(request: Any, engine: str, shm_name: str) -> None:
    """The table's lock held by a frozen process: the async methods' L1 steps raise
    WouldBlock inline (SessionTable.inline) and run in a thread, so the loop keeps ticking;
    once the holder goes on, they complete with the session. Uncontended, the same calls run
    inline and take no thread."""
    from django_shmsession import store
    from tests.engine.test_nonblocking import frozen_lock_holder

    request.getfixturevalue("redis_tiered" if engine == "redis" else "db_tiered")
    request.getfixturevalue("listener")
    s = SessionStore()
    s["a"] = 1
    s.save()
    key = s.session_key or ""
    store.get_table()  # open in this process (the first open itself goes to a thread)

    async def uncontended() -> None:
        before = threading.active_count()
        assert await SessionStore(key).aload() == {"a": 1}
        assert await SessionStore(key).aexists(key)
        assert threading.active_count() == before

    asyncio.run(uncontended())

    async def contended() -> tuple[Any, int]:
        loaded = await ticks_during(SessionStore(key).aload())
        other = SessionStore(key)
        await other.aset("a", 2)
        await other.asave()
        return loaded

    with frozen_lock_holder(store.get_table().name) as holder:
        timer = threading.Timer(0.5, os.kill, (holder.pid, signal.SIGCONT))
        timer.start()
        try:
            (data, ticks) = asyncio.run(contended())
        finally:
            timer.join()
    assert data == {"a": 1}
    assert ticks >= 20, f"the loop ticked only {ticks} times while L1 waited for its lock"
    assert SessionStore(key).load() == {"a": 2}
