"""Warm restart under gunicorn, driven by ``SHMSESSION["SNAPSHOT"]`` (called by :mod:`.gunicorn`).

- **At start** (``on_starting``, master, before any worker): if the master just *created* the
  segment (a reboot, a new container, after ``unlink``), the snapshot is restored into it. A
  segment that already existed is newer than any snapshot and is left alone. A snapshot that
  cannot be restored completely is renamed aside (``<PATH>.unrestored-<time>``) before anything
  can dump over it, so nothing it held is lost; the server starts anyway.
- **Every INTERVAL seconds**: a ``SIGALRM`` timer in the master forks a short-lived child that
  opens the table, dumps it and exits. The master itself never maps the table (see
  :mod:`.gunicorn`) and never waits for a dump: its main loop keeps supervising workers. A dump
  still running when the next one is due delays that one; each dump starts early by 1.5 times
  the previous one's duration, so the snapshot on disk is never more than INTERVAL seconds
  behind the table while dumps take less than a third of INTERVAL.
- **At a clean shutdown** (``on_exit``, after the workers have stopped): a running periodic dump
  is stopped and the master dumps once more, so nothing written before the stop is lost.

A forked child, not a thread: gunicorn forks workers from the master, and forking a process
with threads can deadlock the child. The child is reaped by gunicorn's ``waitpid(-1)`` loop like
any unknown child; the master follows it through a pidfd, which never names a reused pid.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import struct
import time
from types import FrameType
from typing import Any

from . import conf, snapshot_ops, store
from .exceptions import SegmentNotFound, ShmSessionError
from .table import SessionTable

#: Seconds on_exit waits for a running periodic dump to stop before dumping itself.
STOP_TIMEOUT = 10.0
#: A periodic dump still running when the next is due: look again this much later.
RETRY = 1.0
_DURATION = struct.Struct("d")

_periodic: PeriodicDumps | None = None


def restore_at_start(server: Any, config: conf.ShmSessionConfig, table: SessionTable) -> None:
    """Restore the snapshot into ``table`` if this master created it; never raises a
    snapshot or table error (the server must start; the failure is logged)."""
    snap = config.snapshot
    if snap is None or not table.created:
        return
    if not os.path.exists(snap.path):
        server.log.info("django-shmsession: no snapshot at %s yet; starting empty", snap.path)
        return
    try:
        result = snapshot_ops.restore(table, snap.path)
    except (ShmSessionError, OSError) as err:
        aside = _set_aside(snap.path)
        server.log.error(
            "django-shmsession: cannot restore %s: %s; starting without its sessions. It was "
            "kept as %s: restore it by hand with `manage.py shmsession restore %s`",
            snap.path,
            err,
            aside,
            aside,
        )
        return
    server.log.info("django-shmsession: %s", result.summary())
    if result.damaged:
        aside = _set_aside(snap.path)
        server.log.error(
            "django-shmsession: the snapshot %s is damaged (%s); what verified was restored. "
            "It was kept as %s",
            snap.path,
            result.damage.summary(result.records),
            aside,
        )


def _set_aside(path: str) -> str:
    """Rename ``path`` so that no later dump replaces it; returns the new name."""
    aside = f"{path}.unrestored-{time.strftime('%Y%m%dT%H%M%S')}"
    try:
        os.rename(path, aside)
    except OSError:
        return path  # nothing else to do; the log line names the file as it is
    return aside


def start_periodic(server: Any, config: conf.ShmSessionConfig) -> None:
    """Arm the master's dump timer (once per master; nothing when INTERVAL is 0 or unset)."""
    global _periodic
    snap = config.snapshot
    if snap is None or snap.interval <= 0 or _periodic is not None:
        return
    _periodic = PeriodicDumps(server, config)
    _periodic.start()


def dump_at_exit(server: Any, config: conf.ShmSessionConfig) -> None:
    """Stop the timer and any running dump, then dump once more; never raises."""
    global _periodic
    if _periodic is not None:
        _periodic.stop(STOP_TIMEOUT)
        _periodic = None
    snap = config.snapshot
    if snap is None:
        return
    try:
        table = store.open_table(config, create=False)
    except SegmentNotFound:
        server.log.warning("django-shmsession: no table to dump at exit; %s kept", snap.path)
        return
    except (ShmSessionError, OSError) as err:
        server.log.error("django-shmsession: cannot open the table to dump it: %s", err)
        return
    try:
        result = snapshot_ops.dump(table, snap.path)
    except (ShmSessionError, OSError) as err:
        server.log.error("django-shmsession: the dump at exit failed: %s", err)
        return
    finally:
        table.close()
    server.log.info("django-shmsession: %s", result.summary())


class PeriodicDumps:
    """The master's SIGALRM timer and the one dump child it may have running."""

    def __init__(self, server: Any, config: conf.ShmSessionConfig) -> None:
        assert config.snapshot is not None
        self.server = server
        self.config = config
        self.interval = config.snapshot.interval
        self.master = os.getpid()
        self.pidfd: int | None = None
        self.pid: int | None = None  # the last child (for logs and tests; gunicorn reaps it)
        self.results: int | None = None  # read end of the running child's pipe
        self.last_duration = 0.0
        self.spawned_at = 0.0
        self.warned = False

    def start(self) -> None:
        signal.signal(signal.SIGALRM, self._on_alarm)
        self._arm(self.interval)

    def _arm(self, delay: float) -> None:
        signal.setitimer(signal.ITIMER_REAL, max(delay, 0.05))

    def _next_delay(self) -> float:
        return max(self.interval - 1.5 * self.last_duration, self.interval / 4)

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        """Runs in the master's main thread between two bytecodes: fork, re-arm, return."""
        if os.getpid() != self.master:  # a process forked from the master: not its timer
            return
        if self._running():
            self._warn_if_stuck()
            self._arm(RETRY)
            return
        self._spawn()
        self._arm(self._next_delay())

    def _warn_if_stuck(self) -> None:
        """Once per child: say so when a dump runs for 3 intervals (a hung disk, a lock held
        by a stopped process): the snapshot on disk is getting old meanwhile. Logging from the
        handler is safe here: logging's locks are reentrant, and this is the main thread."""
        if self.warned or time.monotonic() - self.spawned_at < 3 * self.interval:
            return
        self.warned = True
        self.server.log.warning(
            "django-shmsession: the periodic dump (pid %s) has run for %.0f s; no newer "
            "snapshot is written until it ends",
            self.pid,
            time.monotonic() - self.spawned_at,
        )

    def _running(self) -> bool:
        """Whether the last child still runs; collects its duration when it has finished."""
        if self.pidfd is None:
            return False
        if not select.select([self.pidfd], [], [], 0)[0]:
            return True
        if self.results is not None:
            with contextlib.suppress(OSError):
                data = os.read(self.results, _DURATION.size)
                if len(data) == _DURATION.size:
                    self.last_duration = _DURATION.unpack(data)[0]
        self._forget_child()
        return False

    def _forget_child(self) -> None:
        for fd in (self.pidfd, self.results):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.pidfd = self.results = None

    def _spawn(self) -> None:
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child ends in os._exit (coverage saves it)
            # Nothing may ever return from here: the child's stack is the master's (we are in
            # its signal handler), and an exception escaping would make it a second master.
            try:
                os.close(read_end)
                _dump_child(self.server, self.config, write_end)
            finally:
                os._exit(1)
        os.close(write_end)
        self.pid = pid
        self.spawned_at = time.monotonic()
        self.warned = False
        self.results = read_end
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:  # exited and reaped already: nothing to follow
            self._forget_child()

    def stop(self, timeout: float) -> None:
        """Disarm; ask a running child to stop and wait (its temporary file goes at the next
        dump, which on_exit makes at once)."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        if self.pidfd is None:
            return
        if self._running():
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGTERM)
            select.select([self.pidfd], [], [], timeout)
        self._forget_child()


def _dump_child(server: Any, config: conf.ShmSessionConfig, results: int) -> None:
    """The forked dumper: no gunicorn signal handling, no listening sockets; dump and exit.

    Ends in ``os._exit`` whatever happens. A stop signal exits at once (``_exit_on_signal``)
    instead of raising: an exception raised at the wrong instant (inside the ``finally``) could
    otherwise escape into the master's code. A killed dump's temporary file is removed by the
    next dump.
    """
    code = 1
    try:
        _become_plain_process(server)
        assert config.snapshot is not None
        try:
            table = store.open_table(config, create=False)
        except SegmentNotFound:  # unlinked and not re-created yet: keep the old snapshot
            code = 0
            return
        with table:
            result = snapshot_ops.dump(table, config.snapshot.path)
        os.write(results, _DURATION.pack(result.duration))
        if result.duration > config.snapshot.interval / 3:
            server.log.warning(
                "django-shmsession: the dump took %.1f s, more than a third of "
                "SNAPSHOT['INTERVAL'] (%g s): raise INTERVAL. %s",
                result.duration,
                config.snapshot.interval,
                result.summary(),
            )
        code = 0
    except BaseException as err:
        with contextlib.suppress(BaseException):
            server.log.error(
                "django-shmsession: the periodic dump failed: %s: %s", type(err).__name__, err
            )
    finally:
        os._exit(code)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """Stop the dump child now (gunicorn's stop, on_exit, an operator's kill)."""
    os._exit(128 + signum)


def _become_plain_process(server: Any) -> None:
    """Drop what the child inherited from the master and must not act on."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    for name in ("SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGTTIN", "SIGTTOU", "SIGALRM"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for name in ("SIGTERM", "SIGINT", "SIGQUIT"):
        signal.signal(getattr(signal, name), _exit_on_signal)
    for listener in getattr(server, "LISTENERS", None) or []:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            os.close(listener.fileno())
