"""Fixtures for the tiered engine: real Redis and PostgreSQL servers for the whole run, a fresh
table and a fresh key space per test, and the host listener in a thread when a test wants it."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import pytest
from asgiref.sync import sync_to_async

from django_shmsession import store
from django_shmsession.table import SessionTable
from django_shmsession.tiered import codec, runtime, words
from django_shmsession.tiered import config as tiered_config
from django_shmsession.tiered.engine import SessionStore
from django_shmsession.tiered.listener import Listener, lock_path

from .l2servers import PostgresServer, RedisServer

TEST_SIZE = "1M"
PG_ALIAS = "l2pg"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.cleanup()


def unique_name() -> str:
    return f"/shmtest-{uuid4().hex[:12]}"


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = unique_name()
    yield name
    store.reset()
    runtime.reset()
    SessionTable.unlink_name(name)
    lock_path(name).unlink(missing_ok=True)


@pytest.fixture
def redis_tiered(settings: Any, shm_name: str, redis_server: RedisServer) -> Iterator[str]:
    """SESSION_ENGINE = tiered on the test Redis, with a key prefix of this test's own."""
    prefix = f"t{uuid4().hex[:10]}:"
    settings.SESSION_ENGINE = tiered_config.ENGINE
    settings.SHMSESSION = {
        "NAME": shm_name,
        "SIZE": TEST_SIZE,
        "L2": {"BACKEND": "redis", "LOCATION": redis_server.url, "KEY_PREFIX": prefix},
    }
    yield prefix
    runtime.reset()


@pytest.fixture
def pg_database(
    settings: Any, postgres_server: PostgresServer, django_db_blocker: Any
) -> Iterator[str]:
    """A DATABASES alias on the test PostgreSQL with Django's session table migrated.

    The alias is added to the running process's connection handler (pytest-django set up the
    suite's databases before this server existed); the sessions table is emptied per test.
    """
    from django.conf import settings as django_settings
    from django.core.management import call_command
    from django.db import connections

    both = {"default": dict(settings.DATABASES["default"]), PG_ALIAS: postgres_server.settings}
    entry = connections.configure_settings(both)[PG_ALIAS]
    # In place: assigning settings.DATABASES warns (Django cannot reconnect on an override).
    django_settings.DATABASES[PG_ALIAS] = entry
    connections.settings[PG_ALIAS] = entry
    with django_db_blocker.unblock():
        call_command("migrate", "sessions", database=PG_ALIAS, verbosity=0)
        call_command("migrate", "django_shmsession", database=PG_ALIAS, verbosity=0)
        with connections[PG_ALIAS].cursor() as cursor:
            cursor.execute("DELETE FROM django_session")
        yield PG_ALIAS
        connections[PG_ALIAS].close()
        # The async ORM ran in asgiref's shared thread, which holds a connection of its own.
        asyncio.run(sync_to_async(lambda: connections[PG_ALIAS].close())())
        # Connections opened inside finished asyncio.run() contexts are unreachable now (a
        # Django request closes its own at request_finished; these tests have no requests):
        # collect them here, where their "deleted while still open" warning is expected.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    del connections[PG_ALIAS]
    connections.settings.pop(PG_ALIAS, None)
    django_settings.DATABASES.pop(PG_ALIAS, None)


@pytest.fixture
def db_tiered(settings: Any, shm_name: str, pg_database: str) -> Iterator[str]:
    channel = f"t{uuid4().hex[:10]}"
    settings.SESSION_ENGINE = tiered_config.ENGINE
    settings.SHMSESSION = {
        "NAME": shm_name,
        "SIZE": TEST_SIZE,
        "L2": {"BACKEND": "db", "DATABASE": pg_database, "CHANNEL": channel},
    }
    yield channel
    runtime.reset()


@pytest.fixture(params=["redis", "db"])
def l2_kind(request: Any) -> str:
    """Each test that asks for it runs on Redis and on PostgreSQL."""
    request.getfixturevalue("redis_tiered" if request.param == "redis" else "db_tiered")
    return str(request.param)


@pytest.fixture
def bare_listener(l2_kind: str) -> Iterator[Listener]:
    """A listener object that is not running: its ``_apply`` is called directly."""
    listener = Listener()
    yield listener
    listener.l2.close()


def saved(**data: Any) -> SessionStore:
    """A new session holding ``data``, saved through the tiered engine."""
    s = SessionStore()
    s.update(data)
    s.save()
    return s


def held_version(key: str) -> int | None:
    """The version of this host's L1 copy of ``key`` (None: no copy)."""
    return codec.version_of(store.get_table().get(key))


class ListenerThread:
    """The host listener running in a thread of the test process (its own L2 connection)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.listener = Listener(self.stop)
        self.thread = threading.Thread(target=self.listener.run, daemon=True)

    def start(self) -> ListenerThread:
        self.thread.start()
        wait_for(lambda: words.listener_up(store.get_table()), "the listener to come up")
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the listener thread did not stop"


@pytest.fixture
def listener() -> Iterator[ListenerThread]:
    thread = ListenerThread().start()
    yield thread
    thread.close()


def wait_for(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
