"""The table lock: a POSIX named semaphore that survives the death of its holder.

A POSIX semaphore is not released when the process holding it dies, so a worker SIGKILLed while
it holds the lock would freeze every other worker forever. This module makes the lock
recoverable:

* every acquisition records the owner in the segment's control words: pid, the owner's start
  time from ``/proc/<pid>/stat`` (so a recycled pid is not mistaken for the dead holder) and an
  epoch that every acquisition bumps;
* waiters use timed waits and, between waits, check whether the recorded owner is still alive;
* when it is dead, exactly one waiter adopts the lock: the adopter must win a non-blocking
  ``fcntl`` lock on one byte of the segment file (the *arbiter*, released by the kernel if the
  adopter dies too) and re-read the owner words under it. The semaphore itself is never
  released on the dead holder's behalf: the adopter simply becomes the holder;
* a holder that died between acquiring the semaphore and writing its pid leaves the owner words
  empty; a waiter that sees them empty with an unchanged epoch for a whole ``lock_timeout``
  adopts the lock the same way.

The lock knows the control-word indices (``CTL_*``) and nothing else about the layout.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from typing import Any

from .exceptions import LockTimeout, UnsupportedPlatform
from .layout import (
    ARBITER_LOCK_BYTE,
    CTL_DIRTY,
    CTL_LOCK_RECOVERIES,
    CTL_LOCK_WAITS,
    CTL_OWNER_EPOCH,
    CTL_OWNER_PID,
    CTL_OWNER_START,
    DIRTY_REPAIRING,
)

try:
    import posix_ipc
except ImportError as err:  # pragma: no cover - posix_ipc is a hard dependency
    raise UnsupportedPlatform(
        "django-shmsession needs the posix-ipc package: pip install posix-ipc"
    ) from err

__all__ = ["POLL_INTERVAL", "TableLock", "holder_is_alive", "posix_ipc", "process_start_time"]

#: fcntl locks do not exclude threads (or handles) of one process; this does, for the arbiter.
_ADOPTION = threading.Lock()

#: Signals that can carry a Python handler (SIGKILL and SIGSTOP cannot be caught).
_CATCHABLE_SIGNALS = sorted(
    int(number) for number in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
)
#: Seconds a computed set of handled signals is reused (``signal.getsignal`` of every signal
#: costs ~20 µs; handlers are installed at start-up and rarely change).
_HANDLED_SIGNALS_TTL = 1.0
_handled_signals: tuple[float, frozenset[int]] = (0.0, frozenset())


def _signals_with_python_handlers() -> frozenset[int]:
    """Signals with a Python handler, when called from the main thread; empty elsewhere (only
    the main thread runs Python handlers)."""
    global _handled_signals
    if threading.current_thread() is not threading.main_thread():
        return frozenset()
    expires, handled = _handled_signals
    now = time.monotonic()
    if now >= expires:
        handled = frozenset(
            number for number in _CATCHABLE_SIGNALS if callable(signal.getsignal(number))
        )
        _handled_signals = (now + _HANDLED_SIGNALS_TTL, handled)
    return handled


#: How often a waiter wakes up to look at the holder (bounds recovery latency).
POLL_INTERVAL = 0.05


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` (field 22 of /proc/<pid>/stat), or None if it is dead or a zombie.

    A killed gunicorn worker stays a zombie until the master reaps it; it holds nothing.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X", b"x"):
        return None
    return int(fields[19])


def holder_is_alive(pid: int, start_time: int) -> bool:
    """True when process ``pid`` exists, is not a zombie and started at ``start_time``."""
    return pid != 0 and process_start_time(pid) == start_time


class _Identity:
    """This process's pid and start time, refreshed after fork (the child is a new owner)."""

    def __init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        self.pid = os.getpid()
        start = process_start_time(self.pid)
        if start is None:  # pragma: no cover - /proc is always mounted on supported hosts
            raise UnsupportedPlatform("django-shmsession needs /proc (Linux)")
        self.start_time = start


IDENTITY = _Identity()
os.register_at_fork(after_in_child=IDENTITY.refresh)


class _ThreadOwnership(threading.local):
    """The owner epoch this thread last recorded: tells whether this thread holds the lock."""

    epoch = -1


class TableLock:
    """Cross-process mutex over one table (see the module docstring for the protocol)."""

    def __init__(
        self, semaphore: Any, control: memoryview, arbiter_fd: int, timeout: float
    ) -> None:
        if not posix_ipc.SEMAPHORE_TIMEOUT_SUPPORTED:  # pragma: no cover - Linux supports it
            raise UnsupportedPlatform(
                "this platform has no timed semaphore waits (sem_timedwait), so a crashed "
                "worker could freeze every other one; django-shmsession needs Linux"
            )
        self._semaphore = semaphore
        self._control = control
        self._arbiter_fd = arbiter_fd
        self.timeout = timeout
        self.mine = _ThreadOwnership()

    def acquire(self) -> bool:
        """Take the lock; True when it was adopted from a dead holder (the caller must repair).

        Interrupting signals retry the wait. If a signal handler raises (gunicorn's SIGQUIT
        handler calls ``sys.exit``), the exception propagates and the lock is not held: an
        exception out of a successful ``sem.acquire`` call can only come from a handler that ran
        after the wait returned, so the semaphore is posted back. No Python-level call separates
        the wait from the owner record, so no handler can run in between.
        """
        try:
            self._semaphore.acquire(0)
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            try:
                return self._acquire_contended()
            except BaseException:
                self._release_if_mine()
                raise
        except BaseException:
            self._semaphore.release()
            raise
        control = self._control
        epoch = control[CTL_OWNER_EPOCH] + 1
        control[CTL_OWNER_EPOCH] = epoch
        control[CTL_OWNER_START] = IDENTITY.start_time
        control[CTL_OWNER_PID] = IDENTITY.pid
        self.mine.epoch = epoch
        return False

    def release(self) -> None:
        """Clear the owner words, then post the semaphore.

        ``SessionTable._locked`` inlines these two statements (a Python call is a point where a
        signal handler may run and raise before the post).
        """
        self._control[CTL_OWNER_PID] = 0
        self._semaphore.release()

    @property
    def semaphore(self) -> Any:
        return self._semaphore

    def owner(self) -> tuple[int, int, int]:
        """(pid, start time, epoch) as currently recorded; pid 0 means none recorded."""
        control = self._control
        return control[CTL_OWNER_PID], control[CTL_OWNER_START], control[CTL_OWNER_EPOCH]

    def adopt_if_dead(self) -> bool:
        """Become the holder if the recorded holder is dead; True if this call adopted.

        Used by gunicorn's ``child_exit`` hook so a dead worker's lock is recovered at once.
        """
        pid, start, epoch = self.owner()
        if pid == 0 or holder_is_alive(pid, start):
            return False
        self.mine.epoch = -1
        try:
            return self._adopt((pid, start, epoch))
        except BaseException:
            self._release_if_mine()
            raise

    def _release_if_mine(self) -> None:
        """Release the lock if this thread recorded itself as owner during the failed call."""
        control = self._control
        if control[CTL_OWNER_PID] == IDENTITY.pid and control[CTL_OWNER_EPOCH] == self.mine.epoch:
            self.release()

    def _acquire_contended(self) -> bool:
        control = self._control
        self.mine.epoch = -1
        deadline = time.monotonic() + self.timeout
        empty_since: tuple[int, float] | None = None  # (epoch, when first seen empty)
        while True:
            if self._wait_once():
                control[CTL_OWNER_EPOCH] += 1
                control[CTL_OWNER_START] = IDENTITY.start_time
                control[CTL_OWNER_PID] = IDENTITY.pid
                self.mine.epoch = control[CTL_OWNER_EPOCH]
                control[CTL_LOCK_WAITS] += 1
                return False
            observed = self.owner()
            pid, start, epoch = observed
            now = time.monotonic()
            if pid != 0:
                empty_since = None
                if control[CTL_DIRTY] == DIRTY_REPAIRING:
                    # A live holder rebuilding a large table may take seconds: not a hang.
                    deadline = max(deadline, now + self.timeout)
                if not holder_is_alive(pid, start) and self._adopt(observed):
                    return True
            elif empty_since is None or empty_since[0] != epoch:
                empty_since = (epoch, now)
            elif now - empty_since[1] >= self.timeout and self._adopt(observed):
                return True
            # An empty owner gets a full extra timeout to be adopted before giving up.
            if now >= deadline and (pid != 0 or now >= deadline + self.timeout):
                raise self._timeout_error(pid)

    def _wait_once(self) -> bool:
        """One timed wait; True if it took the semaphore.

        posix_ipc runs Python signal handlers inside an interrupted wait and replaces whatever
        they raise (KeyboardInterrupt, gunicorn's SystemExit) with SignalError, so the exception
        would be lost. In the main thread (the only one that runs Python handlers) the signals
        that have Python handlers are blocked during the wait; pending handlers run when the mask
        is restored, in Python, where their exceptions propagate normally (and the semaphore is
        posted back if this wait had taken it).
        """
        handled = _signals_with_python_handlers()
        if not handled:
            try:
                self._semaphore.acquire(POLL_INTERVAL)
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                return False
            except BaseException:  # a handler ran after a successful wait
                self._semaphore.release()
                raise
            return True
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        try:
            self._semaphore.acquire(POLL_INTERVAL)
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            acquired = False
        except BaseException:  # a handler (flagged by another thread) ran after a successful wait
            try:
                self._semaphore.release()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            raise
        else:
            acquired = True
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # pending handlers run here
        except BaseException:
            if acquired:
                self._semaphore.release()
            raise
        return acquired

    def _adopt(self, observed: tuple[int, int, int]) -> bool:
        """Take over from a dead holder unless another process already did (arbiter-guarded)."""
        with _ADOPTION:
            try:
                fcntl.lockf(self._arbiter_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, ARBITER_LOCK_BYTE)
            except OSError:
                return False  # another process is adopting right now
            try:
                if self.owner() != observed:
                    return False  # somebody adopted (or the lock moved on) meanwhile
                control = self._control
                control[CTL_OWNER_EPOCH] += 1
                control[CTL_OWNER_START] = IDENTITY.start_time
                control[CTL_OWNER_PID] = IDENTITY.pid
                self.mine.epoch = control[CTL_OWNER_EPOCH]
                control[CTL_LOCK_RECOVERIES] += 1
                return True
            finally:
                fcntl.lockf(self._arbiter_fd, fcntl.LOCK_UN, 1, ARBITER_LOCK_BYTE)

    def _timeout_error(self, pid: int) -> LockTimeout:
        holder = f"process {pid}" if pid else "a process that has not recorded its pid yet"
        return LockTimeout(
            f"the session table lock was held by {holder} for more than {self.timeout:g} s; "
            "that process is alive but stuck (inspect it, e.g. with py-spy dump --pid), or "
            "raise SHMSESSION['LOCK_TIMEOUT'] if such long holds are expected"
        )
