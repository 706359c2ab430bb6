"""The async variants keep L2 calls off the event loop: while L2 makes a call wait, other
coroutines of the same loop keep running."""

from __future__ import annotations

import asyncio
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
