"""Real child processes for the multi-process, crash and signal tests.

Children are forked (``multiprocessing`` "fork" context) so they can run closures and inherit
nothing but what the test set up. Each child talks to the test over a pipe; every wait on a child
has a timeout, so a table that hangs gives a failure and the child is killed, never a stuck CI job.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import traceback
from collections.abc import Callable
from typing import Any

from django_shmsession import table as table_module
from django_shmsession.table import SessionTable

FORK = multiprocessing.get_context("fork")
Conn = multiprocessing.connection.Connection


class ChildFailed(AssertionError):
    """A child process raised, hung, or died in a way the test did not plan."""


class ChildExited(ChildFailed):
    """The child's end of the pipe closed: it exited or was killed (tests that kill expect it)."""


class Child:
    """A forked process running ``target(conn, *args)``; the test holds the other pipe end."""

    def __init__(self, target: Callable[..., Any], *args: Any) -> None:
        self.conn, child_conn = FORK.Pipe()
        self.process = FORK.Process(target=_run_reporting, args=(target, child_conn, *args))
        self.process.start()
        child_conn.close()

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def recv(self, timeout: float = 10.0) -> Any:
        """The child's next message; a traceback it sent or a silence becomes a failure."""
        if not self.conn.poll(timeout):
            self.kill()
            raise ChildFailed(f"child {self.pid} sent nothing for {timeout} s (hung?)")
        try:
            message = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise ChildExited(f"child {self.pid} exited ({self.process.exitcode})") from None
        if isinstance(message, tuple) and message and message[0] == "error":
            raise ChildFailed(f"child {self.pid} raised:\n{message[1]}")
        return message

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def join(self, timeout: float = 10.0) -> int:
        """Wait for the exit code; kill the child and fail if it does not end in time."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            raise ChildFailed(f"child {self.pid} still running after {timeout} s (hung?)")
        return self.process.exitcode

    def kill(self) -> None:
        """SIGKILL and reap (idempotent)."""
        if self.process.exitcode is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.join(5)
        self.conn.close()


def _run_reporting(target: Callable[..., Any], conn: Conn, *args: Any) -> None:
    """Child entry point: send the traceback instead of dying silently on an error."""
    try:
        target(conn, *args)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def kill_self_at(point: str, occurrence: int = 1) -> None:
    """Install a fault hook that SIGKILLs this process the ``occurrence``-th time it reaches
    ``point`` (install it before opening a table to include the lock's steps)."""
    seen = 0

    def hook(reached: str) -> None:
        nonlocal seen
        if reached == point:
            seen += 1
            if seen == occurrence:
                os.kill(os.getpid(), signal.SIGKILL)

    table_module.set_fault_hook(hook)


def pause_at_first_point(conn: Conn) -> None:
    """Install a fault hook that, at the first fault point, reports and waits for "go".

    The process then holds the table lock (fault points are inside writes) while alive and
    legitimately busy: the tool for tests that need a live holder or a holder that dies.
    """

    fired = False

    def hook(reached: str) -> None:
        nonlocal fired
        if fired:  # a write keeps the hook it started with: later points pass through
            return
        fired = True
        table_module.set_fault_hook(None)
        conn.send(("holding", reached, os.getpid()))
        conn.recv()

    table_module.set_fault_hook(hook)


def lock_holder(conn: Conn, name: str, key: str, value: bytes, expires_at: float) -> None:
    """Child body: open ``name``, start ``set(key)`` and stop inside it, holding the lock.

    Reports ("holding", point, pid); after the test sends anything, finishes the write and
    reports ("done",). The test may instead SIGKILL it to get a dead holder.
    """
    table = SessionTable(name)  # the creator's max_value_size (tests create small tables)
    pause_at_first_point(conn)
    table.set(key, value, expires_at)
    conn.send(("done",))
    table.close()


def start_lock_holder(name: str, key: str, value: bytes, expires_at: float) -> Child:
    """Start :func:`lock_holder` and return once it holds the lock."""
    child = Child(lock_holder, name, key, value, expires_at)
    message = child.recv()
    assert message[0] == "holding", message
    return child
