"""Django's session-store contract (the behaviours of Django's SessionTestsMixin) on our engine.

Written for this project, following the behaviours Django's own backends are tested for:
dict API flags, save/load/delete/exists, flush, cycle_key, custom expiry, must_create, no
resurrection of a session deleted elsewhere, invalid keys, and the async variants.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import django
import pytest
from django.conf import settings
from django.contrib.sessions.backends.base import CreateError, UpdateError
from django.core import signing
from django.utils import timezone

from django_shmsession import store
from django_shmsession.backend import SessionStore

needs_async = pytest.mark.skipif(
    django.VERSION < (5, 1), reason="SessionBase async methods exist from Django 5.1"
)


@pytest.fixture
def session() -> Iterator[SessionStore]:
    s = SessionStore()
    yield s
    s.delete()


def reload(key: str | None) -> SessionStore:
    """A second store on the same key, as the next request (maybe in another worker) gets."""
    return SessionStore(key)


class TestDictApi:
    def test_new_session_is_untouched(self, session: SessionStore) -> None:
        assert not session.modified
        assert not session.accessed

    def test_get_empty(self, session: SessionStore) -> None:
        assert session.get("cat") is None

    def test_store_and_pop(self, session: SessionStore) -> None:
        session["cat"] = "dog"
        assert session.modified
        assert session.pop("cat") == "dog"
        assert session.get("cat") is None

    def test_pop_default_does_not_modify(self, session: SessionStore) -> None:
        assert session.pop("missing", "dflt") == "dflt"
        assert session.accessed
        assert not session.modified

    def test_pop_no_default_raises(self, session: SessionStore) -> None:
        with pytest.raises(KeyError):
            session.pop("missing")

    def test_setdefault(self, session: SessionStore) -> None:
        assert session.setdefault("foo", "bar") == "bar"
        assert session.setdefault("foo", "baz") == "bar"
        assert session.modified

    def test_update(self, session: SessionStore) -> None:
        session.update({"k": 1})
        assert session.modified
        assert session.get("k") == 1

    def test_contains_marks_accessed_only(self, session: SessionStore) -> None:
        session["k"] = 1
        session.modified = session.accessed = False
        assert "k" in session
        assert session.accessed
        assert not session.modified

    def test_keys_values_items(self, session: SessionStore) -> None:
        session["x"] = 1
        assert list(session.keys()) == ["x"]
        assert list(session.values()) == [1]
        assert list(session.items()) == [("x", 1)]

    def test_clear(self, session: SessionStore) -> None:
        session["x"] = 1
        session.modified = session.accessed = False
        session.clear()
        assert list(session.items()) == []
        assert session.accessed
        assert session.modified


def test_init_sets_what_django_sets() -> None:
    """Our __init__ skips SessionBase's; it must still set every attribute Django's sets."""
    from django.contrib.sessions.backends.base import SessionBase

    ours, django_base = SessionStore("abcdefgh12"), SessionBase("abcdefgh12")
    assert set(vars(ours)) == set(vars(django_base))
    assert ours.serializer is django_base.serializer
    assert ours.session_key == django_base.session_key


def test_serializer_setting_change_is_picked_up(settings: Any) -> None:
    settings.SESSION_SERIALIZER = "tests.engine.test_contract.TaggingSerializer"
    s = SessionStore()
    s["a"] = 1
    s.save()
    assert store.get_table().get(s.session_key or "") == b'TAG{"a":1}'
    assert SessionStore(s.session_key)["a"] == 1


class TaggingSerializer:
    """A JSON serializer that marks its bytes, to see which serializer the engine used."""

    def dumps(self, obj: object) -> bytes:
        return b"TAG" + json.dumps(obj, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> object:
        return json.loads(data[3:])


class TestPersistence:
    def test_save_then_exists(self, session: SessionStore) -> None:
        session.save()
        assert session.session_key is not None
        assert session.exists(session.session_key)

    def test_save_then_load_in_new_store(self, session: SessionStore) -> None:
        session["a"] = {"nested": [1, 2, "three"]}
        session.save()
        other = reload(session.session_key)
        assert other["a"] == {"nested": [1, 2, "three"]}
        assert other.session_key == session.session_key

    def test_save_does_not_clear_data(self, session: SessionStore) -> None:
        session["a"] = "b"
        session.save()
        assert session["a"] == "b"

    def test_update_is_visible(self, session: SessionStore) -> None:
        session["n"] = 1
        session.save()
        second = reload(session.session_key)
        second["n"] = 2
        second.save()
        assert reload(session.session_key)["n"] == 2

    def test_delete(self, session: SessionStore) -> None:
        session.save()
        key = session.session_key
        session.delete(key)
        assert not session.exists(key)

    def test_delete_without_key_is_noop(self) -> None:
        SessionStore().delete()  # no key: nothing to delete, must not raise
        assert SessionStore().session_key is None

    def test_flush(self, session: SessionStore) -> None:
        session["foo"] = "bar"
        session.save()
        old = session.session_key
        session.flush()
        assert not session.exists(old)
        assert session.session_key != old
        assert session.modified
        assert session.accessed

    def test_cycle_key(self, session: SessionStore) -> None:
        session["a"], session["b"] = "c", "d"
        session.save()
        old = session.session_key
        items = list(session.items())
        session.cycle_key()
        assert session.session_key != old
        assert not session.exists(old)
        assert list(session.items()) == items
        session.save()
        assert dict(reload(session.session_key).items()) == dict(items)

    def test_cycle_key_of_unsaved_session(self, session: SessionStore) -> None:
        session["a"] = 1
        session.cycle_key()
        assert session.session_key is not None
        assert session["a"] == 1

    def test_load_does_not_create_record(self) -> None:
        s = SessionStore("someunknownkey123")
        s.load()
        assert s.session_key is None
        assert not s.exists("someunknownkey123")

    def test_load_of_missing_key_gives_new_key_on_save(self) -> None:
        s = SessionStore("unknownkey0000000")
        s["x"] = 1
        s.save()
        assert s.session_key not in (None, "unknownkey0000000")
        assert not s.exists("unknownkey0000000")
        s.delete()

    def test_create_makes_empty_saved_session(self) -> None:
        s = SessionStore()
        s.create()
        assert s.exists(s.session_key)
        assert reload(s.session_key).load() == {}
        assert s.modified
        s.delete()

    def test_clear_expired_classmethod(self, session: SessionStore) -> None:
        session["x"] = 1
        session.set_expiry(-1)
        session.save()
        live = SessionStore()
        live.save()
        SessionStore.clear_expired()
        assert store.get_table().stats().entries == 1
        assert live.exists(live.session_key)


class TestConcurrencySemantics:
    def test_must_create_on_existing_key_raises_create_error(self, session: SessionStore) -> None:
        session.save()
        clash = SessionStore(session.session_key)
        with pytest.raises(CreateError):
            clash.save(must_create=True)

    def test_save_after_delete_elsewhere_raises_update_error(self, session: SessionStore) -> None:
        session["x"] = 1
        session.save()
        reload(session.session_key).delete()
        session["x"] = 2
        with pytest.raises(UpdateError):
            session.save()
        assert not session.exists(session.session_key)  # not resurrected

    def test_save_of_a_vanished_key_raises_update_error_not_type_error(self) -> None:
        """``SessionStore(key).save()`` loads first; a key that is gone must not be revived (nor
        crash the table with a None key)."""
        ghost = SessionStore("a" * 32)
        with pytest.raises(UpdateError):
            ghost.save()
        assert not SessionStore("a" * 32).exists("a" * 32)

    def test_save_after_expiry_raises_update_error(self, session: SessionStore) -> None:
        session.set_expiry(1)
        session.save()
        key = session.session_key
        # Backdate the entry: write it expired, as if its second had passed.
        table = store.get_table()
        table.replace(key, table.get(key) or b"{}", time.time() - 1)
        session["y"] = 1
        with pytest.raises(UpdateError):
            session.save()
        assert not session.exists(key)

    def test_create_retries_on_key_collision(
        self, session: SessionStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        session.save()
        taken = session.session_key
        fresh = iter([taken, "freshkey0000000000000000000000aa"])
        monkeypatch.setattr("django_shmsession.keys.new_session_key", lambda: next(fresh))
        s = SessionStore()
        s.create()
        assert s.session_key == "freshkey0000000000000000000000aa"
        s.delete()


class TestKeys:
    def test_session_key_is_read_only(self, session: SessionStore) -> None:
        with pytest.raises(AttributeError):
            session.session_key = "abcdefgh12345678"  # type: ignore[misc]

    @pytest.mark.parametrize(
        "bad",
        [
            "",
            "1",
            "short",
            "x" * 65,
            "UPPERCASEKEY1234",
            "../../etc/passwd",
            "key with space",
            "ключключключключ",
            "a" * 10_000,
            "abc\x00defghij",
        ],
    )
    def test_invalid_cookie_key_is_an_absent_session(self, bad: str) -> None:
        s = SessionStore(bad)
        assert s.session_key is None
        assert s.load() == {}
        assert not s.exists(bad)
        s.delete(bad)  # must not raise either
        s["cat"] = "x"
        s.save()
        assert s.session_key != bad
        s.delete()

    def test_valid_custom_key_is_accepted_and_stored(self) -> None:
        s = SessionStore()
        s._session_key = "12345678"
        assert s.session_key == "12345678"
        s.save(must_create=True)
        assert s.exists("12345678")
        assert reload("12345678").session_key == "12345678"
        s.delete()

    def test_generated_key_shape(self, session: SessionStore) -> None:
        session.save()
        key = session.session_key
        assert key is not None
        assert len(key) == 32
        assert set(key) <= set("abcdefghijklmnopqrstuvwxyz0123456789")


class TestExpiry:
    def test_default_expiry(self, session: SessionStore) -> None:
        assert session.get_expiry_age() == settings.SESSION_COOKIE_AGE
        session.set_expiry(0)
        assert session.get_expiry_age() == settings.SESSION_COOKIE_AGE

    def test_custom_expiry_seconds(self, session: SessionStore) -> None:
        now = timezone.now()
        session.set_expiry(10)
        assert session.get_expiry_date(modification=now) == now + timedelta(seconds=10)
        assert session.get_expiry_age(modification=now) == 10

    def test_custom_expiry_timedelta(
        self, session: SessionStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        now = timezone.now()
        monkeypatch.setattr(timezone, "now", lambda: now)
        session.set_expiry(timedelta(seconds=10))
        assert session.get_expiry_date(modification=now) == now + timedelta(seconds=10)
        assert session.get_expiry_age(modification=now) == 10

    def test_custom_expiry_datetime(self, session: SessionStore) -> None:
        now = timezone.now()
        session.set_expiry(now + timedelta(seconds=10))
        assert session.get_expiry_date(modification=now) == now + timedelta(seconds=10)
        assert session.get_expiry_age(modification=now) == 10

    def test_custom_expiry_reset(self, session: SessionStore) -> None:
        session.set_expiry(None)
        session.set_expiry(10)
        session.set_expiry(None)
        assert session.get_expiry_age() == settings.SESSION_COOKIE_AGE

    @pytest.mark.parametrize("at_close", [False, True])
    def test_expire_at_browser_close(
        self, session: SessionStore, settings: Any, at_close: bool
    ) -> None:
        settings.SESSION_EXPIRE_AT_BROWSER_CLOSE = at_close
        session.set_expiry(10)
        assert session.get_expire_at_browser_close() is False
        session.set_expiry(0)
        assert session.get_expire_at_browser_close() is True
        session.set_expiry(None)
        assert session.get_expire_at_browser_close() is at_close

    @pytest.mark.parametrize(
        "expiry", [-10, timedelta(seconds=-10), "past-datetime"], ids=["int", "timedelta", "dt"]
    )
    def test_past_expiry_expires_instantly(self, session: SessionStore, expiry: Any) -> None:
        if expiry == "past-datetime":
            expiry = timezone.now() - timedelta(seconds=10)
        session["foo"] = "bar"
        session.set_expiry(expiry)
        session.save()
        other = reload(session.session_key)
        assert "foo" not in other
        assert other.session_key is None

    def test_table_expiry_follows_expiry_age(self, session: SessionStore) -> None:
        session.set_expiry(300)
        session.save()
        assert reload(session.session_key).get_expiry_age() == 300
        now = time.time()
        assert _alive_at(session, now + 290)
        assert not _alive_at(session, now + 310)

    def test_table_expiry_default_is_cookie_age(self, session: SessionStore) -> None:
        session["x"] = 1
        session.save()
        now, age = time.time(), settings.SESSION_COOKIE_AGE
        assert _alive_at(session, now + age - 10)
        assert not _alive_at(session, now + age + 10)

    def test_expiry_datetime_survives_round_trip(self, session: SessionStore) -> None:
        when = timezone.now() + timedelta(days=2)
        session.set_expiry(when)
        session.save()
        assert reload(session.session_key).get_expiry_date() == when


def _alive_at(session: SessionStore, when: float) -> bool:
    """Whether the table still holds the session at wall-clock ``when`` (a second handle on the
    same segment with a fake clock: the expiry the engine wrote, seen from the future)."""
    from django_shmsession.table import SessionTable

    config = store.conf.get_config()
    table = SessionTable(config.name, config.size, clock=lambda: when)
    try:
        return table.exists(session.session_key or "")
    finally:
        table.close()


@needs_async
class TestAsync:
    def test_async_save_load_exists_delete(self) -> None:
        async def scenario() -> None:
            s = SessionStore()
            await s.aset("k", "v")
            await s.asave()
            key = s.session_key
            assert await s.aexists(key)
            other = SessionStore(key)
            assert await other.aget("k") == "v"
            await s.adelete()
            assert not await s.aexists(key)

        asyncio.run(scenario())

    def test_async_create_and_must_create(self) -> None:
        async def scenario() -> None:
            s = SessionStore()
            await s.acreate()
            assert await s.aexists(s.session_key)
            with pytest.raises(CreateError):
                await SessionStore(s.session_key).asave(must_create=True)
            await s.adelete()

        asyncio.run(scenario())

    def test_async_update_error_no_resurrection(self) -> None:
        async def scenario() -> None:
            s = SessionStore()
            await s.aset("x", 1)
            await s.asave()
            await SessionStore(s.session_key).adelete()
            await s.aset("x", 2)
            with pytest.raises(UpdateError):
                await s.asave()
            assert not await s.aexists(s.session_key)

        asyncio.run(scenario())

    def test_async_cycle_and_flush(self) -> None:
        async def scenario() -> None:
            s = SessionStore()
            await s.aset("a", 1)
            await s.asave()
            old = s.session_key
            await s.acycle_key()
            assert s.session_key != old
            assert await s.aget("a") == 1
            assert not await s.aexists(old)
            await s.asave()
            key = s.session_key
            await s.aflush()
            assert s.session_key is None
            assert not await s.aexists(key)

        asyncio.run(scenario())

    def test_async_load_missing_drops_key(self) -> None:
        async def scenario() -> None:
            s = SessionStore("missingmissing00")
            assert await s.aload() == {}
            assert s.session_key is None

        asyncio.run(scenario())

    def test_async_expiry(self) -> None:
        async def scenario() -> None:
            s = SessionStore()
            await s.aset_expiry(timedelta(seconds=-5))
            await s.aset("x", 1)
            await s.asave()
            assert await SessionStore(s.session_key).aget("x") is None

        asyncio.run(scenario())

    def test_async_clear_expired(self) -> None:
        async def scenario() -> None:
            s = SessionStore()
            await s.aset_expiry(-5)
            await s.asave()
            await SessionStore.aclear_expired()

        asyncio.run(scenario())
        assert store.get_table().stats().entries == 0


def test_set_expiry_datetime_is_stored_as_iso_string() -> None:
    """set_expiry accepts aware datetimes; the stored value is an ISO string (JSON-safe)."""
    s = SessionStore()
    when = datetime(2099, 1, 1, tzinfo=timezone.get_current_timezone())
    s.set_expiry(when)
    assert s["_session_expiry"] == when.isoformat()


class TestDefaultSerializer:
    """Django's JSONSerializer is run by django_shmsession.serializers (C); others as they are."""

    def test_default_serializer_takes_the_fast_path(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from django_shmsession import serializers

        calls: list[str] = []
        dumps, loads = serializers.dumps, serializers.loads

        def spy_dumps(obj: Any) -> bytes:
            calls.append("dumps")
            return dumps(obj)

        def spy_loads(data: bytes) -> Any:
            calls.append("loads")
            return loads(data)

        monkeypatch.setattr(serializers, "dumps", spy_dumps)
        monkeypatch.setattr(serializers, "loads", spy_loads)
        s = SessionStore()
        s["a"] = 1
        s.save()
        assert SessionStore(s.session_key)["a"] == 1
        assert calls == ["dumps", "loads"]

    @pytest.mark.parametrize(
        "path",
        [
            "django.core.signing.JSONSerializer",
            "django.contrib.sessions.serializers.JSONSerializer",
        ],
    )
    def test_either_name_of_djangos_serializer_is_the_default(
        self, settings: Any, path: str
    ) -> None:
        settings.SESSION_SERIALIZER = path
        assert SessionStore().serializer is signing.JSONSerializer

    def test_old_sessions_load_and_old_workers_read_new_ones(self) -> None:
        """Rolling upgrade: bytes written by Django's serializer (the engine before msgspec)
        load here, and what the engine writes now loads with Django's serializer."""
        value = {"name": "Zoë 😀", "n": 2**70, "f": 1e16, "l": [None, True, "x"], "d": {"k": 1}}
        table = store.get_table()
        old_key = "oldworker" + "0" * 23
        table.add(old_key, signing.JSONSerializer().dumps(value), time.time() + 60)
        assert SessionStore(old_key)["name"] == "Zoë 😀"
        assert dict(SessionStore(old_key).items()) == value
        for plain in (value, {"ascii": "only", "n": 1}):
            s = SessionStore()
            s.update(plain)
            s.save()
            blob = table.get(s.session_key or "")
            assert blob is not None
            assert blob.isascii()
            assert signing.JSONSerializer().loads(blob) == plain
            s.delete()

    @pytest.mark.parametrize(
        "bad",
        [datetime(2020, 1, 1), b"bytes", {1, 2}, Decimal("1.5"), object()],
        ids=["datetime", "bytes", "set", "decimal", "object"],
    )
    def test_values_django_refuses_are_refused(self, session: SessionStore, bad: Any) -> None:
        session["bad"] = {"nested": [bad]}
        with pytest.raises(TypeError):
            session.save()

    def test_non_str_keys_become_strings_as_with_django(self, session: SessionStore) -> None:
        session["d"] = {1: "a", None: "b", 2.5: "c", False: "d", "1": "e"}
        session.save()
        # json writes "1" twice; the later one wins when read, as with any Django engine.
        assert reload(session.session_key)["d"] == {"1": "e", "null": "b", "2.5": "c", "false": "d"}


class TestSessionBaseShortcuts:
    """_get_session and get_expiry_age are rewritten for speed; Django's answers must stay."""

    def test_get_session_flags_and_laziness(self, session: SessionStore) -> None:
        session["a"] = 1
        session.save()
        other = SessionStore(session.session_key)
        assert "_session_cache" not in vars(other)  # nothing loaded yet
        assert other._get_session(no_load=True) == {}  # type: ignore[attr-defined]
        assert other.accessed
        fresh = SessionStore(session.session_key)
        assert fresh._session == {"a": 1}  # type: ignore[attr-defined]
        assert fresh._get_session() is fresh._session  # type: ignore[attr-defined]
        assert not fresh.modified

    def test_is_empty_and_clear(self, session: SessionStore) -> None:
        assert session.is_empty()
        session["a"] = 1
        assert not session.is_empty()
        session.clear()
        assert session.is_empty()
        assert session.modified

    @pytest.mark.parametrize("expiry", [None, 0, 30, "datetime"])
    def test_get_expiry_age_matches_django(self, session: SessionStore, expiry: Any) -> None:
        from django.contrib.sessions.backends.base import SessionBase

        now = timezone.now()
        if expiry == "datetime":
            expiry = now + timedelta(seconds=45)
        session.set_expiry(expiry)
        base = SessionBase()
        base._session_cache = dict(session.items())  # type: ignore[attr-defined]
        assert session.get_expiry_age(modification=now) == base.get_expiry_age(modification=now)
        assert session.get_expiry_age(expiry=None) == base.get_expiry_age(expiry=None)
        assert session.get_expiry_age(expiry=7) == 7
        assert abs(session.get_expiry_age() - base.get_expiry_age()) <= 1
