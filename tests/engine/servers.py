"""Start the test project under real servers (gunicorn, runserver) on 127.0.0.1 for end-to-end
tests, and talk to it with http.client (no extra dependencies). Every wait has a deadline, and
every server is stopped (and killed if it does not stop) so a failure never leaves a process."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[2] / "testproject"
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def project_env(shm_name: str, size: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="testproject.settings",  # pytest exported tests.settings
        SHMSESSION_NAME=shm_name,
        SHMSESSION_SIZE=size,
        PYTHONUNBUFFERED="1",
    )
    env.pop("GUNICORN_BIND", None)
    return env


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    cookie: str | None


def request(port: int, path: str, cookie: str | None = None, timeout: float = 10.0) -> Reply:
    """One GET on a fresh connection (so the kernel may hand it to any worker)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Connection": "close"}
        if cookie:
            headers["Cookie"] = f"sessionid={cookie}"
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        new_cookie = None
        for header in response.headers.get_all("Set-Cookie") or []:
            if header.startswith("sessionid="):
                new_cookie = header.split(";", 1)[0].split("=", 1)[1]
        body = json.loads(raw) if response.status == 200 else {"raw": raw.decode("latin-1")}
        return Reply(response.status, body, new_cookie)
    finally:
        conn.close()


@contextmanager
def busy_worker(port: int) -> Iterator[None]:
    """Tie up one sync worker with a connection that sends nothing, so the next requests are
    served by another one (a sync worker that just answered tends to win the next accept too).
    Held for a moment only: a worker silent for gunicorn's --timeout would be killed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        time.sleep(0.01)  # let a worker accept it before the real request queues up
        yield


@dataclass
class Server:
    """A server process started in its own process group (so stop() reaches every worker)."""

    args: list[str]
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    shm_dir_is_private: bool = False  # in a mount namespace with a /dev/shm of its own

    def start(self, log_dir: Path) -> Server:
        self.log_path = log_dir / f"server-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.args,
                cwd=PROJECT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log()}")
            try:
                if request(self.port, "/ping", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server not ready after {START_TIMEOUT} s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL the whole group if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    @property
    def shm_dir(self) -> str:
        """The server's /dev/shm, seen from outside its mount namespace (if it has one)."""
        return f"/proc/{self.pid}/root/dev/shm"

    def in_namespace(self) -> list[str]:
        """A command prefix that runs a command in the server's mount namespace."""
        return ["nsenter", f"--target={self.pid}", "--mount", f"--wd={PROJECT}"]

    def children(self) -> set[int]:
        """Worker pids: the master's live child processes (Linux /proc)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return {int(p) for p in path.read_text().split()}


def gunicorn(
    shm_name: str,
    size: str,
    workers: int = 4,
    shm_bytes: int | None = None,
    app: str = "testproject.wsgi",
    extra: tuple[str, ...] = (),
) -> Server:
    """gunicorn on the test project; with ``shm_bytes``, in a mount namespace of its own whose
    /dev/shm is a private tmpfs of that size (needs root; reach it via ``Server.shm_dir``).
    ``app`` and ``extra`` (e.g. ``("-k", "gevent")``) pick another application or worker."""
    server = Server(args=[], env=project_env(shm_name, size))
    server.shm_dir_is_private = shm_bytes is not None
    server.args = [
        *(_private_dev_shm(shm_bytes) if shm_bytes is not None else []),
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "gunicorn.conf.py",
        app,
        "--workers",
        str(workers),
        "--bind",
        f"127.0.0.1:{server.port}",
        "--graceful-timeout",
        "5",
        *_no_control_socket(),
        *extra,
    ]
    return server


def _private_dev_shm(shm_bytes: int) -> list[str]:
    """A command prefix: run the rest in a new mount namespace with a small private /dev/shm."""
    mount = f"mount -t tmpfs -o size={shm_bytes},mode=1777 tmpfs /dev/shm"
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'{mount} && exec "$@"',
        "sh",
    ]


def shm_mappings(pid: int) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every /dev/shm file process ``pid`` maps (its segment, semaphore)."""
    found = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                major, minor = (int(part, 16) for part in fields[3].split(":"))
                found.add((os.makedev(major, minor), int(fields[4])))
    return found


def _no_control_socket() -> list[str]:
    """gunicorn >= 25 opens a control socket at one fixed path per user; servers started by
    tests (or by a benchmark running beside them) must not take it from each other."""
    from gunicorn.config import KNOWN_SETTINGS

    names = {setting.name for setting in KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in names else []


def runserver(shm_name: str, size: str) -> Server:
    server = Server(args=[], env=project_env(shm_name, size))
    server.args = [
        sys.executable,
        "manage.py",
        "runserver",
        f"127.0.0.1:{server.port}",
        "--noreload",
    ]
    return server
