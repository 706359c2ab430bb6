"""Signed-in users survive a flood of anonymous sessions (issue 14), through the engine.

The engine gives sessions that hold Django's authentication key the table's higher eviction
class: when the table is full, anonymous sessions are evicted first. These tests log real users
in through the test client, flood the table with many times its capacity of new anonymous
sessions (from one process, then from several at once), and check every signed-in session.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse
from django.test import Client
from django.urls import path

from django_shmsession import store
from django_shmsession.backend import SessionStore

USERS = 40


def anonymous(request: HttpRequest) -> HttpResponse:
    request.session["seen"] = True  # a new anonymous session for every client without a cookie
    return HttpResponse("ok")


def whoami(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(request.session.get("_auth_user_id", "")))


urlpatterns = [path("anon", anonymous), path("whoami", whoami)]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]


@pytest.fixture
def site(settings: Any) -> None:
    settings.ROOT_URLCONF = __name__
    settings.MIDDLEWARE = MIDDLEWARE


def signed_in_clients() -> list[tuple[Client, int]]:
    clients = []
    for i in range(USERS):
        user = User.objects.create(username=f"user{i}")  # no password: no hashing
        client = Client()
        client.force_login(user)  # login(): a real session with _auth_user_id, on our engine
        clients.append((client, user.pk))
    return clients


def table_capacity() -> int:
    return store.get_table().stats().entry_capacity


def assert_everyone_still_signed_in(clients: list[tuple[Client, int]]) -> None:
    answers = [client.get("/whoami").content.decode() for client, _pk in clients]
    assert answers == [str(pk) for _client, pk in clients]


@pytest.mark.django_db
def test_an_anonymous_flood_through_the_test_client_keeps_every_user_signed_in(
    site: None,
) -> None:
    clients = signed_in_clients()
    flood = 4 * table_capacity()
    for _ in range(flood):
        response = Client().get("/anon")
        assert response.status_code == 200
    stats = store.get_table().stats()
    assert stats.evictions >= flood - table_capacity()  # the table really overflowed
    assert stats.class_evictions[1] == 0
    assert_everyone_still_signed_in(clients)
    last = Client()
    last.get("/anon")  # and anonymous visitors still get sessions
    assert SessionStore(last.cookies["sessionid"].value).exists(last.cookies["sessionid"].value)


def flood_from_a_process(count: int) -> None:
    """Child body: create ``count`` anonymous sessions through the engine."""
    store.reset()  # a fresh handle in this process (forked from the test)
    for i in range(count):
        session = SessionStore()
        session["n"] = i
        session.create()


@pytest.mark.django_db
def test_a_flood_from_several_processes_at_once_keeps_every_user_signed_in(site: None) -> None:
    clients = signed_in_clients()
    per_process = 2 * table_capacity()
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=flood_from_a_process, args=(per_process,)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    stats = store.get_table().stats()
    assert stats.evictions >= 3 * per_process - table_capacity()
    assert stats.class_evictions[1] == 0
    assert_everyone_still_signed_in(clients)


@pytest.mark.django_db
def test_a_login_moves_a_session_to_the_signed_in_class_and_a_logout_back(site: None) -> None:
    user = User.objects.create(username="mover")
    client = Client()
    client.get("/anon")
    table = store.get_table()
    assert table.stats().class_entries[:2] == (1, 0)
    client.force_login(user)
    assert table.stats().class_entries[:2] == (0, 1)
    client.logout()
    assert table.stats().class_entries[1] == 0


@pytest.mark.slow
def test_the_issue_flood_500_signed_in_then_200000_anonymous_in_16m(settings: Any) -> None:
    """The issue's target, through the engine: SIZE 16M, 500 signed-in sessions first, then
    200,000 new anonymous sessions; every signed-in session still loads afterwards."""
    settings.SHMSESSION = {**settings.SHMSESSION, "SIZE": "16M"}
    store.reset()
    signed_in = []
    for user_id in range(500):
        session = SessionStore()
        session.update({"_auth_user_id": str(user_id), "_auth_user_backend": "x", "cart": [1]})
        session.create()
        signed_in.append(session.session_key)
    for i in range(200_000):
        session = SessionStore()
        session["visit"] = i
        session.create()
    stats = store.get_table().stats()
    assert stats.evictions > 150_000
    assert stats.class_evictions[1] == 0
    for user_id, key in enumerate(signed_in):
        assert SessionStore(key).load()["_auth_user_id"] == str(user_id)
