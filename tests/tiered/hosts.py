"""Two "hosts" on one machine: gunicorn servers of the test project with different table names
(each its own L1 and its own listener, started and supervised by its master), sharing one L2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import uuid4

from django_shmsession.table import SessionTable
from django_shmsession.tiered import words
from django_shmsession.tiered.listener import lock_path
from tests.engine.servers import PROJECT, Server, gunicorn

from .conftest import wait_for
from .l2servers import PostgresServer

HOST_SIZE = "8M"


class Host:
    def __init__(self, server: Server, name: str) -> None:
        self.server = server
        self.name = name
        self.port = server.port

    @contextmanager
    def table(self) -> Iterator[SessionTable]:
        table = SessionTable(self.name, None)
        try:
            yield table
        finally:
            table.close()

    def listener_up(self) -> bool:
        with self.table() as table:
            return words.listener_up(table)

    def listener_pid(self) -> int:
        with self.table() as table:
            return table.read_app_word(words.LISTENER_PID)

    def word(self, index: int) -> int:
        with self.table() as table:
            return table.read_app_word(index)


def l2_env(kind: str, redis_url: str | None, postgres: PostgresServer | None) -> dict[str, str]:
    """The environment that points the test project at the shared L2."""
    env = {"SESSION_ENGINE": "django_shmsession.tiered"}
    if kind == "redis":
        assert redis_url is not None
        l2 = {"BACKEND": "redis", "LOCATION": redis_url, "KEY_PREFIX": f"h{uuid4().hex[:8]}:"}
    else:
        assert postgres is not None
        l2 = {"BACKEND": "db", "CHANNEL": f"h{uuid4().hex[:10]}"}
        env["TESTPROJECT_DATABASE"] = json.dumps(postgres.settings)
    env["SHMSESSION_L2"] = json.dumps(l2)
    return env


def migrate(env: dict[str, str]) -> None:
    """Create Django's session table and our functions in the shared PostgreSQL (db L2)."""
    full = {**os.environ, "DJANGO_SETTINGS_MODULE": "testproject.settings", **env}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"],
        cwd=PROJECT,
        env=full,
        check=True,
    )


@contextmanager
def two_hosts(
    log_dir: Path, env: dict[str, str], workers: int = 2, max_staleness: float = 2.0
) -> Iterator[tuple[Host, Host]]:
    """Hosts A and B, each with its listener up; everything stopped and unlinked afterwards."""
    hosts: list[Host] = []
    try:
        for _ in range(2):
            name = f"/shmtest-host-{uuid4().hex[:10]}"
            server = gunicorn(name, HOST_SIZE, workers=workers)
            server.env.update(env)
            server.env["SHMSESSION_MAX_STALENESS"] = str(max_staleness)
            hosts.append(Host(server, name))
            server.start(log_dir)
        for host in hosts:
            wait_for(host.listener_up, f"the listener of {host.name}", 30)
        yield hosts[0], hosts[1]
    finally:
        for host in hosts:
            host.server.stop()
            SessionTable.unlink_name(host.name)
            lock_path(host.name).unlink(missing_ok=True)


def run_script(env: dict[str, str], name: str, code: str, *args: str) -> subprocess.Popen[str]:
    """A Python process of the test project with table ``name`` (a third host, no server)."""
    full = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "SHMSESSION_NAME": name,
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=PROJECT,
        env=full,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def elapsed_until(predicate: Any, timeout: float, step: float = 0.002) -> float:
    """Seconds until ``predicate()`` is true (AssertionError after ``timeout``)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(step)
    return time.monotonic() - start
