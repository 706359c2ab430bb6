"""The table lock: a POSIX semaphore whose holder may die anywhere without stalling the others.

The whole protocol, and the argument that it never has two live holders, is in
``docs/lock-protocol.md``; this module is its only implementation and the only writer of the
lock words (``CTL_LOCK_*``) and the registry. In short:

* every thread that uses the table claims a *slot* in the segment's registry and holds an
  open-file-description lock on that slot's byte for as long as it lives, so the kernel says
  whether a slot's owner is alive (no pids: pid reuse and PID namespaces do not matter);
* a thread writes its slot's state around each step (ACQUIRING, RELEASING, IDLE) and records
  its token as ``holder`` once it has the semaphore; the epoch advances on every
  acquire, adoption and release;
* a waiter that finds a dead recorded holder adopts the lock at once (the token died with it);
  when no holder is recorded, the one waiter holding the *arbiter* runs a probe that proves no
  live thread can own the semaphore before adopting (see the doc for the proof);
* :meth:`TableLock.run` owns the whole critical section: acquire, recover an interrupted write
  (through the table's :class:`Recovery`), run the operation, release (inlined).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
import signal
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from . import faults
from .exceptions import (
    CorruptTable,
    LockTimeout,
    ShmSessionError,
    UnsupportedPlatform,
    WouldBlock,
)
from .layout import (
    ARBITER_LOCK_BYTE,
    CONTROL_OFFSET,
    CONTROL_WORDS,
    CTL_LOCK_EPOCH,
    CTL_LOCK_HOLDER,
    CTL_LOCK_PRIORITY,
    CTL_LOCK_PRIORITY_SINCE,
    CTL_LOCK_PROBE,
    CTL_LOCK_PROBE_EPOCH,
    CTL_LOCK_RECOVERIES,
    CTL_LOCK_TIMEOUTS,
    CTL_LOCK_WAITS,
    CTL_REPAIR,
    CTL_SLOT_HWM,
    REGISTRY_OFFSET,
    REGISTRY_SIZE,
    REPAIR_RUNNING,
    SLOT_ACQUIRING,
    SLOT_COUNT,
    SLOT_IDLE,
    SLOT_LOCK_BASE,
    SLOT_RELEASING,
    SLOT_WORDS,
    SW_ACK,
    SW_INCARNATION,
    SW_PID,
    SW_SINCE,
    SW_STATE,
    SW_TID,
    slot_token,
    token_incarnation,
    token_slot,
)
from .platform import lock_byte, posix_ipc, reopen, unlock_byte

__all__ = ["FAULT_POINTS", "POLL_INTERVAL", "Recovery", "TableLock", "posix_ipc"]

logger = logging.getLogger("django_shmsession")

_T = TypeVar("_T")

#: How long one timed wait lasts: bounds how late a waiter notices a dead holder.
POLL_INTERVAL = 0.02
#: Timed waits of the arbiter while it collects probe echoes (it decides as soon as they are in).
PROBE_POLL = 0.002
#: A waiter that has waited a whole poll claims priority; a claim not refreshed for this long is
#: stale (its owner is stopped or gone) and ignored.
PRIORITY_TTL_NS = int(4 * POLL_INTERVAL * 1e9)
#: How long a thread that defers to a prioritized waiter sleeps before looking again.
DEFER_SLEEP = 0.0003

#: Fault points of the lock steps, in the order a contended acquire-run-release passes them
#: (tests SIGKILL a process at each). Each store and semaphore operation has a before and after.
#: Recording and adoption share their stores (holder, epoch): which one a point
#: belongs to is the test's scenario (a dead holder or not).
LOCK_STEPS = (
    "acquire:state=ACQUIRING",
    "acquire:sem_trywait",
    "acquire:sem_timedwait",
    "acquire:ack",
    "record:holder",
    "record:epoch",
    "probe:probe",
    "release:state=RELEASING",
    "release:holder",
    "release:epoch",
    "release:sem_post",
    "release:state=IDLE",
)
FAULT_POINTS = tuple(f"lock.{step}:{when}" for step in LOCK_STEPS for when in ("before", "after"))

#: Under gevent, a contended wait polls with non-blocking tries this far apart, sleeping
#: cooperatively in between (a blocking sem_timedwait would stop the whole hub).
COOPERATIVE_SLEEP = 0.0005


def _emit(records: list[tuple[int, str, tuple[Any, ...]]]) -> None:
    """Log records queued under the lock (called after the release)."""
    for level, message, args in records:
        logger.log(level, message, *args)


def _cooperative() -> bool:
    """True when gevent has patched this process: waits must yield to other greenlets."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return False
    try:
        return bool(monkey.is_module_patched("threading"))
    except Exception:  # pragma: no cover - an unexpected gevent: wait the blocking way
        return False


#: struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding), 32 bytes.
_FLOCK = struct.Struct("hhqqi4x")
_TOKEN_MASK = (1 << 64) - 1


class Recovery(Protocol):
    """What the lock needs from the table to finish or undo a write a dead holder left.

    ``pending_word`` is a one-word view that is nonzero while anything awaits recovery (the
    intent log's arm word): the lock tests it inline, with ``CTL_REPAIR``, on every critical
    section, and calls :meth:`pending`/:meth:`recover` only when one of them is set.
    """

    pending_word: memoryview

    def pending(self) -> bool:
        """Return True when an interrupted write (or detected corruption) awaits recovery."""

    def recover(self) -> None:
        """Roll the interrupted write back or forward (under the lock)."""

    def corrupted(self, err: CorruptTable) -> None:
        """Leave the table consistent after an operation found damage (under the lock)."""


def _try_ofd_lock(fd: int, byte: int) -> bool:
    """Take a write OFD lock on one byte without blocking; False if another description has it."""
    return lock_byte(fd, byte, wait=False)


def _ofd_unlock(fd: int, byte: int) -> None:
    unlock_byte(fd, byte)


def _ofd_locked_by_other(fd: int, byte: int) -> bool:
    """True when a description other than ``fd``'s holds a lock on ``byte`` (its owner lives)."""
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    reply = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, request)
    return int(_FLOCK.unpack(reply)[0]) != fcntl.F_UNLCK


# -- signals ---------------------------------------------------------------------------------------

#: Signals that can carry a Python handler (SIGKILL and SIGSTOP cannot be caught).
_CATCHABLE_SIGNALS = sorted(
    int(number) for number in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
)
#: Seconds a computed set of handled signals is reused (``signal.getsignal`` of every signal
#: costs ~20 µs; handlers are installed at start-up and rarely change).
_HANDLED_SIGNALS_TTL = 1.0
_handled_signals: tuple[float, frozenset[int]] = (0.0, frozenset())


def _signals_with_python_handlers() -> frozenset[int]:
    """Signals with a Python handler, from the main thread; empty elsewhere (only the main
    thread runs Python handlers)."""
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


# -- slots -----------------------------------------------------------------------------------------


class _Claim:
    """One thread's registry slot: its own file description (holding the slot's OFD lock)."""

    __slots__ = ("__weakref__", "ack", "fd", "pid", "since", "slot", "stale", "state", "token")

    def __init__(self, fd: int, slot: int, incarnation: int) -> None:
        self.fd = fd
        self.slot = slot
        self.token = slot_token(slot, incarnation)
        base = slot * SLOT_WORDS
        self.state = base + SW_STATE
        self.ack = base + SW_ACK
        self.since = base + SW_SINCE
        self.pid = os.getpid()
        self.stale = False

    def drop(self) -> None:
        """Close the description: the kernel frees the slot (unless a fork child shares it)."""
        if not self.stale:
            self.stale = True
            with contextlib.suppress(OSError):
                os.close(self.fd)


class _ClaimOwner:
    """Gives its thread's slot back when the thread ends.

    Only the thread-local storage refers to it, so it goes exactly when the thread does, even if
    a kept exception's traceback still refers to the claim itself (a frame of ``run``).
    """

    __slots__ = ("claim",)

    def __init__(self, claim: _Claim) -> None:
        self.claim = claim

    def __del__(self) -> None:
        claim = self.claim
        if not claim.stale and claim.pid == os.getpid():
            claim.drop()


#: Every live claim and lock of this process, so a fork child can forget its parent's.
_ALL_CLAIMS: weakref.WeakSet[_Claim] = weakref.WeakSet()
_ALL_LOCKS: weakref.WeakSet[TableLock] = weakref.WeakSet()


def _forget_claims_after_fork() -> None:
    """In a fork child: the inherited descriptions (and slot locks) are the parent's, and a
    claim lock another thread held at the fork would stay held forever in the child."""
    for claim in list(_ALL_CLAIMS):
        claim.drop()
    for table_lock in list(_ALL_LOCKS):
        table_lock._claim_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_claims_after_fork)


class _ThreadClaim(threading.local):
    claim: _Claim | None = None
    owner: _ClaimOwner | None = None


class _Runner(Protocol):
    def __call__(self, operation: Callable[..., _T], *args: Any) -> _T: ...


class _CallFlags(threading.local):
    #: Set by TableLock.without_waiting: raise WouldBlock instead of waiting or recovering.
    no_wait: bool = False


def _claim_storage() -> Any:
    """Where each thread keeps its claim: per thread, and per *OS* thread under gevent.

    gevent makes ``threading.local`` per greenlet: a worker with a thousand connections would
    claim a thousand registry slots (there are 1,024 for every process together) and pay a
    claim, a reopen and a slot scan, per request. Its greenlets share their thread's claim
    instead, taking turns through a greenlet lock (see ``TableLock._run_gated``).
    """
    if not _cooperative():
        return _ThreadClaim()
    original: Any = sys.modules["gevent.monkey"].get_original("threading", "local")

    class _OSThreadClaim(original):  # type: ignore[misc]
        claim: _Claim | None = None
        owner: _ClaimOwner | None = None
        gate: Any = None

    return _OSThreadClaim()


@dataclass
class _Probe:
    """An adoption probe in progress (held by the arbiter across polls)."""

    epoch: int
    number: int
    #: Consecutive final checks that found the way clear: adoption needs two, a poll apart, so
    #: a store still in another CPU's store buffer (weakly ordered CPUs) has drained.
    clear_checks: int = 0


@dataclass
class _Faulty:
    """A view or semaphore that calls the fault hook around every store (tests only)."""

    target: Any
    label: str

    def __getitem__(self, index: int) -> int:
        value: int = self.target[index]
        return value

    def __setitem__(self, index: int, value: int) -> None:
        point = _store_point(self.label, self.target, index, value)
        _fault(point, "before")
        self.target[index] = value
        _fault(point, "after")

    def acquire(self, timeout: float | None = None) -> None:
        step = "acquire:sem_trywait" if timeout == 0 else "acquire:sem_timedwait"
        _fault(step, "before")
        self.target.acquire(timeout)
        _fault(step, "after")

    def release(self) -> None:
        _fault("release:sem_post", "before")
        self.target.release()
        _fault("release:sem_post", "after")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


_STATE_POINTS = {
    SLOT_IDLE: "release:state=IDLE",
    SLOT_ACQUIRING: "acquire:state=ACQUIRING",
    SLOT_RELEASING: "release:state=RELEASING",
}


def _store_point(label: str, target: Any, index: int, value: int) -> str:
    """The fault-point step of one store, named by what it writes."""
    if label == "registry":
        if index % SLOT_WORDS == SW_STATE:
            return _STATE_POINTS.get(value, "registry:state")
        return "acquire:ack" if index % SLOT_WORDS == SW_ACK else "registry:slot"
    if index == CTL_LOCK_HOLDER:
        return "record:holder" if value else "release:holder"
    if index == CTL_LOCK_EPOCH:
        return "release:epoch" if target[CTL_LOCK_HOLDER] == 0 else "record:epoch"
    if index == CTL_LOCK_PROBE:
        return "probe:probe"
    return "control:counter"


def _fault(step: str, when: str) -> None:
    hook = faults.hook
    if hook is not None:
        hook(f"lock.{step}:{when}")


# -- the lock --------------------------------------------------------------------------------------


class TableLock:
    """Cross-process, cross-thread mutex over one table (protocol: docs/lock-protocol.md)."""

    def __init__(
        self,
        segment: Any,
        control: memoryview,
        timeout: float,
        recovery: Recovery,
        events: list[tuple[int, str, tuple[Any, ...]]] | None = None,
    ):
        if not posix_ipc.SEMAPHORE_TIMEOUT_SUPPORTED:  # pragma: no cover - Linux supports it
            raise UnsupportedPlatform(
                "this platform has no timed semaphore waits (sem_timedwait), so a crashed "
                "worker could freeze every other one; django-shmsession needs Linux"
            )
        del control  # the lock keeps views of its own (and wraps them for fault tests)
        self._segment = segment
        whole = memoryview(segment.memory)
        self._views = [
            whole[CONTROL_OFFSET : CONTROL_OFFSET + CONTROL_WORDS * 8].cast("Q"),
            whole[REGISTRY_OFFSET : REGISTRY_OFFSET + REGISTRY_SIZE].cast("Q"),
            whole,
        ]
        control_view, registry_view = self._views[0], self._views[1]
        self._control: Any = control_view
        self._registry: Any = registry_view
        self._semaphore: Any = segment.semaphore
        if faults.hook is not None:
            self._control = _Faulty(control_view, "control")
            self._registry = _Faulty(registry_view, "registry")
            self._semaphore = _Faulty(segment.semaphore, "semaphore")
        self.timeout = timeout
        self._recovery = recovery
        self._pending_word = recovery.pending_word
        #: Log records queued under the lock (by the table, recovery and this lock), emitted by
        #: the releasing thread after the post: nothing is logged while others wait.
        self._events: list[tuple[int, str, tuple[Any, ...]]] = [] if events is None else events
        self._local = _claim_storage()
        self._flags = _CallFlags()
        self._gated = _cooperative()
        self._claims: weakref.WeakSet[_Claim] = weakref.WeakSet()
        self._claim_lock = threading.Lock()
        self._closed = False
        _ALL_LOCKS.add(self)

    # -- the critical section --------------------------------------------------------------------

    def runner(self) -> _Runner:
        """The ``run`` callers should bind once: :meth:`_run`, or under gevent
        :meth:`_run_gated` (one greenlet at a time per thread). Returned, not stored on the
        lock: a bound method in an attribute would make every lock a reference cycle, whose
        views (and so its segment's pages) only a garbage collection would free."""
        return self._run_gated if self._gated else self._run

    def run(self, operation: Callable[..., _T], *args: Any) -> _T:
        """:meth:`_run` through :meth:`runner` (for callers that do not bind it)."""
        return self.runner()(operation, *args)

    def _run(self, operation: Callable[..., _T], *args: Any) -> _T:
        """Run ``operation`` holding the lock, after recovering any interrupted write.

        A ``CorruptTable`` from the operation lets the table repair, then retries once. The
        release is inlined in the ``finally``: no Python call (where a signal handler could raise)
        separates the last table write from the post. Called again by the thread that holds the
        lock (inside ``SessionTable.batch``), it runs ``operation`` under the same hold.

        :raises LockTimeout: one live holder kept the lock for the whole timeout.
        :raises WouldBlock: inside :meth:`without_waiting`, the call would have waited.
        """
        claim = self._local.claim
        if claim is None or claim.stale:
            claim = self._claim()
        control = self._control
        token = claim.token
        if control[CTL_LOCK_HOLDER] == token:
            return self._run_nested(operation, args)
        registry = self._registry
        semaphore = self._semaphore
        state = claim.state
        events = self._events
        queued = None
        recover = True
        try:
            registry[state] = SLOT_ACQUIRING
            priority = control[CTL_LOCK_PRIORITY]
            if priority and priority != token:
                self._acquire_contended(claim)
            else:
                try:
                    semaphore.acquire(0)
                except posix_ipc.BusyError:
                    self._acquire_contended(claim)
                except posix_ipc.Error:
                    raise  # the trywait itself failed: nothing was taken
                except BaseException:  # a signal handler raised after the trywait took it
                    self._give_back(claim)
                    raise
                else:
                    control[CTL_LOCK_HOLDER] = token
                    control[CTL_LOCK_EPOCH] += 1
            if self._pending_word[0] or control[CTL_REPAIR]:
                if self._flags.no_wait:
                    recover = False
                    raise WouldBlock("an interrupted write must be recovered first")
                self._recover()
            try:
                return operation(*args)
            except CorruptTable as err:
                self._recovery.corrupted(err)
                return operation(*args)
        finally:
            if control[CTL_LOCK_HOLDER] == token:
                try:
                    if recover and (self._pending_word[0] or control[CTL_REPAIR]):
                        self._recover()  # an exception interrupted a write in this thread
                finally:
                    if events:
                        queued = events[:]
                        events.clear()
                    registry[state] = SLOT_RELEASING
                    control[CTL_LOCK_HOLDER] = 0
                    control[CTL_LOCK_EPOCH] += 1
                    semaphore.release()
                    registry[state] = SLOT_IDLE
            else:
                registry[state] = SLOT_IDLE
            if queued:
                _emit(queued)

    def _run_nested(self, operation: Callable[..., _T], args: tuple[Any, ...]) -> _T:
        """``operation`` under the hold this thread already has (inside a batch)."""
        if self._pending_word[0] or self._control[CTL_REPAIR]:
            self._recover()  # a write earlier in the batch was interrupted by an exception
        try:
            return operation(*args)
        except CorruptTable as err:
            self._recovery.corrupted(err)
            return operation(*args)

    def without_waiting(self, operation: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Call ``operation``, but raise WouldBlock wherever its lock calls would wait.

        WouldBlock comes before the operation has done anything (when taking the lock), so the
        caller may run the same call again in a thread that can wait.
        """
        flags = self._flags
        if flags.no_wait:
            return operation(*args, **kwargs)
        flags.no_wait = True
        try:
            return operation(*args, **kwargs)
        finally:
            flags.no_wait = False

    def _run_gated(self, operation: Callable[..., _T], *args: Any) -> _T:
        """:meth:`_run` for one greenlet at a time per thread (under gevent, where the greenlets
        of a thread share its claim); the gate is a gevent lock, so waiting for it yields."""
        local = self._local
        gate = local.gate
        if gate is None:  # gevent's RLock: owned by a greenlet, waiting for it yields
            gate = local.gate = importlib.import_module("gevent.lock").RLock()
        if not gate.acquire(blocking=not self._flags.no_wait):
            raise WouldBlock("another greenlet of this thread is using the session table")
        try:
            return self._run(operation, *args)
        finally:
            gate.release()

    def _recover(self) -> None:
        recovery = self._recovery
        if recovery.pending():
            recovery.recover()

    # -- registry ---------------------------------------------------------------------------------

    def _claim(self) -> _Claim:
        """Claim a free registry slot for this thread (through a description of its own)."""
        with self._claim_lock:
            if self._closed:
                raise ShmSessionError("this SessionTable is closed; open a new one")
            fd = reopen(self._segment.fd)
            try:
                slot = self._lock_free_slot(fd)
            except BaseException:
                os.close(fd)
                raise
            registry = self._registry
            base = slot * SLOT_WORDS
            incarnation = (registry[base + SW_INCARNATION] + 1) & 0xFFFFFFFFFFFF
            registry[base + SW_STATE] = SLOT_IDLE
            registry[base + SW_ACK] = 0
            registry[base + SW_SINCE] = 0
            registry[base + SW_PID] = os.getpid()
            registry[base + SW_TID] = threading.get_native_id()
            registry[base + SW_INCARNATION] = incarnation
            claim = _Claim(fd, slot, incarnation)
            self._local.claim = claim
            self._local.owner = _ClaimOwner(claim)
            self._claims.add(claim)
            _ALL_CLAIMS.add(claim)
            return claim

    def _lock_free_slot(self, fd: int) -> int:
        control = self._control
        # The recorded holder's slot, if free, belongs to a dead holder not yet adopted: left
        # alone, so its pid still names the dead process in the adopter's log line.
        holder = control[CTL_LOCK_HOLDER]
        dead_holders = token_slot(holder) if holder else -1
        for slot in range(SLOT_COUNT):
            if slot == dead_holders:
                continue
            if _try_ofd_lock(fd, SLOT_LOCK_BASE + slot):
                if slot >= min(control[CTL_SLOT_HWM], SLOT_COUNT):
                    control[CTL_SLOT_HWM] = slot + 1
                return slot
        raise ShmSessionError(
            f"all {SLOT_COUNT} registry slots of the session table are in use: more than "
            f"{SLOT_COUNT} threads use it at once; use fewer threads per worker"
        )

    def _slot_alive(self, fd: int, slot: int) -> bool:
        return _ofd_locked_by_other(fd, SLOT_LOCK_BASE + slot)

    def _token_alive(self, fd: int, token: int) -> bool:
        """True when the owner of ``token`` still owns its slot and lives."""
        slot = token_slot(token)
        if not 0 <= slot < SLOT_COUNT:
            return False  # a corrupt word names no one: nobody can be robbed
        incarnation = self._registry[slot * SLOT_WORDS + SW_INCARNATION]
        return incarnation == token_incarnation(token) and self._slot_alive(fd, slot)

    def _slot_hwm(self) -> int:
        return int(min(self._control[CTL_SLOT_HWM], SLOT_COUNT))

    # -- contended acquisition --------------------------------------------------------------------

    def _acquire_contended(self, claim: _Claim) -> bool:
        """Wait until this thread holds the lock; True if it adopted it from a dead holder.

        The record stores follow a successful wait inline (no Python call in between, where a
        signal handler could raise with the token taken but not recorded).

        :raises LockTimeout: the same live holder kept the lock, the epoch unmoved, for
            ``timeout`` seconds. On any exception this thread does not hold the lock.
        """
        if self._flags.no_wait:
            raise WouldBlock("the session table lock is held by another thread or process")
        registry = self._registry
        control = self._control
        token = claim.token
        registry[claim.since] = time.monotonic_ns()
        wait = _Wait(self, claim)
        try:
            while True:
                if wait.deferring():
                    time.sleep(DEFER_SLEEP)
                elif self._wait_once(claim, wait.poll()):
                    control[CTL_LOCK_HOLDER] = token
                    control[CTL_LOCK_EPOCH] += 1
                    self._recorded(claim)
                    return False
                # Not owning the token, this thread answers the current probe (a thread that
                # owns the token never writes its ack: that is what the probe relies on).
                registry[claim.ack] = control[CTL_LOCK_PROBE]
                outcome = wait.after_failed_wait()
                if outcome is not None:
                    return outcome
        except BaseException:
            wait.abandon()
            raise
        finally:
            registry[claim.since] = 0
            wait.finish()

    def _recorded(self, claim: _Claim) -> None:
        """Bookkeeping once this thread is the recorded holder (after a wait or an adoption)."""
        control = self._control
        control[CTL_LOCK_WAITS] += 1
        if control[CTL_LOCK_PRIORITY] == claim.token:
            control[CTL_LOCK_PRIORITY] = 0

    def _adopt(self, claim: _Claim, dead: str) -> None:
        """Become the holder of a token that died with its owner (caller holds the arbiter).

        ``dead`` says who died, for the log line queued here (emitted after the release).
        """
        since = self._registry[claim.since]
        waited = f"{(time.monotonic_ns() - since) / 1e6:.0f} ms" if since else "no time"
        self._events.append(
            (
                logging.WARNING,
                "django-shmsession: took over the session table lock of %s from %s, which died "
                "holding it, after waiting %s",
                (self._segment.name, dead, waited),
            )
        )
        control = self._control
        control[CTL_LOCK_HOLDER] = claim.token
        control[CTL_LOCK_EPOCH] += 1
        control[CTL_LOCK_RECOVERIES] += 1
        self._recorded(claim)

    def _give_back(self, claim: _Claim) -> None:
        """Post a token this thread took but never recorded (a signal handler raised at the
        semaphore call), as a release: RELEASING and an epoch advance before the post, which
        the probe's argument relies on (every post follows an epoch move)."""
        self._registry[claim.state] = SLOT_RELEASING
        self._control[CTL_LOCK_EPOCH] += 1
        self._semaphore.release()

    def _wait_once(self, claim: _Claim, timeout: float) -> bool:
        """One timed wait; True if it took the semaphore.

        posix_ipc runs Python signal handlers inside an interrupted wait and replaces whatever
        they raise (KeyboardInterrupt, gunicorn's SystemExit) with SignalError, so the exception
        would be lost. In the main thread (the only one that runs Python handlers) the signals
        that have Python handlers are blocked during the wait; pending handlers run when the mask
        is restored, in Python, where their exceptions propagate normally (and the semaphore is
        posted back if this wait had taken it).
        """
        semaphore = self._semaphore
        if _cooperative():
            return self._wait_cooperatively(claim, timeout)
        handled = _signals_with_python_handlers()
        if not handled:
            try:
                semaphore.acquire(timeout)
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                return False
            except posix_ipc.Error:
                raise  # the wait itself failed: nothing was taken
            except BaseException:  # a handler ran after a successful wait
                self._give_back(claim)
                raise
            return True
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        try:
            semaphore.acquire(timeout)
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            acquired = False
        except posix_ipc.Error:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            raise  # the wait itself failed: nothing was taken
        except BaseException:  # a handler (flagged by another thread) ran after a successful wait
            try:
                self._give_back(claim)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            raise
        else:
            acquired = True
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # pending handlers run here
        except BaseException:
            if acquired:
                self._give_back(claim)
            raise
        return acquired

    def _wait_cooperatively(self, claim: _Claim, timeout: float) -> bool:
        """One wait of ``timeout`` seconds made of non-blocking tries and gevent-patched sleeps
        (so other greenlets run meanwhile); True if it took the semaphore."""
        deadline = time.monotonic() + timeout
        while not self._try_take(claim):
            if time.monotonic() >= deadline:
                return False
            time.sleep(COOPERATIVE_SLEEP)  # gevent's sleep: the hub runs other greenlets
        return True

    def _try_take(self, claim: _Claim) -> bool:
        """One trywait: True if this thread took the semaphore (the caller records it next,
        with no Python call in between), False if it is busy.

        :meth:`_run` keeps its own copy inline: it is the hot path.
        """
        try:
            self._semaphore.acquire(0)
        except posix_ipc.BusyError:
            return False
        except posix_ipc.Error:
            raise  # the trywait itself failed: nothing was taken
        except BaseException:  # a signal handler raised after the trywait took it
            self._give_back(claim)
            raise
        return True

    # -- adoption ---------------------------------------------------------------------------------

    def _adopt_recorded(self, claim: _Claim, holder: int, epoch: int) -> bool:
        """Adopt from a recorded holder that is dead; the caller holds the arbiter."""
        control = self._control
        if control[CTL_LOCK_HOLDER] != holder or control[CTL_LOCK_EPOCH] != epoch:
            return False
        if self._token_alive(claim.fd, holder):
            return False
        self._adopt(claim, self._describe_dead(holder))
        return True

    def _scan(self, claim: _Claim, probe: int | None) -> str:
        """Classify the other threads: "holder" if a live one is the recorded holder or is
        RELEASING, "pending" if (with ``probe``) a live one has neither echoed it nor gone idle,
        else "clear".

        The holder word is read before the slots: a thread that owns the token after recording
        itself has either its token in ``holder`` or its slot RELEASING (set before ``holder`` is
        cleared), so it cannot slip between the two reads.
        """
        registry = self._registry
        holder = self._control[CTL_LOCK_HOLDER]
        if holder and holder != claim.token and self._token_alive(claim.fd, holder):
            return "holder"
        pending = False
        for slot in range(self._slot_hwm()):
            if slot == claim.slot:
                continue
            base = slot * SLOT_WORDS
            state = registry[base + SW_STATE]
            if state == SLOT_IDLE:
                continue
            if not self._slot_alive(claim.fd, slot):
                continue
            if state == SLOT_RELEASING:
                return "holder"
            if probe is not None and registry[base + SW_ACK] != probe:
                pending = True
        return "pending" if pending else "clear"

    def _start_probe(self, claim: _Claim) -> _Probe | bool:
        """Probe steps 1-4 (the caller holds the arbiter): True if the token turned out to be
        free (this thread now holds it, recorded), False if a live holder exists, else the probe
        whose echoes step 5 collects."""
        control = self._control
        epoch = control[CTL_LOCK_EPOCH]
        if self._scan(claim, None) == "holder":
            return False
        if self._try_take(claim):
            control[CTL_LOCK_HOLDER] = claim.token
            control[CTL_LOCK_EPOCH] += 1
            self._recorded(claim)
            return True
        number = (control[CTL_LOCK_PROBE] + 1) & _TOKEN_MASK or 1
        control[CTL_LOCK_PROBE_EPOCH] = epoch
        control[CTL_LOCK_PROBE] = number
        return _Probe(epoch, number)

    def _current_probe(self) -> _Probe | None:
        """The probe another arbiter started at the current epoch, which this one may finish.

        Arbiters take turns (each holds the arbiter only while it looks): if each started a
        probe of its own, every new number would void the others' and none would finish.
        """
        control = self._control
        number, epoch = control[CTL_LOCK_PROBE], control[CTL_LOCK_PROBE_EPOCH]
        if number and epoch == control[CTL_LOCK_EPOCH]:
            return _Probe(epoch, number)
        return None

    def _finish_probe(self, claim: _Claim, probe: _Probe) -> bool | None:
        """Probe step 5: True if adopted, False if the probe failed, None to keep waiting."""
        control = self._control
        if control[CTL_LOCK_PROBE] != probe.number:
            return False  # another arbiter started a probe of its own meanwhile
        verdict = self._scan(claim, probe.number)
        if control[CTL_LOCK_EPOCH] != probe.epoch or verdict == "holder":
            return False  # read last: any post after the scan began has moved the epoch
        if verdict == "pending" or control[CTL_LOCK_HOLDER] != 0:
            probe.clear_checks = 0
            return None
        probe.clear_checks += 1
        if probe.clear_checks < 2:
            return None
        self._adopt(claim, "a process that died while taking or releasing it")
        return True

    def recover_dead_holder(self, patience: float = 0.1) -> bool:
        """If the lock's holder is dead, take it over, recover its write and release; True if so.

        For gunicorn's ``child_exit`` hook, which knows a worker just died: a recorded dead holder
        is adopted at once; a holder that died in a window is found by a probe, which waits at
        most ``patience`` seconds for the waiting threads to answer.
        """
        claim = self._local.claim
        if claim is None or claim.stale:
            claim = self._claim()
        registry = self._registry
        registry[claim.state] = SLOT_ACQUIRING
        adopted = False
        queued = None
        try:
            adopted = self._adopt_if_dead(claim, patience)
        finally:
            if self._control[CTL_LOCK_HOLDER] == claim.token:
                try:
                    self._recover()
                finally:
                    queued = self._events[:]
                    self._events.clear()
                    self._release(claim)
            else:
                registry[claim.state] = SLOT_IDLE
            if queued:
                _emit(queued)
        return adopted

    def _adopt_if_dead(self, claim: _Claim, patience: float) -> bool:
        """Adopt a dead holder's lock now (recorded) or after a probe of at most ``patience``."""
        control = self._control
        holder, epoch = control[CTL_LOCK_HOLDER], control[CTL_LOCK_EPOCH]
        if holder and self._token_alive(claim.fd, holder):
            return False
        if not _try_ofd_lock(claim.fd, ARBITER_LOCK_BYTE):
            return False  # a waiter is adopting right now
        try:
            if holder:
                return self._adopt_recorded(claim, holder, epoch)
            probe = self._start_probe(claim)
            if isinstance(probe, bool):
                return False  # the lock was free (now held by this thread) or has a live holder
            deadline = time.monotonic() + patience
            while time.monotonic() < deadline:
                if self._wait_once(claim, PROBE_POLL):
                    control[CTL_LOCK_HOLDER] = claim.token
                    control[CTL_LOCK_EPOCH] += 1
                    return False  # the token was free after all
                outcome = self._finish_probe(claim, probe)
                if outcome is not None:
                    return outcome
            return False
        finally:
            _ofd_unlock(claim.fd, ARBITER_LOCK_BYTE)

    def _release(self, claim: _Claim) -> None:
        registry, control = self._registry, self._control
        registry[claim.state] = SLOT_RELEASING
        control[CTL_LOCK_HOLDER] = 0
        control[CTL_LOCK_EPOCH] += 1
        self._semaphore.release()
        registry[claim.state] = SLOT_IDLE

    # -- introspection ----------------------------------------------------------------------------

    def holder(self) -> tuple[int, int] | None:
        """(pid, tid) of the recorded holder, as it wrote them, or None (for messages)."""
        token = self._control[CTL_LOCK_HOLDER]
        slot = token_slot(token) if token else -1
        if not 0 <= slot < SLOT_COUNT:
            return None
        base = slot * SLOT_WORDS
        return int(self._registry[base + SW_PID]), int(self._registry[base + SW_TID])

    def _describe_dead(self, token: int) -> str:
        """Who held ``token`` (dead): its slot's pid, unless the slot was claimed again since
        (by this adopter, say: a gunicorn replacement worker takes the lowest free slot)."""
        slot = token_slot(token)
        if not 0 <= slot < SLOT_COUNT:
            return "an unknown process"
        if self._registry[slot * SLOT_WORDS + SW_INCARNATION] != token_incarnation(token):
            return "a process whose registry slot has been reused since"
        return self.describe_slot(slot)

    def describe_slot(self, slot: int) -> str:
        base = slot * SLOT_WORDS
        pid, tid = self._registry[base + SW_PID], self._registry[base + SW_TID]
        return f"process {pid}" + (f" (thread {tid})" if tid != pid else "")

    def close(self) -> None:
        """Give back this handle's registry slots and drop its views of the segment."""
        with self._claim_lock:
            self._closed = True
            for claim in list(self._claims):
                claim.drop()
            self._local = _claim_storage()
        for view in self._views:
            view.release()


class _Wait:
    """One contended acquisition: deadline, priority, and the adoption work between waits."""

    def __init__(self, lock: TableLock, claim: _Claim) -> None:
        self.lock = lock
        self.claim = claim
        self.control = lock._control
        self.epoch = self.control[CTL_LOCK_EPOCH]
        self.holder = self.control[CTL_LOCK_HOLDER]
        self.deadline = time.monotonic() + lock.timeout
        self.arbiter = False
        self.probe: _Probe | None = None
        self.deferred_since: float | None = None

    def poll(self) -> float:
        return PROBE_POLL if self.probe is not None else POLL_INTERVAL

    def deferring(self) -> bool:
        """True while another live waiter's fresh priority claim stands (do not touch S)."""
        priority = self.control[CTL_LOCK_PRIORITY]
        if not priority or priority == self.claim.token or self.probe is not None:
            return False
        age: int = time.monotonic_ns() - self.control[CTL_LOCK_PRIORITY_SINCE]
        return 0 <= age < PRIORITY_TTL_NS

    def after_failed_wait(self) -> bool | None:
        """Look at the holder after a wait that did not get the lock.

        Returns True once this thread adopted the lock, False once it holds it without adopting
        (the probe found the token free), None to keep waiting.
        """
        control = self.control
        now = time.monotonic()
        epoch, holder = control[CTL_LOCK_EPOCH], control[CTL_LOCK_HOLDER]
        if epoch != self.epoch or holder != self.holder:
            self.epoch, self.holder = epoch, holder
            self.deadline = now + self.lock.timeout  # progress: the timeout starts over
            self.probe = None
        self._claim_priority()
        try:
            outcome = self._look_at_holder(holder, epoch, now)
        finally:
            # Held only while looking: a stopped prober must not keep others from adopting.
            self._give_up_arbiter()
        if outcome is not None:
            return outcome
        if now >= self.deadline:
            raise self._timeout()
        return None

    def _look_at_holder(self, holder: int, epoch: int, now: float) -> bool | None:
        lock = self.lock
        if holder:
            if lock._token_alive(self.claim.fd, holder):
                if self.control[CTL_REPAIR] == REPAIR_RUNNING:
                    self.deadline = max(self.deadline, now + lock.timeout)
                self.probe = None
                return None
            if self._take_arbiter() and lock._adopt_recorded(self.claim, holder, epoch):
                return True
            return None
        if self._take_arbiter():
            return self._advance_probe()
        return None

    def _advance_probe(self) -> bool | None:
        """Start the probe, or collect its echoes; True adopted, False holding, None waiting."""
        lock = self.lock
        if self.probe is None or self.probe.number != self.control[CTL_LOCK_PROBE]:
            self.probe = lock._current_probe()
        if self.probe is None:
            started = lock._start_probe(self.claim)
            if started is True:
                return False
            if started is not False:
                self.probe = started
            return None
        outcome = lock._finish_probe(self.claim, self.probe)
        if outcome is False:
            self.probe = None  # start over at the next failed wait
            return None
        return outcome

    def _claim_priority(self) -> None:
        """After a whole failed poll, make this the prioritized waiter if it is the oldest."""
        control = self.control
        token = self.claim.token
        now_ns = time.monotonic_ns()
        current = control[CTL_LOCK_PRIORITY]
        if current != token:
            fresh = 0 <= now_ns - control[CTL_LOCK_PRIORITY_SINCE] < PRIORITY_TTL_NS
            if current and fresh and not self._older_than(current):
                return
            control[CTL_LOCK_PRIORITY] = token
        control[CTL_LOCK_PRIORITY_SINCE] = now_ns

    def _older_than(self, other: int) -> bool:
        slot = token_slot(other)
        if not 0 <= slot < SLOT_COUNT:
            return True
        registry = self.lock._registry
        theirs: int = registry[slot * SLOT_WORDS + SW_SINCE]
        mine: int = registry[self.claim.since]
        return theirs == 0 or mine < theirs

    def _take_arbiter(self) -> bool:
        if not self.arbiter:
            self.arbiter = _try_ofd_lock(self.claim.fd, ARBITER_LOCK_BYTE)
        return self.arbiter

    def _give_up_arbiter(self) -> None:
        if self.arbiter:
            _ofd_unlock(self.claim.fd, ARBITER_LOCK_BYTE)
            self.arbiter = False

    def abandon(self) -> None:
        control = self.control
        if control[CTL_LOCK_PRIORITY] == self.claim.token:
            control[CTL_LOCK_PRIORITY] = 0

    def finish(self) -> None:
        self._give_up_arbiter()

    def _timeout(self) -> LockTimeout:
        lock = self.lock
        lock._control[CTL_LOCK_TIMEOUTS] += 1
        if self.holder:
            slot = token_slot(self.holder)
            who = lock.describe_slot(slot) if 0 <= slot < SLOT_COUNT else "an unknown process"
            detail = f"held by {who}"
        else:
            detail = "held by a process in the middle of taking or releasing it (it may be stopped)"
        error = LockTimeout(
            f"the session table lock was {detail} for more than {lock.timeout:g} s without "
            "progress; that process is alive but stuck (inspect it, e.g. with py-spy dump "
            "--pid), or raise the lock timeout if such long holds are expected"
        )
        logger.error("django-shmsession: %s: %s", lock._segment.name, error)  # not holding it
        return error
