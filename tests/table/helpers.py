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
