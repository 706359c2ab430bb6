"""Worker processes that hammer a bare :class:`TableLock` (no table), for the lock's own tests.

Each worker maps the segment, builds a ``TableLock`` with a small test :class:`Recovery`, and
runs critical sections that detect a second holder: the section writes its pid into a shared
``owner`` word, sleeps a little, and checks the word is still its own. Bookkeeping lives in an
anonymous shared array made before the fork (``Board``), not in the segment, so the lock's words
are the only shared state the lock sees.

A worker can be told to kill (SIGKILL) or stop (SIGSTOP) itself at the n-th passage of a named
fault point (``lock.FAULT_POINTS``), which is how the tests hit every instruction window.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray
from typing import Any

import posix_ipc

from django_shmsession import faults
from django_shmsession.exceptions import CorruptTable, LockTimeout
from django_shmsession.lock import TableLock

CONTEXT = multiprocessing.get_context("fork")

# Board words.
OWNER = 0  # pid inside the critical section, 0 when none
VIOLATIONS = 1  # times a section found another pid in OWNER
OPS = 2  # completed critical sections (all workers)
DIRTY = 3  # set by a section at its start, cleared at its end: "an interrupted write"
RECOVERED = 4  # times the test recovery ran
DIED_AT_NS = 5  # CLOCK_MONOTONIC ns when a worker killed itself at its fault point
STOPPED = 6  # pid of a worker that stopped itself at its fault point
TIMEOUTS = 7  # LockTimeouts seen by workers
MAX_GAP_NS = 8  # longest gap between two completed sections seen by any worker
LAST_OP_NS = 9  # CLOCK_MONOTONIC ns of the last completed section
WORDS = 16


#: More threads than the registry has slots: a leak of one slot per thread would exhaust it.
SLOTS_TO_TRY = 1100
#: Bytes of a bare segment: the header page, the registry and some room.
BARE_SIZE = 1 << 18


@dataclass
class BareSegment:
    """What the lock needs of a segment (name, fd, memory, semaphore), without the table."""

    name: str
    fd: int
    memory: mmap.mmap
    semaphore: Any

    def close(self) -> None:
        self.memory.close()
        os.close(self.fd)
        self.semaphore.close()


def open_bare(name: str, create: bool = False) -> BareSegment:
    """Create or open a zeroed segment and its semaphore, independent of ``segment.py``."""
    flags = posix_ipc.O_CREX if create else 0
    shm = posix_ipc.SharedMemory(name, flags, mode=0o600, size=BARE_SIZE if create else 0)
    semaphore = posix_ipc.Semaphore(
        name + ".lock", posix_ipc.O_CREX if create else 0, mode=0o600, initial_value=1
    )
    memory = mmap.mmap(shm.fd, BARE_SIZE)
    return BareSegment(name, shm.fd, memory, semaphore)


def unlink_bare(name: str) -> None:
    for remove, target in (
        (posix_ipc.unlink_shared_memory, name),
        (posix_ipc.unlink_semaphore, name + ".lock"),
    ):
        with contextlib.suppress(posix_ipc.ExistentialError):
            remove(target)


def new_board() -> Any:
    return RawArray(ctypes.c_longlong, WORDS)


class BoardRecovery:
    """The test's stand-in for the table: a DIRTY flag that a dead section leaves set."""

    def __init__(self, board: Any) -> None:
        self.board = board
        self.pending_word = memoryview(board).cast("B").cast("Q")[DIRTY : DIRTY + 1]

    def pending(self) -> bool:
        return bool(self.board[DIRTY])

    def recover(self) -> None:
        self.board[OWNER] = 0
        self.board[DIRTY] = 0
        self.board[RECOVERED] += 1

    def corrupted(self, err: CorruptTable) -> None:  # pragma: no cover - never raised here
        raise err


def section(board: Any, hold: float) -> None:
    """A critical section that notices a second holder."""
    pid = os.getpid()
    board[DIRTY] = 1
    if board[OWNER] not in (0, pid):
        board[VIOLATIONS] += 1
    board[OWNER] = pid
    if hold:
        time.sleep(hold)
    if board[OWNER] != pid:
        board[VIOLATIONS] += 1
    board[OWNER] = 0
    board[OPS] += 1
    now = time.monotonic_ns()
    last = board[LAST_OP_NS]
    if last and now - last > board[MAX_GAP_NS]:
        board[MAX_GAP_NS] = now - last
    board[LAST_OP_NS] = now
    board[DIRTY] = 0


@dataclass
class Fault:
    """Kill or stop the worker at the ``occurrence``-th passage of ``point``."""

    point: str
    occurrence: int = 1
    action: str = "kill"  # or "stop"


def _install(fault: Fault | None, board: Any) -> None:
    if fault is None:
        return
    seen = 0

    def hook(point: str) -> None:
        nonlocal seen
        if point != fault.point:
            return
        seen += 1
        if seen != fault.occurrence:
            return
        if fault.action == "kill":
            board[DIED_AT_NS] = time.monotonic_ns()
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            board[STOPPED] = os.getpid()
            os.kill(os.getpid(), signal.SIGSTOP)

    faults.set_fault_hook(hook)


def worker(
    name: str,
    board: Any,
    seconds: float,
    hold: float = 0.0,
    fault: Fault | None = None,
    timeout: float = 10.0,
    pause: float = 0.0,
) -> None:
    """Run sections for ``seconds`` (the child's body; exits with 0)."""
    _install(fault, board)
    seg = open_bare(name)
    lock = TableLock(seg, memoryview(b""), timeout, BoardRecovery(board))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            lock.run(section, board, hold)
        except LockTimeout:
            board[TIMEOUTS] += 1
        if pause:
            time.sleep(pause)
    os._exit(0)


def start(name: str, board: Any, seconds: float, **kwargs: Any) -> Any:
    process = CONTEXT.Process(target=worker, args=(name, board, seconds), kwargs=kwargs)
    process.start()
    return process
