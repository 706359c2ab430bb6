"""Real Redis and PostgreSQL servers for the tiered tests, on 127.0.0.1, free ports, temp dirs.

Never a mock, never a skip: a server that cannot start fails the tests that need it, with its
log in the message. ``.ci/run`` installs the Debian packages (redis-server, postgresql); on a
developer machine ``apt-get install redis-server postgresql`` does the same.
PostgreSQL refuses to run as root, so under root initdb and postgres run as the ``postgres``
system user (``runuser``), with the data directory owned by it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.engine.servers import free_port


class ServerStartError(RuntimeError):
    """A test server did not start (raised outside pytest, e.g. by benchmarks/tiered.py)."""


def _fail(message: str) -> None:
    """Fail the test without a traceback under pytest; raise outside it (the benchmarks' venv
    has no pytest)."""
    try:
        import pytest
    except ImportError:
        raise ServerStartError(message) from None
    pytest.fail(message, pytrace=False)


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _fail(f"{what} exited with {proc.returncode} at start:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    _fail(f"{what} did not listen on port {port} within 30 s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    except OSError:
        return "(no log)"


class RedisServer:
    """``redis-server`` without persistence, restartable on the same port (outage tests)."""

    def __init__(self, persist: bool = False) -> None:
        #: With ``persist``, an append-only file fsynced at every write: a restart keeps every
        #: acknowledged session (the outage tests restart it under traffic).
        self.persist = persist
        exe = shutil.which("redis-server")
        if exe is None:
            _fail("redis-server is not installed: `apt-get install redis-server` (.ci/run does)")
        self.exe = str(exe)
        self.dir = Path(tempfile.mkdtemp(prefix="shmtest-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        log = self.dir / "redis.log"
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--logfile", str(log)]
        args += (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persist
            else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, log, "redis-server")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None
    )
    if found is None:
        _fail(f"PostgreSQL's {name} is not installed: `apt-get install postgresql` (.ci/run does)")
    return str(found)


class PostgresServer:
    """A throwaway PostgreSQL cluster (trust auth on 127.0.0.1, fsync off), restartable."""

    user = "postgres"
    dbname = "shmtest"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="shmtest-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", self.user, "--"]
            shutil.chown(self.dir, self.user, self.user)
            os.chmod(self.dir, 0o700)
        log = self.dir / "initdb.log"
        with log.open("wb") as out:
            done = subprocess.run(
                [
                    *self._as_user,
                    _pg_bin("initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    self.user,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0:
            _fail(f"initdb failed ({done.returncode}):\n{_tail(log)}")

    @property
    def settings(self) -> dict[str, object]:
        """A Django DATABASES entry for this server."""
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": self.dbname,
            "USER": self.user,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
        }

    def start(self) -> PostgresServer:
        log = self.dir / "postgres.log"
        args = [*self._as_user, _pg_bin("postgres"), "-D", str(self.data), "-p", str(self.port)]
        args += ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}"]
        # fsync off (no OS crash in a test), synchronous_commit on: an immediate stop must not
        # lose acknowledged commits (the restart tests check that nothing is lost).
        args += ["-c", "fsync=off", "-c", "max_connections=200"]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, log, "postgres")
        self._wait_ready(log)
        return self

    def _wait_ready(self, log: Path) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", [self.dbname]
                    ).fetchone()
                    if not exists:
                        conn.execute(f"CREATE DATABASE {self.dbname}")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    _fail(f"postgres did not accept connections within 30 s:\n{_tail(log)}")
                time.sleep(0.1)

    def conninfo(self, dbname: str | None = None) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname or self.dbname}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Immediate shutdown, as a crash would be (clients see their sockets drop). Through
            # pg_ctl: under root self.proc is runuser, which does not pass signals on.
            subprocess.run(
                [
                    *self._as_user,
                    _pg_bin("pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "20",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
