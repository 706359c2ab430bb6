"""Real processes and threads sharing one table: concurrent writers, creation races, hash seeds,
fork safety and thread safety."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import pytest

from django_shmsession.table import SessionTable

from .conftest import DEFAULT_SIZE, TableFactory
from .helpers import semaphore_acquirable_exactly_once, value_for, watchdog
from .procs import FORK, Child, Conn, pause_at_first_point

pytestmark = pytest.mark.multiprocess

FAR = 4e9  # an expiry no test outlives (the children use the real clock)


def assert_healthy(table: SessionTable) -> None:
    report = table.check()
    assert report.ok, report.problems
    assert semaphore_acquirable_exactly_once(table.name)


# -- concurrent writers ------------------------------------------------------------------------


def writer(conn: Conn, name: str, wid: int, count: int, races: int) -> None:
    """Write own keys (deleting every third), race for shared keys with add; report the acks."""
    table = SessionTable(name, full_policy="raise", lock_timeout=10)
    acked: dict[str, bytes] = {}
    deleted: list[str] = []
    wins: list[str] = []
    for i in range(count):
        key = f"w{wid}-{i}"
        value = value_for(key, 50 + (i * 131) % 3000)
        table.set(key, value, FAR)
        acked[key] = value
        if i % 3 == 2:
            victim = f"w{wid}-{i - 1}"
            assert table.delete(victim)
            deleted.append(victim)
            del acked[victim]
        if i % (count // races) == 0 and table.add(f"race-{i}", f"w{wid}".encode(), FAR):
            wins.append(f"race-{i}")
    conn.send((acked, deleted, wins))
    table.close()


def test_concurrent_writers_lose_nothing(make_table: TableFactory) -> None:
    table = make_table(16 * DEFAULT_SIZE, full_policy="raise")
    writers, count, races = 4, 1000, 50
    children = [Child(writer, table.name, w, count, races) for w in range(writers)]
    results = [child.recv(timeout=60) for child in children]
    assert [child.join() for child in children] == [0] * writers
    for acked, deleted, _ in results:
        assert {k: table.get(k) for k in acked} == acked
        assert all(table.get(k) is None for k in deleted)
    race_keys = {f"race-{i}" for i in range(0, count, count // races)}
    wins = [key for _, _, won in results for key in won]
    assert sorted(wins) == sorted(race_keys), "each add race must have exactly one winner"
    for wid, (_, _, won) in enumerate(results):
        assert all(table.get(key) == f"w{wid}".encode() for key in won)
    stats = table.stats()
    assert stats.entries == sum(len(a) for a, _, _ in results) + len(race_keys)
    assert stats.evictions == stats.table_full_errors == 0
    assert_healthy(table)


# -- creation race -----------------------------------------------------------------------------


def racer(conn: Conn, name: str, index: int, total: int, barrier: object) -> None:
    barrier.wait(10)  # type: ignore[attr-defined]
    table = SessionTable(name, DEFAULT_SIZE)
    assert table.add(f"p{index}", f"from {index}".encode(), FAR)
    barrier.wait(10)  # type: ignore[attr-defined]
    conn.send([table.get(f"p{j}") for j in range(total)])
    table.close()


@pytest.mark.parametrize("round_", range(3))
def test_processes_creating_the_same_table_at_once_share_one(
    name_factory: Callable[[], str], round_: int
) -> None:
    name, total = name_factory(), 6
    barrier = FORK.Barrier(total)
    children = [Child(racer, name, i, total, barrier) for i in range(total)]
    seen = [child.recv(timeout=30) for child in children]
    assert [child.join() for child in children] == [0] * total
    expected = [f"from {j}".encode() for j in range(total)]
    assert seen == [expected] * total
    table = SessionTable(name)
    try:
        assert table.stats().entries == total
        assert_healthy(table)
    finally:
        table.close()


# -- hash seeds --------------------------------------------------------------------------------

SEED_SCRIPT = """
import sys
from django_shmsession.table import SessionTable
name, mine, theirs = sys.argv[1], sys.argv[2], sys.argv[3]
t = SessionTable(name, {size})
for i in range(100):
    t.set(f"{{mine}}-{{i}}", f"{{mine}}/{{i}}".encode(), 4e9)
wrong = [i for i in range(100) if t.get(f"{{theirs}}-{{i}}") != f"{{theirs}}/{{i}}".encode()]
print(len(wrong) if theirs else 0)
"""


def test_processes_with_different_hash_seeds_see_the_same_keys(shm_name: str) -> None:
    script = textwrap.dedent(SEED_SCRIPT.format(size=DEFAULT_SIZE))

    def run(seed: str, mine: str, theirs: str) -> str:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        command = [sys.executable, "-c", script, shm_name, mine, theirs]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run("1", "first", "") == "0"
    assert run("2", "second", "first") == "0"
    assert run("3", "third", "second") == "0"


# -- fork safety -------------------------------------------------------------------------------


def test_a_handle_opened_before_fork_works_in_the_child(table: SessionTable) -> None:
    table.set("parent", b"from parent", FAR)

    def child_body(conn: Conn) -> None:
        conn.send(table.get("parent"))
        table.set("child", b"from child", FAR)
        conn.send(table.stats().entries)

    child = Child(child_body)
    assert child.recv() == b"from parent"
    assert child.recv() == 2
    assert child.join() == 0
    assert table.get("child") == b"from child"
    table.set("after", b"parent still works", FAR)
    assert table.get("after") == b"parent still works"
    assert_healthy(table)


def test_a_forked_child_that_dies_holding_the_lock_is_recovered(
    make_table: TableFactory,
) -> None:
    """The child must record itself, not its parent, as the lock owner."""
    table = make_table(lock_timeout=5)
    table.set("parent", b"v", FAR)

    def child_body(conn: Conn) -> None:
        pause_at_first_point(conn)
        table.set("child", b"never acknowledged", FAR)

    child = Child(child_body)
    holding = child.recv()
    assert holding[0] == "holding"
    assert holding[2] == child.pid
    child.kill()
    with watchdog(20):
        assert table.get("parent") == b"v"
    assert table.get("child") in (None, b"never acknowledged")
    assert table.stats().lock_recoveries == 1
    assert_healthy(table)


# -- threads -----------------------------------------------------------------------------------


def test_threads_hammering_one_handle(make_table: TableFactory) -> None:
    # 4 MiB: the ~600 live values must fit without eviction (a 1 MiB table, minus the update
    # reserve of one maximal value, evicts a few).
    table = make_table(4 * DEFAULT_SIZE)
    threads_n, count = 4, 300
    errors: list[BaseException] = []
    wins: list[list[str]] = [[] for _ in range(threads_n)]

    def work(tid: int) -> None:
        try:
            for i in range(count):
                key = f"t{tid}-{i}"
                value = value_for(key, (i * 211) % 2000)
                table.set(key, value, FAR)
                assert table.get(key) == value
                if i % 2:
                    assert table.delete(key)
                if table.add(f"race-{i % 50}", f"t{tid}".encode(), FAR):
                    wins[tid].append(f"race-{i % 50}")
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.1))
    assert not any(thread.is_alive() for thread in threads), "threads hung"
    assert errors == []
    for tid in range(threads_n):
        for i in range(count):
            key = f"t{tid}-{i}"
            assert table.get(key) == (None if i % 2 else value_for(key, (i * 211) % 2000))
    assert sorted(k for won in wins for k in won) == sorted(f"race-{r}" for r in range(50))
    assert_healthy(table)


def create_concurrently(name: str, threads_n: int) -> list[SessionTable]:
    """``threads_n`` threads create ``name`` at the same instant, each writing its own key."""
    barrier = threading.Barrier(threads_n)
    handles: list[SessionTable] = []

    def create(index: int) -> None:
        barrier.wait(10)
        handle = SessionTable(name, DEFAULT_SIZE)
        handle.set(f"k{index}", b"v", FAR)
        handles.append(handle)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return handles


def test_threads_creating_the_same_table_at_once_share_one(
    name_factory: Callable[[], str],
) -> None:
    """fcntl locks do not exclude threads of one process: creation needs a thread lock too, or
    two threads both initialize the table, each with its own hash secret."""
    threads_n = 4
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to expose races
    try:
        for _ in range(40):
            handles = create_concurrently(name_factory(), threads_n)
            try:
                assert len(handles) == threads_n
                for handle in handles:
                    assert [handle.get(f"k{i}") for i in range(threads_n)] == [b"v"] * threads_n
            finally:
                for handle in handles:
                    handle.close()
    finally:
        sys.setswitchinterval(old_interval)
