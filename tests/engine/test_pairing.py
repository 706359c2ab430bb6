"""One table, one lock, no leak, under real gunicorn workers that keep serving.

Every order of deletions (segment only, semaphore only, both in either order) and a truncated
segment: within a few seconds every worker maps the same segment and the same semaphore (read
from /proc/<pid>/maps, compared by inode with what the names name), a process started afterwards
opens that pair too, sessions set through one worker are read by the others, and no worker
crashed. Then a /dev/shm with room for one table only (a private tmpfs in a mount namespace):
after every `shmsession unlink` the site gets a new table, and /dev/shm holds one segment.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from django_shmsession import store

from . import servers
from .conftest import TEST_SIZE

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

#: Every live worker must be on the current pair this soon after the event (the recheck runs
#: once a second per worker, at its next request).
SWITCH_DEADLINE = 10.0
MIB = 1024 * 1024
Ids = set[tuple[int, int]]


def named_pair(shm_dir: str, name: str) -> Ids | None:
    """(st_dev, st_ino) of the segment and the semaphore that ``name`` names, or None."""
    try:
        seg = os.stat(f"{shm_dir}/{name[1:]}")
        sem = os.stat(f"{shm_dir}/sem.{name[1:]}.lock")
    except FileNotFoundError:
        return None
    return {(seg.st_dev, seg.st_ino), (sem.st_dev, sem.st_ino)}


def wait_for_one_pair(
    server: servers.Server, name: str, since: float | None = None, old: Ids | None = None
) -> float:
    """Seconds (from ``since``) until every worker maps exactly the pair the names name (and
    that pair is not ``old``)."""
    start = time.monotonic()
    since = start if since is None else since
    maps: dict[int, Ids] = {}
    want = None
    while time.monotonic() - start < SWITCH_DEADLINE:
        want = named_pair(server.shm_dir, name)
        maps = {pid: servers.shm_mappings(pid) for pid in server.children()}
        settled = want is not None and want != old and maps
        if settled and all(ids == want for ids in maps.values()):
            return time.monotonic() - since
        time.sleep(0.02)
    raise AssertionError(f"workers map {maps}, the names name {want}:\n{server.log()[-3000:]}")


class Traffic:
    """Threads sending /incr over fresh connections, so every sync worker keeps serving."""

    def __init__(self, port: int, threads: int = 3) -> None:
        self.port = port
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        cookie = None
        while not self._stop.is_set():
            if self._paused.is_set():
                time.sleep(0.01)
                continue
            try:
                reply = servers.request(self.port, "/incr", cookie, timeout=15)
            except (OSError, http.client.HTTPException) as err:
                self.errors.append(repr(err))
                continue
            cookie = reply.cookie or cookie
            self.statuses.append(reply.status)

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused.set()
        time.sleep(0.3)  # requests in flight finish
        try:
            yield
        finally:
            self._paused.clear()

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def remove(server: servers.Server, name: str, what: str) -> None:
    """What an operator, a cleanup script or systemd's RemoveIPC does to /dev/shm."""
    if what == "segment":
        os.unlink(f"{server.shm_dir}/{name[1:]}")
    elif what == "semaphore":
        os.unlink(f"{server.shm_dir}/sem.{name[1:]}.lock")
    else:
        os.truncate(f"{server.shm_dir}/{name[1:]}", 8192)


def sessions_are_shared(port: int) -> None:
    """A session set through one worker is read by the others (several workers answer)."""
    reply = servers.request(port, "/set?foo=shared")
    assert reply.status == 200, reply.body
    pids = set()
    for i in range(60):
        with servers.busy_worker(port) if i % 2 else _nothing():
            got = servers.request(port, "/", reply.cookie)
        assert got.status == 200, got.body
        assert got.body["foo"] == "shared"
        pids.add(got.body["pid"])
        if len(pids) > 1 and i >= 10:
            return
    raise AssertionError(f"only worker(s) {pids} answered")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


PROBE = """
import json, os, django
django.setup()
from django_shmsession import store
table = store.get_table()
pair = store.pair_of(table)
print(json.dumps([list(pair.segment), list(pair.semaphore)]))
"""


def new_process_pair(server: servers.Server, name: str) -> Ids:
    """The pair a process started now opens (through the engine, as clearsessions would)."""
    env = servers.project_env(name, TEST_SIZE)
    out = subprocess.run(
        [*_prefix(server), sys.executable, "-c", PROBE],
        cwd=servers.PROJECT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return {(dev, ino) for dev, ino in json.loads(out)}


def _prefix(server: servers.Server) -> list[str]:
    return server.in_namespace() if server.shm_dir_is_private else []


def manage(server: servers.Server, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_prefix(server), sys.executable, "manage.py", *args],
        cwd=servers.PROJECT,
        env=servers.project_env(name, TEST_SIZE),
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )


ORDERS = [["segment"], ["semaphore"], ["segment", "semaphore"], ["semaphore", "segment"]]


@pytest.mark.parametrize("order", [*ORDERS, ["truncate"]], ids="-then-".join)
def test_after_any_deletion_every_process_is_on_one_pair(
    shm_name: str, tmp_path: Path, order: list[str]
) -> None:
    server = servers.gunicorn(shm_name, size=TEST_SIZE, workers=3).start(tmp_path)
    try:
        with Traffic(server.port, threads=4) as traffic:
            wait_for_one_pair(server, shm_name)
            workers = server.children()
            old = named_pair(server.shm_dir, shm_name)
            if order == ["truncate"]:
                # Touching lost pages is a SIGBUS nobody can catch: the promise is that the
                # recheck notices the new size before the next request touches the mapping.
                with traffic.paused():
                    remove(server, shm_name, "truncate")
                    event = time.monotonic()
                    time.sleep(store.RECHECK_INTERVAL + 0.2)
            else:
                for what in order:
                    remove(server, shm_name, what)
                    event = time.monotonic()
                    time.sleep(0.05)
            elapsed = wait_for_one_pair(server, shm_name, since=event, old=old)
            print(f"\n{'-then-'.join(order)}: every worker on the new pair after {elapsed:.2f} s")
        current = named_pair(server.shm_dir, shm_name)
        assert current is not None
        assert not current & (old or set()), "the new pair shares nothing with the old one"
        assert server.children() == workers, "a worker died (SIGBUS?)"
        assert servers.shm_mappings(server.pid) == set(), "the master keeps a mapping"
        assert new_process_pair(server, shm_name) == current
        stats = json.loads(manage(server, shm_name, "shmsession", "stats", "--json").stdout)
        assert stats["entries"] >= 1
        manage(server, shm_name, "clearsessions")
        sessions_are_shared(server.port)
        assert traffic.statuses.count(200) > 20
        assert wait_for_one_pair(server, shm_name) < 1  # nothing moved them again
    finally:
        server.stop()
    assert unexpected_errors(server.log()) == []


#: What a request whose session vanished with the old table gets: Django's own answer (400).
EXPECTED_ERRORS = {
    "django.contrib.sessions.backends.base.UpdateError",
    "django.contrib.sessions.exceptions.SessionInterrupted",
}


def unexpected_errors(log: str) -> list[str]:
    """Exception lines in a server log other than a vanished session's; also worker deaths."""
    found = [
        line
        for line in log.splitlines()
        if re.match(r"^[\w.]+(Error|Exception|Interrupted|Timeout|Full|Mismatch|Segment)\b", line)
        and line.split(":", 1)[0] not in EXPECTED_ERRORS
    ]
    found += [line for line in log.splitlines() if "was sent" in line or "SIGBUS" in line]
    return found


def _need_namespaces() -> None:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("needs root, unshare(1) and nsenter(1) for a private /dev/shm")


def used_bytes(shm_dir: str) -> int:
    info = os.statvfs(shm_dir)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


def test_a_dev_shm_with_room_for_one_table_recovers_after_every_unlink(
    shm_name: str, tmp_path: Path
) -> None:
    """/dev/shm holds one 1 MiB table and its semaphores, not two tables: every unlink while
    gunicorn serves must free the old segment (no worker, and not the master, may keep it) for
    the new one to be created, and usage stays one segment however many unlinks there are."""
    _need_namespaces()
    server = servers.gunicorn(shm_name, size=TEST_SIZE, workers=2, shm_bytes=MIB + 512 * 1024)
    server.start(tmp_path)
    try:
        assert used_bytes(server.shm_dir) < 2 * MIB  # our own, private /dev/shm
        with Traffic(server.port) as traffic:
            wait_for_one_pair(server, shm_name)
            usage = [used_bytes(server.shm_dir)]
            for _ in range(5):
                old = named_pair(server.shm_dir, shm_name)
                manage(server, shm_name, "shmsession", "unlink", "--noinput")
                elapsed = wait_for_one_pair(server, shm_name, old=old)
                usage.append(used_bytes(server.shm_dir))
                print(f"\nunlink: every worker on the new table after {elapsed:.2f} s")
            print(f"/dev/shm used after each unlink: {usage}")
        assert max(usage) <= MIB + 64 * 1024, usage
        assert servers.shm_mappings(server.pid) == set()
        sessions_are_shared(server.port)
        assert traffic.statuses.count(200) > 20
    finally:
        server.stop()
    print(f"room-for-one log: {unexpected_errors(server.log())}")
