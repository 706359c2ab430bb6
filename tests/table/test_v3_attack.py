"""Attacks on layout v3 (issue 14): eviction order, expiry floors, the lock's new paths, scan.

Each test states the property it guards. The crash tests kill a real child process at a fault
point (``procs.kill_self_at``) and check the eviction order the survivor then applies.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from django_shmsession import faults, layout
from django_shmsession.exceptions import TableFull, WouldBlock
from django_shmsession.table import SessionTable

from .conftest import TableFactory
from .helpers import FakeClock, raw_mapping, value_for, watchdog
from .procs import Child, ChildExited, Conn, kill_self_at

SMALL = layout.FIXED_SIZE + 256 * 1024
#: For the class tests: ~1,150 entries, so a sample of 8 holds the one class-0 entry < 1% of runs
#: (the chance these tests pass on the bug).
MEDIUM = layout.FIXED_SIZE + 1024 * 1024
WEEK = 7 * 86400.0
WORD = struct.Struct("<Q")


def capacity_of(table: SessionTable, size: int = 300) -> int:
    """How many ``size``-byte values fit (entries or chunks, whichever runs out first)."""
    stats = table.stats()
    per_value = -(-size // stats.chunk_size)
    reserve = -(-table.max_value_size // stats.chunk_size)
    return min(stats.entry_capacity, (stats.chunk_capacity - reserve) // per_value)


def fill(table: SessionTable, now: float, prefix: str, priority: int, count: int) -> None:
    for i in range(count):
        key = f"{prefix}{i}"
        assert table.add(key, value_for(key, 300), now + WEEK, priority, evict=False)


class Boom(Exception):
    """Raised by a fault hook inside a write and inside its recovery."""


def control_word(name: str, word: int) -> int:
    with raw_mapping(name) as mapping:
        return int(WORD.unpack_from(mapping, layout.CONTROL_OFFSET + 8 * word)[0])


# -- a writer killed after its write committed, before the table updated the hints ------------


def write_and_die(
    conn: Conn, name: str, point: str, key: str, expires_at: float, priority: int, op: str
) -> None:
    """Child: open ``name``, SIGKILL itself at ``point`` inside ``op(key)``."""
    table = SessionTable(name, clock=FakeClock())
    kill_self_at(point)
    getattr(table, op)(key, value_for(key, 300), expires_at, priority)
    conn.send("survived")


def die_in(name: str, point: str, key: str, expires_at: float, priority: int, op: str) -> None:
    child = Child(write_and_die, name, point, key, expires_at, priority, op)
    with pytest.raises(ChildExited):
        child.recv()
    assert child.join() == -9


@pytest.mark.multiprocess
def test_an_insert_killed_after_its_disarm_still_lets_its_expired_entry_be_reclaimed(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """Expired entries are reclaimed before TableFull, even when the writer that inserted one
    was SIGKILLed between ``writes.insert`` returning and ``Floors.lower`` (the intent is
    disarmed there, so recovery never marks the hints stale and the floor stays too high)."""
    table = make_table(SMALL, max_value_size=4096, full_policy="raise")
    count = capacity_of(table)
    fill(table, clock.now, "user", 1, count - 1)
    assert table.add("first-short", value_for("x", 300), clock.now + 5, 0)
    clock.advance(10)
    # A full table and one expired entry in the last range: the reclaim walks every range up
    # to it, making their floors exact (the weeks of the users).
    table.set("filler", value_for("filler", 300), clock.now + WEEK, 1)
    assert table.stats().expired == 1
    table.delete("filler")  # room for exactly one insert, in that last range
    die_in(table.name, "insert:after-disarm", "short", clock.now + 10, 0, "set")
    clock.advance(60)  # "short" has expired
    with watchdog(20):
        table.set("new", value_for("new", 300), clock.now + WEEK, 1)  # TableFull on the bug
    assert table.stats().expired == 2  # first-short, then short
    assert all(table.get(f"user{i}") is not None for i in range(count - 1))


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("point", "op", "setup_priority"),
    [("insert:after-disarm", "set", None), ("update:after-disarm", "replace", 1)],
)
def test_a_class_0_entry_whose_writer_died_after_disarm_is_still_evicted_first(
    make_table: TableFactory,
    clock: FakeClock,
    point: str,
    op: str,
    setup_priority: int | None,
) -> None:
    """Class 0 goes before class 1, even when the write that made an entry class 0 (an insert,
    or an update from class 1 to 0: a logout) was SIGKILLed after its intent was disarmed,
    before the table counted the entry in CTL_CLASS_ENTRIES. A count of 0 makes the eviction
    trust the sample, which almost never holds the one class-0 entry among hundreds."""
    table = make_table(MEDIUM, max_value_size=4096)
    count = capacity_of(table)
    fill(table, clock.now, "user", 1, count - 1)
    if setup_priority is not None:
        assert table.add("anon", value_for("anon", 300), clock.now + WEEK, setup_priority)
    die_in(table.name, point, "anon", clock.now + WEEK, 0, op)
    clock.advance(1)
    with watchdog(20):
        table.set("new", value_for("new", 300), clock.now + WEEK, 1)
    survivors = [f"user{i}" for i in range(count - 1) if table.get(f"user{i}") is not None]
    stats = table.stats()
    assert stats.class_evictions[1] == 0, "a class-1 entry was evicted while a class-0 one lived"
    assert table.get("anon") is None
    assert len(survivors) == count - 1


@pytest.mark.multiprocess
def test_check_repair_after_such_a_crash_restores_the_eviction_order(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """check(repair=True) is the operator's remedy; it must leave counts eviction can trust.
    (integrity.check never compares CTL_CLASS_ENTRIES or the floors, so it finds nothing.)"""
    table = make_table(SMALL, max_value_size=4096)
    count = capacity_of(table)
    fill(table, clock.now, "user", 1, count - 1)
    die_in(table.name, "insert:after-disarm", "anon", clock.now + WEEK, 0, "set")
    with watchdog(20):
        table.check(repair=True)
    assert table.stats().class_entries[:2] == (1, count - 1), table.stats().class_entries


def test_an_exception_right_after_an_insert_commits_keeps_the_eviction_order(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """No crash needed: a signal handler that raises (KeyboardInterrupt, gunicorn's SystemExit
    on a worker timeout) between ``writes.insert`` returning and the hint updates in
    ``SessionTable._write`` leaves the entry uncounted, with no stale mark (nothing is armed, so
    the ``finally`` of ``run`` recovers nothing). Simulated by a fault hook raising at the
    last point of the insert."""
    table = make_table(MEDIUM, max_value_size=4096)
    count = capacity_of(table)
    fill(table, clock.now, "user", 1, count - 1)

    def hook(point: str) -> None:
        if point == "insert:after-disarm":
            raise Boom(point)

    faults.set_fault_hook(hook)
    try:
        with pytest.raises(Boom):
            table.set("anon", value_for("anon", 300), clock.now + WEEK, 0)
    finally:
        faults.set_fault_hook(None)
    assert table.exists("anon")  # committed: the caller saw an exception, the table has it
    clock.advance(1)
    table.set("new", value_for("new", 300), clock.now + WEEK, 1)
    assert table.get("anon") is None
    assert table.stats().class_evictions[1] == 0


# -- inline (WouldBlock) with an interrupted write pending ----------------------------------


def leave_an_armed_insert(table: SessionTable, clock: FakeClock) -> None:
    """Interrupt an insert and then its recovery with exceptions: the lock is released (the
    ``finally`` of ``run``) with the intent still armed, as an interrupted recoverer leaves it."""

    def hook(point: str) -> None:
        if point == "insert:after-value" or point.startswith("recover-"):
            raise Boom(point)

    faults.set_fault_hook(hook)
    try:
        with pytest.raises(Boom):
            table.set("half", value_for("half", 3000), clock.now + 60)
    finally:
        faults.set_fault_hook(None)


def armed(name: str) -> bool:
    with raw_mapping(name) as mapping:
        return bool(WORD.unpack_from(mapping, layout.INTENT_ARMED_OFFSET)[0])


def test_inline_refuses_to_recover_and_leaves_the_interrupted_write_to_the_next_holder(
    table: SessionTable, clock: FakeClock
) -> None:
    from .helpers import semaphore_acquirable_exactly_once

    table.set("k", b"v", clock.now + 60)
    leave_an_armed_insert(table, clock)
    assert armed(table.name)
    assert semaphore_acquirable_exactly_once(table.name)
    rollbacks = control_word(table.name, layout.CTL_ROLLBACKS)
    with pytest.raises(WouldBlock):
        table.inline(table.get, "k")
    with pytest.raises(WouldBlock):
        table.inline(table.set, "k", b"w", clock.now + 60)
    assert armed(table.name), "inline recovered (or disarmed) the interrupted write"
    assert control_word(table.name, layout.CTL_ROLLBACKS) == rollbacks
    assert control_word(table.name, layout.CTL_LOCK_HOLDER) == 0
    assert semaphore_acquirable_exactly_once(table.name)
    assert table.get("k") == b"v"  # a waiting call recovers first
    assert not armed(table.name)
    assert table.get("half") is None
    assert table.inline(table.get, "k") == b"v"
    assert table.check().ok


def test_inline_inside_a_batch_runs_under_the_batch_hold(
    table: SessionTable, clock: FakeClock
) -> None:
    def work() -> bytes | None:
        table.inline(table.set, "k", b"v", clock.now + 60)
        return table.inline(table.get, "k")

    assert table.batch(work) == b"v"
    assert control_word(table.name, layout.CTL_LOCK_HOLDER) == 0


@pytest.mark.multiprocess
def test_inline_never_adopts_a_dead_holder_and_the_next_waiting_call_does(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table()
    table.set("k", b"v", clock.now + 60)
    die_in(table.name, "insert:after-value", "half", clock.now + 60, 0, "set")
    with pytest.raises(WouldBlock):
        table.inline(table.get, "k")
    assert armed(table.name)
    with watchdog(20):
        assert table.get("k") == b"v"
    assert not armed(table.name)
    assert table.check().ok


# -- log records are emitted after the lock is released -------------------------------------


class LockStateHandler:
    """A logging handler that records, for each record, whether the lock was free."""

    def __init__(self, name: str) -> None:
        import logging

        from .helpers import semaphore_acquirable_exactly_once

        class Handler(logging.Handler):
            def emit(inner, record: logging.LogRecord) -> None:
                self.seen.append((record.getMessage(), semaphore_acquirable_exactly_once(name)))

        self.seen: list[tuple[str, bool]] = []
        self.handler = Handler()
        self.logger = logging.getLogger("django_shmsession")

    def __enter__(self) -> LockStateHandler:
        import logging

        self.previous = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.previous)


def test_table_full_inside_a_batch_is_logged_after_the_outer_release(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table(SMALL, max_value_size=4096, full_policy="raise")
    fill(table, clock.now, "k", 0, capacity_of(table))

    def work() -> int:
        failures = 0
        for i in range(3):
            try:
                table.set(f"extra{i}", value_for("x", 300), clock.now + WEEK)
            except TableFull:
                failures += 1
        return failures

    with LockStateHandler(table.name) as seen:
        assert table.batch(work) == 3
    full = [free for message, free in seen.seen if "is full" in message]
    assert len(full) == 3
    assert all(full), "a log record was emitted while the lock was held"


@pytest.mark.multiprocess
def test_the_adoption_line_names_the_dead_process_and_is_emitted_after_release(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table()
    child = Child(write_and_die, table.name, "insert:after-value", "half", clock.now + 60, 0, "set")
    with pytest.raises(ChildExited):
        child.recv()
    dead = child.pid
    assert child.join() == -9
    with LockStateHandler(table.name) as seen, watchdog(20):
        table.get("anything")
    lines = [(m, free) for m, free in seen.seen if "took over" in m]
    assert len(lines) == 1
    message, free = lines[0]
    # The parent claimed the dead child's (lowest free) registry slot before adopting: the
    # line must not name the adopter itself as the process that died.
    assert f"process {os.getpid()}" not in message, message
    assert f"process {dead}" in message
    assert free
    recovered = [m for m, _free in seen.seen if "recovered an interrupted insert" in m]
    assert len(recovered) == 1
    assert "rolled back" in recovered[0]


# -- scan under writers in other processes --------------------------------------------------

STABLE = [f"stable{i}" for i in range(60)]
CHURN = [f"churn{i}" for i in range(60)]


def versioned(key: str, version: int) -> bytes:
    """A value that says which version of which key it is, and whose body proves it whole."""
    size = 50 + (version * 997) % 3000
    return f"{key}|{version}|".encode() + value_for(key, size, version)


def check_versioned(key: str, value: bytes) -> int:
    name, version, _rest = value.split(b"|", 2)
    assert name.decode() == key
    assert value == versioned(key, int(version)), f"torn or mixed value for {key}"
    return int(version)


def scan_writer(conn: Conn, name: str, seed: int) -> None:
    """Child: update the stable keys (sizes and classes change) and delete/re-add churn keys
    until told to stop."""
    import random

    table = SessionTable(name)
    rng = random.Random(seed)
    conn.send("up")
    version = 0
    while not conn.poll():
        version += 1
        key = rng.choice(STABLE)
        table.set(key, versioned(key, version), time.time() + 3600, rng.randrange(2))
        churn = rng.choice(CHURN)
        if rng.random() < 0.5:
            table.delete(churn)
        else:
            table.set(churn, versioned(churn, version), time.time() + 3600)
    conn.send(version)


@pytest.mark.multiprocess
def test_scan_under_concurrent_writers_sees_whole_values_and_every_stable_key_once(
    make_table: TableFactory,
) -> None:
    table = make_table(4 * 1024 * 1024, clock=time.time)
    for key in STABLE + CHURN:
        table.set(key, versioned(key, 0), time.time() + 3600)
    writers = [Child(scan_writer, table.name, seed) for seed in range(2)]
    try:
        for writer in writers:
            assert writer.recv() == "up"
        deadline = time.monotonic() + 3
        scans = 0
        while time.monotonic() < deadline:
            seen: dict[str, int] = {}
            cursor = 0
            while True:
                items, cursor = table.scan(cursor, batch_size=7)
                for item in items:
                    check_versioned(item.key, item.value)
                    if item.key.startswith("stable"):
                        assert item.key not in seen, f"{item.key} appeared twice in one scan"
                        seen[item.key] = 1
                if cursor == 0:
                    break
            assert sorted(seen) == sorted(STABLE), "a key present throughout was missed"
            scans += 1
        for writer in writers:
            writer.send("stop")
        written = [writer.recv() for writer in writers]
        assert min(written) > 50, written  # the writers really ran during the scans
        assert scans >= 3
    finally:
        for writer in writers:
            writer.kill()
    assert table.check().ok


# -- gevent ---------------------------------------------------------------------------------

GEVENT_SCRIPT = """
from gevent import monkey; monkey.patch_all()
import json, sys, time
import gevent, gevent.event
from django_shmsession.table import SessionTable

table = SessionTable(sys.argv[1])
table.set("k", b"v", time.time() + 60)
mode = sys.argv[2]
if mode == "cooperative":
    ticks = []
    def ticker():
        for _ in range(20):
            ticks.append(time.monotonic()); gevent.sleep(0.01)
    def holder():
        table.batch(lambda: gevent.sleep(0.3))  # holds the lock across a yield
    def waiter():
        started = time.monotonic(); table.get("k"); return time.monotonic() - started
    held = gevent.spawn(holder); gevent.sleep(0.01)
    tick = gevent.spawn(ticker); wait = gevent.spawn(waiter)
    gevent.joinall([held, tick, wait], timeout=20)
    print(json.dumps({"waited": wait.value, "ticks_during_wait": sum(
        1 for t in ticks if t < ticks[0] + wait.value)}))
else:
    count = int(sys.argv[3])
    go = gevent.event.Event()
    errors = []
    def connection():  # one greenlet per keep-alive connection, as gevent servers run them
        try:
            assert table.get("k") == b"v"
        except Exception as err:
            errors.append(repr(err))
        go.wait()
    greenlets = [gevent.spawn(connection) for _ in range(count)]
    gevent.sleep(1)
    go.set()
    gevent.joinall(greenlets, timeout=20)
    print(json.dumps({"errors": len(errors), "first": errors[:1]}))
table.close()
"""


def run_gevent(name: str, *args: str) -> dict[str, Any]:
    import json

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(GEVENT_SCRIPT), name, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": root},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def test_under_gevent_a_lock_wait_lets_other_greenlets_run(make_table: TableFactory) -> None:
    table = make_table(clock=time.time)
    out = run_gevent(table.name, "cooperative")
    assert out["waited"] >= 0.2  # it really waited for the holder
    assert out["ticks_during_wait"] >= 10, out  # and the hub kept running meanwhile


def test_under_gevent_a_thousand_connections_can_use_the_table(make_table: TableFactory) -> None:
    """A gevent worker runs one greenlet per connection (gunicorn's worker_connections is 1000
    by default) and threading.local is greenlet-local once patched: each greenlet that touches
    the table claims a registry slot (and a file description) of the 1024 that every process
    of the table shares."""
    table = make_table(clock=time.time)
    out = run_gevent(table.name, "connections", "1100")
    assert out["errors"] == 0, out


# -- sparse tables: LRU within a class -------------------------------------------------------


def test_in_a_sparse_chunk_bound_table_the_least_recently_used_big_value_goes(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """A high entry mark (many small sessions earlier) and a few big values that fill the
    chunks: the sample of 64 probes mostly finds none of them, and the fallback takes the first
    used entry from a random start, not the least recently used one."""
    table = make_table(SMALL, max_value_size=60000)
    stats = table.stats()
    for i in range(stats.entry_capacity):  # raise the entry high-water mark, then empty it
        table.set(f"small{i}", b"x", clock.now + 1)
    clock.advance(5)
    assert table.clear_expired() == stats.entry_capacity
    big = 40000
    wrong = 0
    for trial in range(10):
        keys = [f"t{trial}-{n}" for n in range(3)]
        for key in keys:
            table.set(key, value_for(key, big), clock.now + WEEK, 1)
        clock.advance(10)
        for key in keys[1:]:
            assert table.get(key) is not None  # the first one is now the least recently used
        clock.advance(10)
        newcomer = f"t{trial}-new"
        table.set(newcomer, value_for(newcomer, big), clock.now + WEEK, 1)
        if table.get(keys[0]) is not None:
            wrong += 1
        for key in [*keys, newcomer]:
            table.delete(key)  # not clear(): that would lower the entry high-water mark
    assert wrong == 0, f"{wrong} of 10 evictions took a recently used entry over the LRU one"


# -- clear, repair, corruption: the class counts ----------------------------------------------


def test_clear_resets_the_class_counts_and_eviction_order_still_holds(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table(SMALL, max_value_size=4096)
    count = capacity_of(table)
    fill(table, clock.now, "a", 0, count // 2)
    fill(table, clock.now, "b", 1, count // 2)
    assert table.clear() == 2 * (count // 2)
    assert table.stats().class_entries == (0,) * layout.PRIORITY_CLASSES
    fill(table, clock.now, "user", 1, count - 1)
    assert table.add("anon", value_for("anon", 300), clock.now + WEEK, 0)
    clock.advance(1)
    table.set("new", value_for("new", 300), clock.now + WEEK, 1)
    assert table.get("anon") is None
    assert table.stats().class_evictions[:2] == (1, 0)


def damage_value(name: str, table: SessionTable, key: str) -> None:
    """Flip a byte of ``key``'s value in its chunk (its checksum then fails)."""
    from django_shmsession import index
    from django_shmsession.layout import NIL

    memory = table._memory
    encoded = key.encode()
    found, fields = index.find(memory, encoded, memory.key_hash(encoded))
    assert found != NIL
    _expires, _length, first, _crc = index.descriptor_of(found, fields)
    offset = memory.geometry.chunks_offset + first * memory.geometry.chunk_size
    with raw_mapping(name) as mapping:
        mapping[offset] ^= 0xFF


def test_a_dropped_damaged_entry_leaves_its_class_count(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """``recovery.corrupted`` drops a damaged entry with ``writes.delete`` directly, so the
    entry's class is never uncounted: stats() reports a class-1 session that no longer exists
    (and check() does not compare the class counts, so check(repair=True) keeps it)."""
    table = make_table()
    table.set("victim", value_for("victim", 300), clock.now + 60, 1)
    table.set("other", value_for("other", 300), clock.now + 60, 1)
    damage_value(table.name, table, "victim")
    assert table.get("victim") is None  # dropped as damaged
    assert table.stats().entries_dropped == 1
    assert table.stats().class_entries[1] == 1, table.stats().class_entries


def test_check_repair_after_damage_gives_exact_class_counts(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table()
    for i in range(30):
        table.set(f"k{i}", value_for(f"k{i}", 300), clock.now + 60, i % 2)
    damage_value(table.name, table, "k3")
    report = table.check(repair=True)
    assert report.repaired
    assert report.dropped == 1
    assert table.stats().class_entries[:2] == (15, 14)


# -- settings -------------------------------------------------------------------------------


def test_a_creator_asking_for_max_value_size_0_gets_a_value_error_not_a_mismatch(
    shm_name: str,
) -> None:
    """0 is not a size: the creator should hear what range is allowed, not that it disagrees
    with the 65536 it just recorded itself (``max_value_size or DEFAULT`` records the default)."""
    from django_shmsession.exceptions import SettingsMismatch

    try:
        with pytest.raises(ValueError, match="max_value_size") as info:
            SessionTable(shm_name, 1 << 20, max_value_size=0).close()
        assert not isinstance(info.value, SettingsMismatch), info.value
    finally:
        SessionTable.unlink_name(shm_name)


# -- batch: nested runs under real threads ------------------------------------------------------


def test_a_batch_in_one_thread_makes_another_threads_calls_wait_then_succeed(
    table: SessionTable, clock: FakeClock
) -> None:
    inside, release = threading.Event(), threading.Event()
    results: list[Any] = []

    def work() -> None:
        table.set("a", b"1", clock.now + 60)
        inside.set()
        release.wait(10)
        table.set("a", b"2", clock.now + 60)

    def other() -> None:
        table.set("b", b"x", clock.now + 60)
        results.append(table.get("a"))

    holder = threading.Thread(target=table.batch, args=(work,))
    holder.start()
    assert inside.wait(10)
    waiter = threading.Thread(target=other)
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()  # it waits for the batch, it does not run inside it
    release.set()
    holder.join(10)
    waiter.join(10)
    assert results == [b"2"]
    assert table.get("b") == b"x"
    assert control_word(table.name, layout.CTL_LOCK_HOLDER) == 0


def test_a_batch_that_catches_an_interrupted_write_and_continues_stays_consistent(
    table: SessionTable, clock: FakeClock
) -> None:
    """The next call inside the batch recovers the interrupted write before running."""
    table.set("old", value_for("old", 700), clock.now + 60)

    def hook(point: str) -> None:
        if point == "update:after-value":
            raise Boom(point)

    def work() -> list[bytes | None]:
        faults.set_fault_hook(hook)
        try:
            table.set("old", value_for("old", 2500, 1), clock.now + 60)
        except Boom:
            pass
        finally:
            faults.set_fault_hook(None)
        table.set("next", b"n", clock.now + 60)
        return [table.get("old"), table.get("next")]

    assert table.batch(work) == [value_for("old", 700), b"n"]
    assert not armed(table.name)
    assert table.check().ok


# -- the eviction order under a random workload, checked write by write -----------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("policy", ["evict", "raise"])
def test_every_write_evicts_in_order_expired_then_lowest_class(
    make_table: TableFactory, clock: FakeClock, seed: int, policy: str
) -> None:
    """After each write, compare the raw contents before and after: whatever vanished (besides
    what the test deleted) is either expired, or was live, and then nothing expired survived the
    write and no survivor has a lower class than a live entry that went. The class counts are
    exact throughout (no crash here). Sizes mix 1-chunk and 8-chunk values (entry- and
    chunk-bound fullness); updates grow, shrink and change class; clear() and clear_expired()
    run now and then."""
    import random

    from .helpers import segment_contents

    rng = random.Random(seed)
    table = make_table(SMALL, max_value_size=8192, full_policy=policy)
    keys = [f"k{i}" for i in range(800)]
    before = segment_contents(table.name)
    for step in range(1500):
        roll = rng.random()
        key = rng.choice(keys)
        if roll < 0.002:
            table.clear()
            before = segment_contents(table.name)
            continue
        if roll < 0.005:
            table.clear_expired()
            before = segment_contents(table.name)
            continue
        if roll < 0.04:
            table.delete(key)
            before = segment_contents(table.name)
            continue
        if roll < 0.15:
            table.get(key)
            before = segment_contents(table.name)
            continue
        size = rng.choice([100, 100, 100, 100, 300, 500, 3000, 8000])
        lifetime = rng.choice([3.0, 30.0, WEEK, WEEK])
        priority = rng.randrange(3)
        now = clock.now
        try:
            table.set(key, value_for(key, size, step), now + lifetime, priority)
        except TableFull:
            assert policy == "raise"
            after = segment_contents(table.name)
            expired = [k for k, (_v, e, _p) in after.items() if e <= now and k != key]
            assert not expired, f"step {step}: TableFull with expired entries {expired[:3]}"
            before = after
            continue
        after = segment_contents(table.name)
        vanished = {k: before[k] for k in before if k not in after and k != key}
        live_gone = {k: p for k, (_v, e, p) in vanished.items() if e > now}
        if live_gone:
            assert policy == "evict", f"step {step}: 'raise' evicted {sorted(live_gone)}"
            left_expired = [k for k, (_v, e, _p) in after.items() if e <= now and k != key]
            assert not left_expired, f"step {step}: evicted live {live_gone} before {left_expired}"
            survivors = [p for k, (_v, e, p) in after.items() if k != key]
            assert not survivors or max(live_gone.values()) <= min(survivors), (
                f"step {step}: evicted class {max(live_gone.values())} while class "
                f"{min(survivors)} survived"
            )
        counts = [0] * layout.PRIORITY_CLASSES
        for _v, _e, p in after.values():
            counts[p] += 1
        assert table.stats().class_entries == tuple(counts), f"step {step}"
        before = after
        clock.advance(rng.choice([0.0, 0.3, 1.0, 5.0]))
    assert table.check().ok
    stats = table.stats()
    assert stats.expired > 50  # the workload really reclaimed and evicted
    assert (stats.evictions if policy == "evict" else stats.table_full_errors) > 50, stats


# -- recorded settings under a creation race -------------------------------------------------


def open_with(conn: Conn, name: str, max_value_size: int) -> None:
    from django_shmsession.exceptions import SettingsMismatch

    conn.recv()  # start together
    try:
        table = SessionTable(name, 1 << 20, max_value_size=max_value_size)
    except SettingsMismatch as err:
        conn.send(("mismatch", err.recorded))
        return
    conn.send(("opened", table.max_value_size))
    conn.recv()
    table.close()


@pytest.mark.multiprocess
@pytest.mark.parametrize("round_", range(3))
def test_racing_creators_with_different_settings_agree_on_the_first_recorded(
    shm_name: str, round_: int
) -> None:
    children = [Child(open_with, shm_name, size) for size in (4096, 8192, 4096, 8192)]
    try:
        for child in children:
            child.send("go")
        outcomes = [child.recv() for child in children]
        opened = {size for kind, size in outcomes if kind == "opened"}
        assert len(opened) == 1, outcomes  # everyone who opened uses one max_value_size
        (winner,) = opened
        assert all(size == winner for kind, size in outcomes if kind == "mismatch"), outcomes
        for child, (kind, _size) in zip(children, outcomes, strict=True):
            if kind == "opened":
                child.send("close")
        for child in children:
            assert child.join() == 0
    finally:
        for child in children:
            child.kill()
    with SessionTable(shm_name) as adopter:
        assert adopter.max_value_size == winner
