"""JSON views that exercise the session; each answer names the worker pid that served it."""

from __future__ import annotations

import os

from django.http import HttpRequest, JsonResponse


def index(request: HttpRequest) -> JsonResponse:
    """`GET /`: the value of "foo" (null if unset)."""
    return JsonResponse({"foo": request.session.get("foo"), "pid": os.getpid()})


def set_values(request: HttpRequest) -> JsonResponse:
    """`GET /set` sets foo = "bar"; `GET /set?foo=x&k=y` sets each query pair instead."""
    values = request.GET.dict() or {"foo": "bar"}
    for key, value in values.items():
        request.session[key] = value
    return JsonResponse({"set": values, "pid": os.getpid()})


def get_all(request: HttpRequest) -> JsonResponse:
    """`GET /get`: the whole session."""
    return JsonResponse({"session": dict(request.session.items()), "pid": os.getpid()})


def incr(request: HttpRequest) -> JsonResponse:
    """`GET /incr`: count += 1."""
    count = int(request.session.get("count", 0)) + 1
    request.session["count"] = count
    return JsonResponse({"count": count, "pid": os.getpid()})


async def aget(request: HttpRequest) -> JsonResponse:
    """`GET /aget`: the value of "foo", read by an async view on the event loop (under ASGI).

    Django 5.1+ has ``aget``; on 4.2 the engine's own ``aload`` is awaited instead."""
    session = request.session
    if hasattr(session, "aget"):
        value = await session.aget("foo")
    else:
        value = (await session.aload()).get("foo")  # type: ignore[attr-defined]
    return JsonResponse({"foo": value, "pid": os.getpid()})


def ping(request: HttpRequest) -> JsonResponse:
    """`GET /ping`: never touches the session (the benchmarks' baseline)."""
    return JsonResponse({"pong": True, "pid": os.getpid()})


def logout(request: HttpRequest) -> JsonResponse:
    """`GET /logout`: ``session.flush()``, what ``django.contrib.auth.logout`` does."""
    request.session.flush()
    return JsonResponse({"flushed": True, "pid": os.getpid()})
