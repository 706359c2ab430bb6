"""The listener as a child of the gunicorn master, restarted whenever it exits.

``on_starting`` (master, before the first fork) starts a thread that runs
``python -m django_shmsession.tiered.listener`` and waits for it; when the listener dies
(SIGKILL, OOM, a bug) the thread logs it and starts a new one after RESTART_DELAY. The thread
exists only in the master: forked workers do not inherit threads. ``on_exit`` stops it.

gunicorn's SIGCHLD handler reaps every child, ours included; ``Popen.wait`` then returns with
the status lost (Python's ChildProcessError path), which still tells the thread to restart. The
listener exits by itself if the master disappears without ``on_exit`` (its parent pid changes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

#: Seconds between a listener's exit and its replacement.
RESTART_DELAY = 0.5


class ListenerSupervisor:
    """Runs and restarts the host listener process."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name="shmsession-listener-supervisor", daemon=True
        )
        self.restarts = 0

    def start(self) -> None:
        self._thread.start()

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        # The master's import path (the project directory gunicorn runs in, --pythonpath).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        return subprocess.Popen(
            [sys.executable, "-m", "django_shmsession.tiered.listener"], env=env
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._stop.is_set():
                    return
                self._proc = proc = self._spawn()
            self.log.info("django-shmsession: listener started (pid %s)", proc.pid)
            code = proc.wait()
            if self._stop.is_set():
                return
            self.restarts += 1
            self.log.warning(
                "django-shmsession: listener (pid %s) exited (status %s); restarting it; "
                "meanwhile every L1 copy is revalidated",
                proc.pid,
                code,
            )
            self._stop.wait(RESTART_DELAY)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and terminate the listener (SIGTERM, then SIGKILL)."""
        with self._lock:
            self._stop.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self._thread.join(timeout)


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
