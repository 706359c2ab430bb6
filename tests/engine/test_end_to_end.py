"""The test project under real gunicorn (4 sync workers) and runserver, on 127.0.0.1.

Shows what the engine is for: a session set through one worker is seen by the others, survives a
worker SIGKILLed under traffic, and survives a full server restart.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from django_shmsession import store

from . import servers
from .conftest import TEST_SIZE

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ENOUGH_REQUESTS = 40
MAX_REQUESTS = 400


@pytest.fixture
def gunicorn_server(shm_name: str, tmp_path: Path) -> Iterator[servers.Server]:
    server = servers.gunicorn(shm_name, size=TEST_SIZE).start(tmp_path)
    yield server
    server.stop()


def new_session(port: int, query: str = "") -> str:
    reply = servers.request(port, f"/set{query}")
    assert reply.status == 200
    assert reply.cookie
    return reply.cookie


def read_many(port: int, cookie: str, path: str = "/") -> tuple[list[dict[str, object]], set[int]]:
    """GET ``path`` over fresh connections until several workers answered (or MAX_REQUESTS)."""
    bodies: list[dict[str, object]] = []
    pids: set[int] = set()
    while len(bodies) < MAX_REQUESTS and (len(bodies) < ENOUGH_REQUESTS or len(pids) < 2):
        reply = spread_request(port, path, cookie, len(bodies))
        assert reply.status == 200, reply.body
        bodies.append(reply.body)
        pids.add(int(reply.body["pid"]))  # type: ignore[call-overload]
    return bodies, pids


def spread_request(port: int, path: str, cookie: str | None, i: int) -> servers.Reply:
    """Every other request, keep one worker busy so the work is spread over several."""
    if i % 2:
        with servers.busy_worker(port):
            return servers.request(port, path, cookie)
    return servers.request(port, path, cookie)


def test_session_set_in_one_worker_is_read_by_others(gunicorn_server: servers.Server) -> None:
    port = gunicorn_server.port
    cookie = new_session(port)
    bodies, pids = read_many(port, cookie)
    assert all(body["foo"] == "bar" for body in bodies)
    assert len(pids) > 1, f"only worker(s) {pids} answered {len(bodies)} requests"
    assert pids <= gunicorn_server.children()
    # The master opened the table before forking (our on_starting hook ran).
    assert "django-shmsession: table" in gunicorn_server.log()


def test_counter_is_shared_by_all_workers(gunicorn_server: servers.Server) -> None:
    port = gunicorn_server.port
    first = servers.request(port, "/incr")
    cookie = first.cookie
    assert cookie
    assert first.body["count"] == 1
    pids = {first.body["pid"]}
    expected = 1
    while expected < MAX_REQUESTS and (expected < ENOUGH_REQUESTS or len(pids) < 2):
        expected += 1
        reply = spread_request(port, "/incr", cookie, expected)
        assert reply.body["count"] == expected
        pids.add(reply.body["pid"])
    assert len(pids) > 1, f"only worker(s) {pids} answered {expected} requests"


def test_set_query_pairs_and_get_whole_session(gunicorn_server: servers.Server) -> None:
    port = gunicorn_server.port
    cookie = new_session(port, "?foo=one&k=two")
    reply = servers.request(port, "/get", cookie)
    assert reply.body["session"] == {"foo": "one", "k": "two"}
    assert servers.request(port, "/", cookie).body["foo"] == "one"
    ping = servers.request(port, "/ping")
    assert ping.status == 200
    assert ping.cookie is None  # /ping never touches the session


def test_sigkill_of_a_worker_under_traffic_loses_no_session(
    gunicorn_server: servers.Server,
) -> None:
    port = gunicorn_server.port
    sessions = {new_session(port, f"?foo=v{i}"): f"v{i}" for i in range(20)}
    stop = threading.Event()
    traffic_errors: list[str] = []
    served: list[int] = []

    def traffic() -> None:  # keeps every worker busy writing while one dies
        cookie = None
        while not stop.is_set():
            try:
                reply = servers.request(port, "/incr", cookie, timeout=5)
                cookie = reply.cookie or cookie
                served.append(reply.status)
            except (OSError, http.client.HTTPException) as err:  # the killed worker's request
                traffic_errors.append(repr(err))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        before = gunicorn_server.children()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        _wait_for_respawn(gunicorn_server, victim, len(before))
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    assert served.count(200) > 10, (served, traffic_errors)  # there was traffic during the kill
    for cookie, value in sessions.items():
        assert servers.request(port, "/", cookie).body["foo"] == value
    assert victim not in gunicorn_server.children()
    report = store.get_table().check()
    assert report.ok, report.problems
    assert report.entries >= len(sessions)


def _wait_for_respawn(server: servers.Server, victim: int, count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = server.children()
        if victim not in children and len(children) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"gunicorn did not replace worker {victim}:\n{server.log()}")


def test_sessions_survive_a_gunicorn_restart(shm_name: str, tmp_path: Path) -> None:
    first = servers.gunicorn(shm_name, size=TEST_SIZE).start(tmp_path)
    try:
        sessions = {new_session(first.port, f"?foo=r{i}"): f"r{i}" for i in range(10)}
    finally:
        first.stop()
    assert first.process is not None
    assert first.process.returncode == 0
    second = servers.gunicorn(shm_name, size=TEST_SIZE).start(tmp_path)
    try:
        for cookie, value in sessions.items():
            assert servers.request(second.port, "/", cookie).body["foo"] == value
    finally:
        second.stop()


def test_runserver_smoke(shm_name: str, tmp_path: Path) -> None:
    server = servers.runserver(shm_name, size=TEST_SIZE).start(tmp_path)
    try:
        cookie = new_session(server.port)
        reply = servers.request(server.port, "/", cookie)
        assert reply.body == {"foo": "bar", "pid": server.pid}
    finally:
        server.stop()
    # The table is the same one the engine in this process sees.
    assert store.get_table().stats().entries == 1


def test_unlink_while_serving_moves_every_worker_to_the_new_segment(
    gunicorn_server: servers.Server, shm_name: str
) -> None:
    """`shmsession unlink` from another process while gunicorn serves: every worker switches to
    the new segment (the one a freshly started process sees) instead of staying on the orphan."""
    port = gunicorn_server.port
    old = new_session(port, "?foo=before")
    manage = [sys.executable, "manage.py", "shmsession"]
    env = servers.project_env(shm_name, TEST_SIZE)
    subprocess.run([*manage, "unlink", "--noinput"], cwd=servers.PROJECT, env=env, check=True)
    time.sleep(store.RECHECK_INTERVAL + 0.2)  # every worker is due for its next check
    cookie = new_session(port, "?foo=after")
    bodies, pids = read_many(port, cookie)
    assert all(body["foo"] == "after" for body in bodies)
    assert len(pids) > 1
    stats = subprocess.run(
        [*manage, "stats", "--json"], cwd=servers.PROJECT, env=env, check=True, capture_output=True
    )
    assert json.loads(stats.stdout)["entries"] >= 1
    assert servers.request(port, "/", old).body["foo"] is None  # unlink dropped the old ones
