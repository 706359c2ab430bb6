"""Processes killed inside writes and inside recoveries, dead lock holders, signals.

A child is SIGKILLed before or after every store of every write (``table.FAULT_POINTS``) and at
every step of the lock (``lock.FAULT_POINTS``); the next process recovers in O(1) from the intent
log, and the result must equal what a full rebuild of a copy of the crashed segment keeps (the
oracle, ``helpers.rebuilt_copy_contents``), with every acknowledged write present.

The children use the real clock and far-future expiries; the test process opens its own handles
with a watchdog, so a table that fails to recover makes the test fail rather than hang.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import time
from typing import Any

import posix_ipc
import pytest

from django_shmsession import layout, lock, platform
from django_shmsession.exceptions import LockTimeout, TableFull
from django_shmsession.table import FAULT_POINTS, SessionTable

from .conftest import DEFAULT_SIZE
from .helpers import (
    assert_recovery_matches_rebuild,
    raw_mapping,
    rebuilt_copy_contents,
    semaphore_acquirable_exactly_once,
    shm_path,
    value_for,
    watchdog,
)
from .procs import Child, ChildExited, Conn, kill_self_at, start_lock_holder

pytestmark = pytest.mark.multiprocess

FAR = 4e9
WORD = struct.Struct("<Q")
#: A table that fills up after a few dozen sessions (the fixed areas plus 64 KiB).
SMALL_TABLE = layout.FIXED_SIZE + 64 * 1024


def assert_healthy(table: SessionTable) -> None:
    report = table.check()
    assert report.ok, report.problems
    assert semaphore_acquirable_exactly_once(table.name)


def sleeper(conn: Conn, name: str) -> None:
    """A live process that opened the table and holds nothing (it claims a registry slot)."""
    table = SessionTable(name)
    table.exists("anything")
    conn.send("up")
    conn.recv()
    table.close()


# -- SIGKILL at every fault point --------------------------------------------------------------

# (operation, key, value size): a workload that passes every fault point of a write, on a table
# the test preloaded (with chunks on the free stack, so allocations take both stacked and fresh
# chunks). Each op writes a distinct version of its value (version = op index).
MAIN_OPS: list[tuple[str, str, int]] = [
    ("get", "old-lazy", 0),  # expired: reclaimed lazily (a delete inside a read)
    ("set", "n1", 300),  # insert from the free-chunk stack
    ("set", "n1", 400),  # update, one chunk: the top of the stack
    ("set", "n1", 5000),  # update, multi-chunk: no run on the stack, so fresh chunks
    ("add", "n2", 100),
    ("replace", "rep", 2000),
    ("delete", "del", 0),
    ("set", "n4", 20000),  # insert: stacked chunks, then many fresh ones
    ("clear_expired", "", 0),
    ("set", "n3", 0),
    ("clear", "", 0),
]
PRELOAD = {f"pre-{i}": 37 * i for i in range(10)} | {"rep": 700, "del": 1500}
EXPIRED = ["old-lazy", *(f"old-{i}" for i in range(5))]
#: Written and deleted by the preload: their chunks wait on the free stack.
SCRATCH = {f"scratch-{i}": 1200 for i in range(2)}

#: Every point of a write (the recovery's own points need a first crash: see below).
WRITE_POINTS = [p for p in FAULT_POINTS if not p.startswith(("recover", "repair"))]
#: Lock steps a single uncontended process passes (the waiting ones: tests/table/test_lock.py).
LOCK_POINTS = [
    p
    for p in lock.FAULT_POINTS
    if not p.startswith(("lock.probe", "lock.acquire:ack")) and "sem_timedwait" not in p
]


def run_op(table: SessionTable, index: int, op: str, key: str, size: int) -> Any:
    if op in ("set", "add", "replace"):
        return getattr(table, op)(key, value_for(key, size, index), FAR)
    if op in ("get", "delete"):
        return getattr(table, op)(key)
    return getattr(table, op)()


def model_after(ops_done: int) -> dict[str, bytes | None]:
    """The expected contents after the first ``ops_done`` operations of MAIN_OPS."""
    model: dict[str, bytes | None] = {k: value_for(k, s) for k, s in PRELOAD.items()}
    model |= {k: None for k in ["n1", "n2", "n3", "n4", *EXPIRED, *SCRATCH]}
    for index, (op, key, size) in enumerate(MAIN_OPS[:ops_done]):
        value = value_for(key, size, index)
        if (
            op == "set"
            or (op == "add" and model[key] is None)
            or (op == "replace" and model[key] is not None)
        ):
            model[key] = value
        elif op == "delete":
            model[key] = None
        elif op == "clear":
            model = dict.fromkeys(model)
    return model


def preload(name: str) -> None:
    with SessionTable(name, DEFAULT_SIZE, full_policy="raise") as table:
        for key, size in SCRATCH.items():
            table.set(key, value_for(key, size), FAR)
        for key, size in PRELOAD.items():
            table.set(key, value_for(key, size), FAR)
        for key in EXPIRED:
            table.set(key, b"stale", time.time() - 10)
        for key in SCRATCH:
            table.delete(key)


def crash_workload(conn: Conn, name: str, point: str, occurrence: int) -> None:
    """Child: run MAIN_OPS, reporting each start and finish, dying at ``point``.

    The hook is installed before the table is opened, so the lock's steps are points too.
    """
    kill_self_at(point, occurrence)
    table = SessionTable(name, full_policy="raise")
    for index, (op, key, size) in enumerate(MAIN_OPS):
        conn.send(("start", index))
        run_op(table, index, op, key, size)
        conn.send(("done", index))
    conn.send(("finished",))


def last_started(child: Child) -> int:
    """Index of the operation in flight when the child died (it must have died)."""
    in_flight = -1
    while True:
        try:
            message = child.recv(timeout=20)
        except ChildExited:
            break  # the child is dead (a hang or a traceback still fails the test)
        if message[0] == "finished":
            child.join()
            return -1
        if message[0] == "start":
            in_flight = message[1]
    return in_flight


def crash_and_check(name: str, point: str, occurrence: int = 1) -> SessionTable:
    """Kill the workload at ``point``, recover, and check the result against the oracle and
    the model; returns the recovered handle (the caller closes it)."""
    preload(name)
    child = Child(crash_workload, name, point, occurrence)
    in_flight = last_started(child)
    assert in_flight >= 0, f"the workload never reached fault point {point!r}"
    assert child.join() == -signal.SIGKILL
    oracle = rebuilt_copy_contents(name)
    table = SessionTable(name, lock_timeout=5)
    with watchdog(30):
        assert_recovery_matches_rebuild(table, oracle)
    before, after = model_after(in_flight), model_after(in_flight + 1)
    contents = {key: table.get(key) for key in before}
    assert contents in (before, after), f"in flight: {MAIN_OPS[in_flight]}"
    assert_healthy(table)
    table.set("post-crash", b"writes work again", FAR)
    assert table.get("post-crash") == b"writes work again"
    return table


@pytest.mark.parametrize("point", WRITE_POINTS)
def test_sigkill_at_every_store_of_every_write_loses_at_most_the_write_in_flight(
    shm_name: str, point: str
) -> None:
    table = crash_and_check(shm_name, point)
    try:
        stats = table.stats()
        assert stats.lock_recoveries == 1  # every write point is inside the lock
        if point.endswith(("-arm", ":before-arm")) or point.endswith(":after-disarm"):
            assert stats.rollbacks == (1 if point.endswith(":after-arm") else 0)
    finally:
        table.close()


@pytest.mark.parametrize("point", LOCK_POINTS)
def test_sigkill_at_every_lock_step_loses_nothing_acknowledged(shm_name: str, point: str) -> None:
    table = crash_and_check(shm_name, point, occurrence=3)
    try:
        assert table.stats().lock_recoveries in (0, 1)
    finally:
        table.close()


#: A recovery point, and the write point whose crash leaves an intent that passes it.
RECOVERY_CASES = (
    [
        (p, "insert:after-commit" if "undo" not in p else "insert:after-value")
        for p in FAULT_POINTS
        if p.startswith("recover-insert")
    ]
    + [
        (p, "update:after-commit" if "undo" not in p else "update:after-descriptor")
        for p in FAULT_POINTS
        if p.startswith("recover-update")
    ]
    + [(p, "delete:after-commit") for p in FAULT_POINTS if p.startswith("recover-delete")]
    + [(p, "clear:after-commit") for p in FAULT_POINTS if p.startswith("recover-clear")]
    + [("recover:after-disarm", "update:after-commit")]
)


def recover_and_die(conn: Conn, name: str, point: str) -> None:
    """Child: adopt the dead writer's lock and die at ``point`` of the recovery."""
    kill_self_at(point)
    table = SessionTable(name)
    table.exists("pre-0")
    conn.send("survived")


@pytest.mark.parametrize(("point", "first"), RECOVERY_CASES)
def test_a_recoverer_killed_mid_recovery_is_recovered_by_the_next(
    shm_name: str, point: str, first: str
) -> None:
    """Recovery replays recorded words: killed anywhere in it, the next one replays them again
    and ends where the full rebuild of the first crash's segment ends."""
    preload(shm_name)
    child = Child(crash_workload, shm_name, first, 1)
    last_started(child)
    assert child.join() == -signal.SIGKILL
    oracle = rebuilt_copy_contents(shm_name)
    second = Child(recover_and_die, shm_name, point)
    assert second.join(timeout=30) == -signal.SIGKILL, f"{point!r} was not reached"
    table = SessionTable(shm_name, lock_timeout=5)
    try:
        with watchdog(30):
            assert_recovery_matches_rebuild(table, oracle)
        assert table.stats().lock_recoveries == 2
        assert_healthy(table)
    finally:
        table.close()


# -- SIGKILL at random moments under load ------------------------------------------------------


POOL = value_for("pool", 3000)
#: Few keys per writer: every writer's keys must fit in the table (TableFull would fail the test).
KEYS_PER_WRITER = 10


def load_value(key: str, version: int) -> bytes:
    """Cheap to build (the writers must spend their time in the table, under the lock)."""
    size = (version * 577) % 3000
    return (f"{key}#{version}#".encode() + POOL)[:size]


def load_writer(conn: Conn, name: str, wid: int, ack_path: str) -> None:
    """Child: overwrite 10 own keys in rotation, appending an ack line after each write.

    An ack is one ``os.write`` on an O_APPEND file, so a SIGKILL never tears it.
    """
    table = SessionTable(name, full_policy="raise", lock_timeout=10)
    fd = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    conn.send("up")
    deadline = time.monotonic() + 30  # a bound in case the test dies without killing us
    version = 0
    while time.monotonic() < deadline:
        key = f"w{wid}-{version % KEYS_PER_WRITER}"
        table.set(key, load_value(key, version), FAR)
        os.write(fd, f"{key} {version} {time.monotonic_ns()}\n".encode())
        version += 1


def read_acks(ack_path: str) -> tuple[dict[str, int], int]:
    """Last acknowledged version per key, and the longest gap between two acks (ns)."""
    last: dict[str, int] = {}
    previous = gap = 0
    with open(ack_path) as f:
        for line in f:
            key, version, stamp = line.split()
            last[key] = int(version)
            if previous:
                gap = max(gap, int(stamp) - previous)
            previous = int(stamp)
    return last, gap


@pytest.mark.slow
def test_random_sigkills_under_load_lose_no_acknowledged_write(
    shm_name: str, tmp_path: os.PathLike[str]
) -> None:
    """1,000 SIGKILLs of writers at random moments: no acknowledged write is lost, and the longest
    gap between two writes of a surviving writer stays under 0.5 s."""
    rng = random.Random(1234)
    # 64 MiB: the ~1,000 writers' 10 keys each (up to 3 KB) must all fit ("raise" counts it).
    table = SessionTable(shm_name, 64 * DEFAULT_SIZE, full_policy="raise", lock_timeout=5)
    writers: dict[int, Child] = {}
    next_wid = kills = 0

    def spawn() -> None:
        nonlocal next_wid
        path = os.path.join(tmp_path, f"acks-{next_wid}")
        writers[next_wid] = Child(load_writer, shm_name, next_wid, path)
        assert writers[next_wid].recv() == "up"
        next_wid += 1

    try:
        for _ in range(3):
            spawn()
        while kills < 1000:
            time.sleep(rng.uniform(0.002, 0.03))
            writers.pop(rng.choice(sorted(writers))).kill()
            kills += 1
            spawn()
    finally:
        for child in writers.values():
            child.kill()
    try:
        with watchdog(30):
            table.get("w0-0")
        longest = 0
        for wid in range(next_wid):
            acks, gap = read_acks(os.path.join(tmp_path, f"acks-{wid}"))
            longest = max(longest, gap)
            for key, version in acks.items():
                # the acked version, or the next write of that key if it landed unacknowledged
                allowed = (load_value(key, version), load_value(key, version + KEYS_PER_WRITER))
                assert table.get(key) in allowed, (key, version)
        stats = table.stats()
        stall = longest / 1e9
        print(
            f"{kills} kills, {stats.lock_recoveries} inside the lock, longest stall {stall:.3f} s"
        )
        assert stats.lock_recoveries >= 1, f"none of {kills} kills hit a lock holder"
        assert stats.table_full_errors == 0
        assert longest < 0.5e9
        assert_healthy(table)
    finally:
        table.close()


# -- dead, live and recycled lock holders ------------------------------------------------------


def test_a_live_holder_is_never_robbed(shm_name: str) -> None:
    table = SessionTable(shm_name, DEFAULT_SIZE, lock_timeout=0.5)
    try:
        holder = start_lock_holder(shm_name, "held", b"by a live process", FAR)
        with watchdog(30), pytest.raises(LockTimeout, match=str(holder.pid)):
            table.get("held")
        holder.send("go")
        assert holder.recv() == ("done",)
        assert holder.join() == 0
        assert table.get("held") == b"by a live process"
        assert table.stats().lock_recoveries == 0
        assert_healthy(table)
    finally:
        table.close()


def test_a_dead_holders_slot_reused_by_a_live_process_is_not_the_holder(shm_name: str) -> None:
    """Liveness is the slot's OFD lock plus its incarnation: a new process that claims the dead
    holder's registry slot does not make the dead holder look alive (no pids involved)."""
    table = SessionTable(shm_name, DEFAULT_SIZE, lock_timeout=5)
    table.set("keep", b"v", FAR)
    holder = start_lock_holder(shm_name, "lost", b"x", FAR)
    holder.kill()
    other = Child(sleeper, shm_name)
    try:
        assert other.recv() == "up"
        with watchdog(30):
            assert table.get("keep") == b"v"
        assert table.stats().lock_recoveries == 1
        assert_healthy(table)
    finally:
        other.kill()
        table.close()


def test_recover_dead_holder_adopts_once_and_releases(shm_name: str) -> None:
    table = SessionTable(shm_name, DEFAULT_SIZE, lock_timeout=5)
    try:
        table.set("keep", b"v", FAR)
        assert table.recover_dead_holder() is False  # nobody holds the lock
        holder = start_lock_holder(shm_name, "lost", value_for("lost", 3000), FAR)
        assert table.recover_dead_holder() is False  # a live holder is left alone
        holder.kill()
        assert table.recover_dead_holder() is True
        assert table.recover_dead_holder() is False
        assert semaphore_acquirable_exactly_once(shm_name)
        assert table.get("keep") == b"v"
        assert table.get("lost") in (None, value_for("lost", 3000))
        assert table.stats().lock_recoveries == 1
        assert_healthy(table)
    finally:
        table.close()


def waiter(conn: Conn, name: str, index: int) -> None:
    """Child: wait for the lock (held by someone else) to write one key."""
    table = SessionTable(name, lock_timeout=10)
    conn.send("ready")
    table.set(f"waiter-{index}", f"w{index}".encode(), FAR)
    conn.send("done")
    table.close()


@pytest.mark.parametrize("round_", range(3))
def test_many_waiters_see_a_dead_holder_and_exactly_one_adopts(shm_name: str, round_: int) -> None:
    """The waiters are frozen (SIGSTOP) while the holder dies and thawed together (SIGCONT), so
    their timed waits expire at the same moment and they all find the dead holder at once."""
    table = SessionTable(shm_name, DEFAULT_SIZE, lock_timeout=5)
    try:
        holder = start_lock_holder(shm_name, "lost", b"x", FAR)
        waiters = [Child(waiter, shm_name, i) for i in range(6)]
        assert [w.recv() for w in waiters] == ["ready"] * 6
        time.sleep(0.2)  # let every waiter block in its timed wait (setup, not an assertion)
        for w in waiters:
            os.kill(w.pid, signal.SIGSTOP)
        holder.kill()
        time.sleep(0.1)  # longer than the lock's poll interval: every wait has expired
        for w in waiters:
            os.kill(w.pid, signal.SIGCONT)
        assert [w.recv(timeout=30) for w in waiters] == ["done"] * 6
        assert [w.join() for w in waiters] == [0] * 6
        assert all(table.get(f"waiter-{i}") == f"w{i}".encode() for i in range(6))
        assert table.stats().lock_recoveries == 1
        assert_healthy(table)
    finally:
        table.close()


def test_nobody_adopts_while_another_adoption_holds_the_arbiter(shm_name: str) -> None:
    """The test holds the arbiter byte (as an adopter in the middle of taking over would): the
    waiters that find the dead holder must keep waiting, then exactly one adopts."""
    table = SessionTable(shm_name, DEFAULT_SIZE, lock_timeout=5)
    arbiter = os.open(shm_path(shm_name), os.O_RDWR)
    try:
        holder = start_lock_holder(shm_name, "lost", b"x", FAR)
        holder.kill()
        assert platform.lock_byte(arbiter, layout.ARBITER_LOCK_BYTE, wait=False)
        waiters = [Child(waiter, shm_name, i) for i in range(4)]
        assert [w.recv() for w in waiters] == ["ready"] * 4
        time.sleep(0.5)  # 25 poll intervals: each waiter has found the dead holder by now
        assert not any(w.conn.poll(0) for w in waiters), "adopted despite the arbiter"
        platform.unlock_byte(arbiter, layout.ARBITER_LOCK_BYTE)
        assert [w.recv(timeout=30) for w in waiters] == ["done"] * 4
        assert [w.join() for w in waiters] == [0] * 4
        assert table.stats().lock_recoveries == 1
        assert_healthy(table)
    finally:
        os.close(arbiter)
        table.close()


# -- signals while waiting ---------------------------------------------------------------------


def signalled_waiter(conn: Conn, name: str) -> None:
    """Child: count SIGUSR1/SIGALRM while blocked on the lock; the wait must survive them."""
    counts = {signal.SIGUSR1: 0, signal.SIGALRM: 0}

    def handler(signum: int, frame: object) -> None:
        counts[signal.Signals(signum)] += 1

    signal.signal(signal.SIGUSR1, handler)
    signal.signal(signal.SIGALRM, handler)
    table = SessionTable(name, lock_timeout=20)
    conn.send("ready")
    table.set("patient", b"got the lock", FAR)
    conn.send(("done", counts[signal.SIGUSR1], counts[signal.SIGALRM]))


def test_signals_interrupting_a_lock_wait_are_retried(shm_name: str) -> None:
    table = SessionTable(shm_name, DEFAULT_SIZE, lock_timeout=5)
    try:
        holder = start_lock_holder(shm_name, "held", b"v", FAR)
        child = Child(signalled_waiter, shm_name)
        assert child.recv() == "ready"
        time.sleep(0.1)
        for _ in range(5):
            for signum in (signal.SIGUSR1, signal.SIGALRM):
                os.kill(child.pid, signum)
                time.sleep(0.02)
        assert not child.conn.poll(0.1), "the waiter got the lock while a live process held it"
        holder.send("go")
        assert holder.recv() == ("done",)
        done, usr1, alrm = child.recv(timeout=20)
        assert (done, usr1 > 0, alrm > 0) == ("done", True, True)
        assert child.join() == 0
        assert holder.join() == 0
        assert table.get("patient") == b"got the lock"
        assert table.get("held") == b"v"
        assert table.stats().lock_recoveries == 0
        assert_healthy(table)
    finally:
        table.close()


INTERRUPT_ROUNDS = 12


def interrupted_waiter(conn: Conn, name: str) -> None:
    """Child: waits for the lock again and again; each time a SIGUSR1 handler raises and aborts
    the wait. The lock must neither stay taken by this process nor be posted on its behalf."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGUSR1, handler)
    table = SessionTable(name, lock_timeout=20)
    for _ in range(INTERRUPT_ROUNDS):
        conn.send("ready")
        try:
            table.set("aborted", b"x", FAR)
        except KeyboardInterrupt:
            conn.send("interrupted")
        else:
            conn.send("not interrupted")
    conn.recv()
    table.set("later", b"y", FAR)
    conn.send("done")


def test_a_signal_handler_that_raises_leaves_the_lock_free(shm_name: str) -> None:
    """While a live process holds the lock, a waiter's aborted wait changes nothing: the
    semaphore stays at 0 (a post would let a second process in) and is free once released."""
    table = SessionTable(shm_name, DEFAULT_SIZE, lock_timeout=5)
    semaphore = posix_ipc.Semaphore(shm_name + ".lock")
    try:
        holder = start_lock_holder(shm_name, "held", b"v", FAR)
        child = Child(interrupted_waiter, shm_name)
        for round_ in range(INTERRUPT_ROUNDS):
            assert child.recv() == "ready"
            time.sleep(0.06)  # let it block in a (20 ms) timed wait, or between two waits
            os.kill(child.pid, signal.SIGUSR1)
            assert child.recv() == "interrupted"
            assert semaphore.value == 0, f"round {round_}: the aborted wait posted the semaphore"
        holder.send("go")
        assert holder.recv() == ("done",)
        assert semaphore_acquirable_exactly_once(shm_name)
        child.send("go")
        assert child.recv() == "done"
        assert child.join() == 0
        assert table.get("aborted") is None
        assert table.get("later") == b"y"
        assert_healthy(table)
    finally:
        semaphore.close()
        table.close()


# -- a full table during recovery --------------------------------------------------------------


def test_a_crash_in_a_full_table_keeps_the_raise_policy_honest(shm_name: str) -> None:
    """After recovery, a table that was full stays full: repair must not lose or invent room."""
    table = SessionTable(shm_name, SMALL_TABLE, full_policy="raise", max_value_size=4096)
    try:
        stored: dict[str, bytes] = {}
        for i in range(1000):
            try:
                table.set(f"k{i}", value_for(f"k{i}", 300), FAR)
            except TableFull:
                break
            stored[f"k{i}"] = value_for(f"k{i}", 300)
        holder = start_lock_holder(shm_name, "k0", value_for("k0", 300, 1), FAR)
        holder.kill()
        with watchdog(30):
            assert table.get("k1") == stored["k1"]
        stored["k0"] = table.get("k0") or b"missing"
        assert stored["k0"] in (value_for("k0", 300), value_for("k0", 300, 1))
        with pytest.raises(TableFull):
            table.set("one-more", b"x" * 300, FAR)
        assert {k: table.get(k) for k in stored} == stored
        assert_healthy(table)
    finally:
        table.close()


# -- holders that died at awkward moments ------------------------------------------------------


def test_a_holder_that_died_before_recording_itself_is_adopted(shm_name: str) -> None:
    """Semaphore taken, no holder recorded (death between sem_wait and recording itself):
    adopted after the probe, in a fraction of a second, not after the lock timeout."""
    table = SessionTable(shm_name, DEFAULT_SIZE, lock_timeout=10)
    try:
        table.set("keep", b"v", FAR)
        raw = posix_ipc.Semaphore(shm_name + ".lock")
        raw.acquire(0)  # taken and never released nor recorded, as by a process that died
        raw.close()
        start = time.monotonic()
        with watchdog(20):
            assert table.get("keep") == b"v"
        assert time.monotonic() - start < 0.5
        assert table.stats().lock_recoveries == 1
        assert_healthy(table)
    finally:
        table.close()


def test_a_zombie_holder_counts_as_dead(shm_name: str) -> None:
    """A killed worker stays a zombie until its parent reaps it; it holds nothing."""
    table = SessionTable(shm_name, DEFAULT_SIZE, lock_timeout=5)
    holder = start_lock_holder(shm_name, "lost", b"x", FAR)
    try:
        os.kill(holder.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while proc_state(holder.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc_state(holder.pid) == "Z"
        with watchdog(20):
            table.set("keep", b"v", FAR)
        assert table.get("keep") == b"v"
        assert table.stats().lock_recoveries == 1
        assert_healthy(table)
    finally:
        holder.kill()
        table.close()


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2 :].split()[0].decode()


# -- deaths during recovery and during eviction ------------------------------------------------


def die_at(conn: Conn, name: str, point: str, key: str, value: bytes) -> None:
    """Child: write ``key`` (or just read it when ``value`` is empty), dying at ``point``."""
    kill_self_at(point)
    table = SessionTable(name)  # the creator's settings (the test's "evict", 4 KiB)
    if value:
        table.set(key, value, FAR)
    else:
        table.get(key)
    conn.send("survived")


def run_to_death(name: str, point: str, key: str, value: bytes = b"") -> None:
    child = Child(die_at, name, point, key, value)
    assert child.join(timeout=30) == -signal.SIGKILL, f"{point!r} was not reached"


def test_an_adopter_that_dies_before_repairing_is_adopted_in_turn(shm_name: str) -> None:
    """Three processes die in a row, each holding the lock; the fourth repairs everything."""
    table = SessionTable(shm_name, DEFAULT_SIZE, lock_timeout=5)
    try:
        kept = {f"pre-{i}": value_for(f"pre-{i}", 100 * i) for i in range(20)}
        for key, value in kept.items():
            table.set(key, value, FAR)
        run_to_death(shm_name, "insert:after-value", "lost", value_for("lost", 3000))
        # adopts, dies in the middle of undoing the insert
        run_to_death(shm_name, "recover-insert:after-undo-chunk-words", "pre-0")
        run_to_death(shm_name, "update:after-descriptor", "pre-1", value_for("pre-1", 4000, 1))
        with watchdog(30):
            assert {k: table.get(k) for k in kept} == kept
        assert table.get("lost") is None
        assert table.stats().lock_recoveries == 3
        assert_healthy(table)
    finally:
        table.close()


EVICTION_POINTS = [p for p in WRITE_POINTS if p.startswith(("insert:", "delete:"))]
# A multi-chunk value takes fresh chunks while the high-water mark has room for it, and chunks
# stitched from the stack (the victims') only once it has none: the points that store into
# stacked chunks are reached with the mark pushed to the top first.
STITCHING_POINTS = ("insert:after-chunk-owner", "insert:after-chunk-link")


@pytest.mark.parametrize("point", EVICTION_POINTS)
def test_a_crash_while_evicting_loses_nothing_but_victims_and_the_new_value(
    shm_name: str, point: str
) -> None:
    table = SessionTable(
        shm_name, SMALL_TABLE, full_policy="evict", max_value_size=4096, lock_timeout=5
    )
    try:
        stored: dict[str, bytes] = {}
        for i in range(1000):  # fill until the first eviction: the table is full
            table.set(f"f{i}", value_for(f"f{i}", 200), FAR + i)
            stored[f"f{i}"] = value_for(f"f{i}", 200)
            if table.stats().evictions:
                break
        if point in STITCHING_POINTS:
            for i in range(20):  # two chunks each, evicting one-chunk values: the mark rises
                table.set(f"g{i}", value_for(f"g{i}", 700), FAR + 2000 + i)
                stored[f"g{i}"] = value_for(f"g{i}", 700)
            assert table.stats().chunk_capacity - control_word(shm_name, layout.CTL_CHUNK_HWM) < 8
        run_to_death(shm_name, point, "big", value_for("big", 4096))
        with watchdog(30):
            assert table.get("big") in (None, value_for("big", 4096))
        survivors = {k: table.get(k) for k in stored}
        assert all(survivors[k] in (None, v) for k, v in stored.items())
        missing = sum(1 for v in survivors.values() if v is None)
        stats = table.stats()
        assert missing <= stats.evictions + 1  # the victims of this write, or of the crashed one
        assert stats.lock_recoveries == 1
        assert_healthy(table)
    finally:
        table.close()


def repairer(conn: Conn, name: str) -> None:
    """Child: one read, which finds REPAIR_NEEDED and rebuilds the whole table."""
    table = SessionTable(name)
    conn.send("start")
    table.get("k0")
    conn.send("done")


def control_word(name: str, word: int) -> int:
    with raw_mapping(name) as mapping:
        return int(WORD.unpack_from(mapping, layout.CONTROL_OFFSET + 8 * word)[0])


def set_control_word(name: str, word: int, value: int) -> None:
    with raw_mapping(name) as mapping:
        WORD.pack_into(mapping, layout.CONTROL_OFFSET + 8 * word, value)


def wait_for_repair(name: str, timeout: float = 20.0) -> bool:
    """Poll until a repair runs (``CTL_REPAIR == REPAIR_RUNNING``) or the time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if control_word(name, layout.CTL_REPAIR) == layout.REPAIR_RUNNING:
            return True
        time.sleep(0.0005)
    return False


@pytest.mark.slow
def test_a_process_killed_while_repairing_is_recovered_by_the_next(shm_name: str) -> None:
    """A full rebuild (after detected corruption) of a 16 MiB table takes a while: the repairer
    is killed at a random moment of it; the next holder sees REPAIR_RUNNING and rebuilds again."""
    rng = random.Random(7)
    table = SessionTable(shm_name, 16 * DEFAULT_SIZE, full_policy="raise", lock_timeout=5)
    try:
        count = int(table.stats().entry_capacity * 0.6)
        for i in range(count):
            table.set(f"k{i}", value_for(f"k{i}", 100), FAR)
        mid_repair = 0
        for _ in range(4):
            set_control_word(shm_name, layout.CTL_REPAIR, layout.REPAIR_NEEDED)
            child = Child(repairer, shm_name)
            assert child.recv() == "start"
            assert wait_for_repair(shm_name)
            time.sleep(rng.uniform(0.0, 0.05))
            child.kill()
            mid_repair += control_word(shm_name, layout.CTL_REPAIR) == layout.REPAIR_RUNNING
            with watchdog(30):
                assert table.get(f"k{count - 1}") == value_for(f"k{count - 1}", 100)
        assert mid_repair >= 1, "no kill landed inside a repair"
        assert all(table.get(f"k{i}") == value_for(f"k{i}", 100) for i in range(count))
        assert_healthy(table)
    finally:
        table.close()
