"""Small helpers shared by the table tests (no fixtures here: see conftest.py).

They touch /dev/shm directly, on purpose: the tests check the files the table leaves behind
(names, modes, owners) and corrupt its bytes through a mapping of their own, independently of the
code under test.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, cast
from uuid import uuid4

import posix_ipc

SHM_DIR = "/dev/shm"
START = 1_700_000_000.0  # the fake clock's epoch; any fixed instant works


def unique_name() -> str:
    """A segment name no other test (or concurrent test run) uses."""
    return f"/shmtest-{uuid4().hex[:12]}"


class FakeClock:
    """A settable wall clock: ``clock()`` returns ``now``; tests call ``advance``."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def shm_path(name: str) -> str:
    """Where Linux shows the segment called ``name``."""
    return os.path.join(SHM_DIR, name.lstrip("/"))


def sem_path(name: str) -> str:
    """Where Linux shows the table's lock semaphore (``<name>.lock``)."""
    return os.path.join(SHM_DIR, "sem." + name.lstrip("/") + ".lock")


def leftover_files(name: str) -> list[str]:
    """Every file in /dev/shm that carries the segment's name (segment, semaphores, ...)."""
    base = name.lstrip("/")
    return sorted(f for f in os.listdir(SHM_DIR) if base in f)


def value_for(key: str, size: int, version: int = 0) -> bytes:
    """Deterministic bytes that name their key and version, so a mix-up is visible.

    A value returned for the wrong key, or an old version, or a torn value, never equals the
    expected bytes: the pattern is a hash stream seeded by (key, version).
    """
    seed = f"{key}#{version}".encode()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.blake2b(seed + counter.to_bytes(4, "little"), digest_size=64).digest()
        counter += 1
    return bytes(out[:size])


def semaphore_acquirable_exactly_once(name: str) -> bool:
    """True if the table's lock is free and counts one: two holders or a lost lock are bugs.

    Acquires without waiting once (must succeed) and a second time (must fail), then gives back
    exactly what it took.
    """
    sem = posix_ipc.Semaphore(name + ".lock")
    taken = 0
    try:
        for _ in range(2):
            try:
                sem.acquire(0)
            except posix_ipc.BusyError:
                break
            taken += 1
        return taken == 1
    finally:
        for _ in range(taken):
            sem.release()
        sem.close()


class Hung(BaseException):
    """Raised by :func:`watchdog` when the guarded block did not finish in time.

    A BaseException, so that no ``except Exception`` in the code under test swallows it.
    """


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Turn a hang inside the block into a test failure instead of a stuck CI job."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hung(f"still running after {seconds} s: the table hangs")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def raw_mapping(name: str) -> Iterator[mmap.mmap]:
    """A writable mapping of the segment's file, independent of any table handle."""
    fd = os.open(shm_path(name), os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size) as mapping:
            yield mapping
    finally:
        os.close(fd)


# -- the recovery oracle -----------------------------------------------------------------------

#: key -> (value, expires_at, priority class) of every committed entry, expired or not.
Contents = dict[str, tuple[bytes, float, int]]


class _CopiedSegment:
    """Just enough of a ``Segment`` for ``TableMemory`` and ``integrity.rebuild`` over a copy."""

    def __init__(self, memory: mmap.mmap) -> None:
        from django_shmsession import layout

        fields = layout.GEOMETRY.unpack_from(memory, layout.GEOMETRY_OFFSET)
        self.memory = memory
        self.geometry = layout.Geometry(*fields[2:7])
        self.secret = fields[7]
        self.name = "copy"

    def header_intact(self) -> bool:
        return True

    def rewrite_header(self) -> None:
        pass


def _contents(memory: Any) -> Contents:
    """The committed entries of a mapped table, read the way a full rebuild judges them."""
    from django_shmsession import layout

    found: Contents = {}
    for index in range(memory.entry_hwm()):
        state, active, key_len, _next, _hash = memory.head(index)
        if state != layout.ENTRY_USED:
            continue
        expires_at, length, first, _crc = memory.descriptor(index, active)
        key = bytes(memory.key(index, key_len)).decode()
        assert key not in found, f"key {key!r} is committed twice"
        value = bytes(memory.read_value(index, first, length))
        found[key] = (value, expires_at, memory.priority(index, active))
    return found


def rebuilt_copy_contents(name: str) -> Contents:
    """THE ORACLE: the entries a full ``integrity.rebuild`` keeps, run on a private copy of the
    segment ``name`` exactly as it is now (call it after a crash, before anything recovers).

    The copy lives in an anonymous mapping: the real segment is not touched.
    """
    from django_shmsession import integrity
    from django_shmsession.memory import TableMemory

    with raw_mapping(name) as mapping:
        copy = mmap.mmap(-1, len(mapping))
        copy[:] = mapping[:]
    memory = TableMemory(cast(Any, _CopiedSegment(copy)))
    try:
        integrity.rebuild(memory)
        return _contents(memory)
    finally:
        memory.release()
        copy.close()


def segment_contents(name: str) -> Contents:
    """The committed entries of the segment ``name`` as it is now (a raw mapping, no lock)."""
    from django_shmsession.memory import TableMemory

    with raw_mapping(name) as mapping:
        memory = TableMemory(cast(Any, _CopiedSegment(mapping)))
        try:
            return _contents(memory)
        finally:
            memory.release()


def assert_recovery_matches_rebuild(table: Any, oracle: Contents | None = None) -> Contents:
    """Recover ``table`` (any locked call recovers) and check it against the oracle.

    Pass ``oracle=rebuilt_copy_contents(name)`` taken right after the crash, or let this take
    it now (the intent must still be armed: nothing may have touched the table since). Asserts
    that O(1) recovery and the full rebuild keep the same (key, value, expiry) set and that
    ``check()`` finds nothing; returns the recovered contents.
    """
    if oracle is None:
        oracle = rebuilt_copy_contents(table.name)
    table.stats()  # takes the lock: recovers the armed intent, changes no entry
    recovered = segment_contents(table.name)
    assert recovered == oracle, _difference(recovered, oracle)
    report = table.check()
    assert report.ok, report.problems
    return recovered


def _difference(recovered: Contents, oracle: Contents) -> str:
    only_recovered = sorted(set(recovered) - set(oracle))
    only_rebuilt = sorted(set(oracle) - set(recovered))
    changed = sorted(k for k in set(recovered) & set(oracle) if recovered[k] != oracle[k])
    return (
        f"O(1) recovery and the rebuilt copy disagree: only recovered {only_recovered}, "
        f"only rebuilt {only_rebuilt}, different {changed}"
    )
