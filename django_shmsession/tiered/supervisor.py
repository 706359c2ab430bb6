"""The listener as a child of the gunicorn master, restarted whenever it exits.

``on_starting`` (master, before the first fork) starts a thread that runs
``python -m django_shmsession.tiered.listener`` and waits for it; when the listener dies
(SIGKILL, OOM, a bug) the thread logs it and starts a new one after RESTART_DELAY. The thread
exists only in the master: forked workers do not inherit threads. ``on_exit`` stops it.

The listener is started with ``os.posix_spawn``, not ``subprocess.Popen``: Popen waits on a
pipe until the child has exec'd, and a worker the master forks meanwhile inherits that pipe and
never closes it, so the supervisor would block forever (seen in the two-host tests: the listener
ran, but was never restarted after it died). gunicorn's SIGCHLD handler reaps every child, ours
included; ``waitpid`` then fails with ChildProcessError, which still tells the thread it exited.
The listener exits by itself if the master disappears without ``on_exit`` (its parent changes).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

#: Seconds between a listener's exit and its replacement.
RESTART_DELAY = 0.5


class ListenerSupervisor:
    """Runs and restarts the host listener process."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._stop = threading.Event()
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name="shmsession-listener-supervisor", daemon=True
        )
        self.restarts = 0

    def start(self) -> None:
        self._thread.start()

    @property
    def pid(self) -> int | None:
        return self._pid

    def _spawn(self) -> int:
        env = dict(os.environ)
        # The master's import path (the project directory gunicorn runs in, --pythonpath).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        argv = [sys.executable, "-m", "django_shmsession.tiered.listener"]
        return os.posix_spawn(sys.executable, argv, env)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._stop.is_set():
                    return
                self._pid = pid = self._spawn()
            self.log.info("django-shmsession: listener started (pid %s)", pid)
            status = _wait(pid)
            if self._stop.is_set():
                return
            self.restarts += 1
            self.log.warning(
                "django-shmsession: listener (pid %s) exited (%s); restarting it; "
                "meanwhile every L1 copy is revalidated",
                pid,
                status,
            )
            self._stop.wait(RESTART_DELAY)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and terminate the listener (SIGTERM, then SIGKILL)."""
        with self._lock:
            self._stop.set()
            pid = self._pid
        if pid is not None and _signal(pid, signal.SIGTERM):
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        self._thread.join(timeout)


def _wait(pid: int) -> str:
    """Block until ``pid`` exits; its status, or "reaped by gunicorn" when the master got it."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "status reaped by the master"
    return f"status {os.waitstatus_to_exitcode(status)}"


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == 0


def _signal(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


_supervisor: ListenerSupervisor | None = None


def start(log: Any) -> ListenerSupervisor:
    """Start the master's supervisor (once)."""
    global _supervisor
    if _supervisor is None:
        _supervisor = ListenerSupervisor(log)
        _supervisor.start()
    return _supervisor


def stop() -> None:
    global _supervisor
    supervisor, _supervisor = _supervisor, None
    if supervisor is not None:
        supervisor.stop()
