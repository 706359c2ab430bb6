"""Two hosts (two gunicorn servers, two tables, two listeners) sharing one Redis, and in a
second run one PostgreSQL: what users of host B see after writes and logouts on host A."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from django_shmsession.table import SessionTable
from django_shmsession.tiered import words
from tests.engine.servers import request

from .conftest import wait_for
from .hosts import Host, elapsed_until, l2_env, migrate, percentile, run_script, two_hosts
from .l2servers import PostgresServer, RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(params=["redis", "db"])
def env(request: Any) -> dict[str, str]:
    if request.param == "redis":
        return l2_env("redis", request.getfixturevalue("redis_server").url, None)
    found = l2_env("db", None, request.getfixturevalue("postgres_server"))
    migrate(found)
    return found


@pytest.fixture
def hosts(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    with two_hosts(tmp_path, env) as pair:
        yield pair


def login(host: Host, **values: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in values.items()) or "foo=bar"
    reply = request(host.port, f"/set?{query}")
    assert reply.status == 200, reply.body
    assert reply.cookie is not None
    return reply.cookie


def session_on(host: Host, cookie: str) -> dict[str, Any]:
    reply = request(host.port, "/get", cookie)
    assert reply.status == 200, reply.body
    return dict(reply.body["session"])


def test_cross_host_reads_and_writes_lose_nothing(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    cookies = [login(a if i % 2 else b, n=str(i)) for i in range(40)]
    for round_ in range(6):
        for i, cookie in enumerate(cookies):
            host = (a, b)[(i + round_) % 2]
            reply = request(host.port, "/incr", cookie)
            assert reply.status == 200, reply.body
            assert reply.body["count"] == round_ + 1, (i, round_, reply.body)
    for i, cookie in enumerate(cookies):
        for host in (a, b):
            assert session_on(host, cookie) == {"n": str(i), "count": 6}


def test_logout_on_a_is_refused_on_b_at_once(env: dict[str, str], tmp_path: Path) -> None:
    """With MAX_STALENESS = 30 s only the listener can make B refuse within a second; the
    latency distribution against the 50 ms target is measured in benchmarks/tiered.py."""
    with two_hosts(tmp_path, env, max_staleness=30.0) as (a, b):
        latencies = []
        for _ in range(40):
            cookie = login(a)
            assert session_on(b, cookie) == {"foo": "bar"}  # B holds a trusted copy now
            assert session_on(b, cookie) == {"foo": "bar"}
            assert request(a.port, "/logout", cookie).status == 200
            latencies.append(elapsed_until(lambda c=cookie: session_on(b, c) == {}, 1.0))
        assert max(latencies) < 1.0
        print(
            f"logout A->B: p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms"
        )


def test_listener_killed_falls_back_then_recovers(env: dict[str, str], tmp_path: Path) -> None:
    with two_hosts(tmp_path, env, max_staleness=1.0) as (a, b):
        old_pid = b.listener_pid()
        flushes = b.word(words.FLUSHES)
        cookie = login(a)
        assert session_on(b, cookie) == {"foo": "bar"}
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: not b.listener_up(), "B to see its listener down", 5)
        # Down: B revalidates every copy, so A's logout is refused at once, not after 1 s.
        assert request(a.port, "/logout", cookie).status == 200
        assert session_on(b, cookie) == {}
        # The master restarts it; it flushes L1 and heartbeats again.
        try:
            wait_for(lambda: b.listener_up() and b.listener_pid() != old_pid, "a listener", 30)
        except AssertionError as err:
            raise AssertionError(f"{err}; B's log:\n{b.server.log()[-3000:]}") from None
        assert b.word(words.FLUSHES) > flushes
        assert "listener" in b.server.log()
        assert "restarting" in b.server.log()
        cookie2 = login(b)
        assert session_on(a, cookie2) == {"foo": "bar"}


def test_unlinked_segment_warms_again_from_l2(hosts: tuple[Host, Host]) -> None:
    a, _b = hosts
    cookies = [login(a, n=str(i)) for i in range(20)]
    SessionTable.unlink_name(a.name)
    time.sleep(1.5)  # workers notice within a second and switch to a new table
    for i, cookie in enumerate(cookies):
        assert session_on(a, cookie) == {"n": str(i)}  # nobody logged out
    wait_for(a.listener_up, "A's listener on the new table", 10)
    with a.table() as table:
        assert table.get(cookies[0]) is not None  # warmed from L2


RACE = """
import sys, django
django.setup()
from django.contrib.sessions.backends.base import CreateError
from django_shmsession.store import get_table
from django_shmsession.tiered.engine import SessionStore
from django_shmsession.tiered.runtime import get_l2
keys = sys.argv[1].split(",")
if sys.argv[2] == "1":
    keys.reverse()  # the two hosts meet in the middle, so each wins some and they race there
get_table()
get_l2().ping()  # the table open and L2 connected: the race starts from the first create
print("ready", flush=True)
sys.stdin.readline()
won = []
for key in keys:
    s = SessionStore(key)  # save(must_create) does not load: the key stays ours to create
    try:
        s.save(must_create=True)
        won.append(key)
    except CreateError:
        pass
print(",".join(won))
"""


def test_must_create_races_between_hosts(env: dict[str, str]) -> None:
    """Two hosts create the same 300 keys from opposite ends, released at once (both
    interpreters up, tables open, L2 connected): each key is won by exactly one host."""
    keys = [f"race{i:04d}" + "x" * 24 for i in range(300)]
    names = [f"/shmtest-race-{os.getpid()}-{i}" for i in range(2)]
    try:
        procs = [
            run_script(env, name, RACE, ",".join(keys), str(i)) for i, name in enumerate(names)
        ]
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
        assert all(p.returncode == 0 for p in procs)
    finally:
        for name in names:
            SessionTable.unlink_name(name)
    wins = [set(filter(None, out.split(","))) for out in outputs]
    assert not wins[0] & wins[1], "two hosts both created one key"
    assert wins[0] | wins[1] == set(keys)
    assert wins[0], "no race happened: host 1 won every key"
    assert wins[1], "no race happened: host 0 won every key"


def test_redis_restart_under_traffic(tmp_path: Path) -> None:
    """Redis stopped: requests that need L2 answer 500 and the log names Redis and its URL;
    after the restart (append-only file) every session is back and nobody is logged out."""
    server = RedisServer(persist=True).start()
    try:
        with two_hosts(tmp_path, l2_env("redis", server.url, None)) as (a, b):
            cookies = [login(a, n=str(i)) for i in range(10)]
            server.stop()
            reply = request(b.port, "/incr", cookies[0])
            assert reply.status == 500
            assert reply.cookie is None  # no new session handed out
            new = request(a.port, "/set")
            assert new.status == 500
            time.sleep(0.2)
            assert f"Redis at {server.url}" in a.server.log()
            server.start()
            wait_for(lambda: a.listener_up() and b.listener_up(), "listeners reconnected", 15)
            for i, cookie in enumerate(cookies):
                assert session_on(b, cookie) == {"n": str(i)}
                assert request(a.port, "/incr", cookie).body["count"] == 1
    finally:
        server.cleanup()


def test_postgres_restart_under_traffic(postgres_server: PostgresServer, tmp_path: Path) -> None:
    env = l2_env("db", None, postgres_server)
    migrate(env)
    with two_hosts(tmp_path, env) as (a, b):
        cookies = [login(a, n=str(i)) for i in range(10)]
        postgres_server.stop()
        try:
            assert request(b.port, "/incr", cookies[0]).status == 500
            assert request(a.port, "/set").status == 500
            time.sleep(0.2)
            assert "the database 'default'" in a.server.log()
        finally:
            postgres_server.start()
        wait_for(lambda: a.listener_up() and b.listener_up(), "listeners reconnected", 15)
        for i, cookie in enumerate(cookies):
            assert session_on(b, cookie) == {"n": str(i)}
