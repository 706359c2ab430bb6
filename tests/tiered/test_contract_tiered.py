"""The session-store contract (tests/engine/test_contract.py: the behaviours of Django's
SessionTestsMixin, written for this project) run against the tiered engine on real Redis and,
with the db L2, on real PostgreSQL: every class of that module, with its ``SessionStore``
replaced by the tiered one for the duration of each test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from asgiref.sync import sync_to_async
from django.contrib.sessions.backends.base import UpdateError
from django.core import signing
from django.db import connections

from django_shmsession.tiered.engine import SessionStore as TieredStore
from django_shmsession.tiered.runtime import get_l2
from tests.engine import test_contract as contract
from tests.engine.test_contract import (  # noqa: F401 - collected here against the tiered engine
    TestAsync,
    TestDictApi,
    TestExpiry,
    TestKeys,
    TestSessionBaseShortcuts,
    session,
)


@pytest.fixture(autouse=True, params=["redis", "db"])
def tiered_engine(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    request.getfixturevalue("redis_tiered" if request.param == "redis" else "db_tiered")
    monkeypatch.setattr(contract, "SessionStore", TieredStore)
    monkeypatch.setattr(contract, "asyncio", SimpleNamespace(run=run_as_a_request))
    return str(request.param)


def run_as_a_request(coro: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run``, then close the database connections the async ORM opened in this
    context, as Django's handler does at the end of an async request (request_finished)."""

    async def request() -> Any:
        try:
            return await coro
        finally:
            await sync_to_async(connections.close_all)()

    return asyncio.run(request())


class TestConcurrencySemantics(contract.TestConcurrencySemantics):
    def test_save_after_expiry_raises_update_error(  # type: ignore[override]
        self,
        session: TieredStore,  # noqa: F811 - the imported fixture, requested by name
        request: Any,
    ) -> None:
        """Expired in L2 (the truth), not only in L1 as the plain engine's version backdates."""
        session.set_expiry(60)
        session.save()
        key = session.session_key
        assert key is not None
        _expire_in_l2(request, key)
        session["y"] = 1
        with pytest.raises(UpdateError):
            session.save()
        assert TieredStore(key).load() == {}


def _expire_in_l2(request: Any, key: str) -> None:
    if request.node.callspec.params["tiered_engine"] == "redis":
        server = request.getfixturevalue("redis_server")
        prefix = request.getfixturevalue("redis_tiered")
        redis.Redis.from_url(server.url).pexpire(prefix + key, 1)
        time.sleep(0.01)
    else:
        alias = request.getfixturevalue("pg_database")
        with connections[alias].cursor() as cursor:
            cursor.execute(
                "UPDATE django_session SET expire_date = now() - interval '1 second' "
                "WHERE session_key = %s",
                [key],
            )


class TestDefaultSerializer(contract.TestDefaultSerializer):
    def test_old_sessions_load_and_old_workers_read_new_ones(self) -> None:
        """What L2 holds is the serializer's bytes: Django's JSONSerializer reads ours and we
        read its (the plain engine's version of this test writes into the table directly)."""
        value = {"name": "Zoë 😀", "n": 2**70, "f": 1e16, "l": [None, True, "x"], "d": {"k": 1}}
        old_key = "oldworker" + "0" * 23
        assert get_l2().create(old_key, signing.JSONSerializer().dumps(value), time.time() + 60)
        assert dict(TieredStore(old_key).items()) == value
        for plain in (value, {"ascii": "only", "n": 1}):
            s = TieredStore()
            s.update(plain)
            s.save()
            record = get_l2().fetch(s.session_key or "")
            assert record is not None
            assert record.payload.isascii()
            assert signing.JSONSerializer().loads(record.payload) == plain
            s.delete()
        TieredStore().delete(old_key)


class TestPersistence(contract.TestPersistence):
    def test_clear_expired_classmethod(  # type: ignore[override]
        self,
        session: TieredStore,  # noqa: F811 - the imported fixture, requested by name
    ) -> None:
        """The plain engine's version counts table entries; L1 also holds the processes'
        published counters (hoststats), so look at the two sessions themselves."""
        session["x"] = 1
        session.set_expiry(-1)
        session.save()
        dead = session.session_key or ""
        live = TieredStore()
        live.save()
        TieredStore.clear_expired()
        assert get_l2().fetch(dead) is None
        assert contract.store.get_table().get(dead) is None
        assert live.exists(live.session_key)
