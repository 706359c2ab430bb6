"""Table errors reach the user with the setting to change; bad data is an absent session."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.contrib.sessions.middleware import SessionMiddleware
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory

from django_shmsession import store
from django_shmsession.backend import SessionStore
from django_shmsession.exceptions import ShmSessionError, TableFull, ValueTooLarge


def test_session_too_large_names_the_setting(settings: Any, shm_name: str) -> None:
    settings.SHMSESSION = {"NAME": shm_name, "SIZE": "1M", "MAX_SESSION_SIZE": "2K"}
    s = SessionStore()
    s["big"] = "x" * 5000
    with pytest.raises(ValueTooLarge, match=r"SHMSESSION\['MAX_SESSION_SIZE'\]") as info:
        s.save()
    assert info.value.max_size == 2048
    assert info.value.size > 5000


def test_too_large_update_keeps_the_old_value(settings: Any, shm_name: str) -> None:
    settings.SHMSESSION = {"NAME": shm_name, "SIZE": "1M", "MAX_SESSION_SIZE": "2K"}
    s = SessionStore()
    s["v"] = "small"
    s.save()
    s["v"] = "x" * 5000
    with pytest.raises(ValueTooLarge):
        s.save()
    assert SessionStore(s.session_key)["v"] == "small"


def test_full_table_with_raise_policy_names_the_settings(settings: Any, shm_name: str) -> None:
    settings.SHMSESSION = {
        "NAME": shm_name,
        "SIZE": "1M",
        "MAX_SESSION_SIZE": "64K",
        "FULL_POLICY": "raise",
    }
    saved = []
    with pytest.raises(TableFull) as info:  # noqa: PT012 - fill until it raises
        for _ in range(1000):
            s = SessionStore()
            s["blob"] = "y" * 60_000
            s.save()
            saved.append(s.session_key)
    message = str(info.value)
    assert "SHMSESSION['SIZE']" in message
    assert "FULL_POLICY" in message
    assert saved  # some fit before it was full
    assert all(SessionStore(k)["blob"] == "y" * 60_000 for k in saved)  # none damaged


def test_full_table_with_evict_policy_keeps_saving(settings: Any, shm_name: str) -> None:
    settings.SHMSESSION = {"NAME": shm_name, "SIZE": "1M", "MAX_SESSION_SIZE": "64K"}
    last = None
    for _ in range(60):
        last = SessionStore()
        last["blob"] = "z" * 60_000
        last.save()
    assert last is not None
    assert SessionStore(last.session_key)["blob"] == "z" * 60_000
    assert store.get_table().stats().evictions > 0


@pytest.mark.parametrize("blob", [b"not json", b"\xff\xfe", b"[1, 2]", b'"text"', b""])
def test_undecodable_blob_loads_empty_and_drops_key(blob: bytes) -> None:
    key = "corruptkey000000000000000000000a"
    store.get_table().set(key, blob, time.time() + 60)
    s = SessionStore(key)
    assert s.load() == {}
    assert s.session_key is None


def test_hostile_cookie_through_middleware_gets_fresh_session() -> None:
    request = RequestFactory().get("/")
    request.COOKIES["sessionid"] = "A" * 500

    def view(req: HttpRequest) -> HttpResponse:
        req.session["ok"] = 1
        return HttpResponse("ok")

    response = SessionMiddleware(view)(request)
    new_key = response.cookies["sessionid"].value
    assert new_key != "A" * 500
    assert SessionStore(new_key)["ok"] == 1


def test_middleware_does_not_swallow_too_large(settings: Any, shm_name: str) -> None:
    """A session that cannot be stored is an error response, not silent data loss."""
    settings.SHMSESSION = {"NAME": shm_name, "SIZE": "1M", "MAX_SESSION_SIZE": "1K"}

    def view(req: HttpRequest) -> HttpResponse:
        req.session["big"] = "q" * 4000
        return HttpResponse("ok")

    with pytest.raises(ValueTooLarge):
        SessionMiddleware(view)(RequestFactory().get("/"))


def test_middleware_round_trip() -> None:
    def setter(req: HttpRequest) -> HttpResponse:
        req.session["foo"] = "bar"
        return HttpResponse("ok")

    def getter(req: HttpRequest) -> HttpResponse:
        return HttpResponse(req.session.get("foo", "missing"))

    first = SessionMiddleware(setter)(RequestFactory().get("/"))
    request = RequestFactory().get("/")
    request.COOKIES["sessionid"] = first.cookies["sessionid"].value
    assert SessionMiddleware(getter)(request).content == b"bar"


def test_all_errors_share_one_base() -> None:
    assert issubclass(ValueTooLarge, ShmSessionError)
    assert issubclass(TableFull, ShmSessionError)
