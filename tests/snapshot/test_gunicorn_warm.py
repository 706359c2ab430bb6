"""The test project under real gunicorn with SNAPSHOT: sessions survive a stop + unlink (what a
reboot or a new container does to /dev/shm), and a kill -9 of the master and every worker loses
at most INTERVAL seconds of session writes."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from django_shmsession.table import SessionTable

from ..engine import servers
from .conftest import TEST_SIZE

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

INTERVAL = 2.0


def warm_server(shm_name: str, snap: Path, interval: float = INTERVAL) -> servers.Server:
    server = servers.gunicorn(shm_name, size=TEST_SIZE, workers=2)
    server.env["SHMSESSION_SNAPSHOT_PATH"] = str(snap)
    server.env["SHMSESSION_SNAPSHOT_INTERVAL"] = str(interval)
    return server


def group_killed(server: servers.Server) -> None:
    """kill -9 of the master, its workers and its dump child, at one instant."""
    os.killpg(server.pid, signal.SIGKILL)
    assert server.process is not None
    server.process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # every process of the group is gone
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("processes of the killed server are still alive")


def test_stop_unlink_start_brings_every_session_back(shm_name: str, tmp_path: Path) -> None:
    snap = tmp_path / "sessions.snap"
    server = warm_server(shm_name, snap, interval=0).start(tmp_path)
    try:
        cookies = {}
        for i in range(30):
            reply = servers.request(server.port, f"/set?foo=v{i}")
            assert reply.status == 200
            assert reply.cookie
            cookies[reply.cookie] = f"v{i}"
    finally:
        server.stop()  # SIGTERM: on_exit dumps after the workers stopped
    assert "Dumped 30 session(s)" in server.log()
    assert SessionTable.unlink_name(shm_name)  # the reboot
    server = warm_server(shm_name, snap, interval=0).start(tmp_path)
    try:
        assert "Restored 30 of 30 session(s)" in server.log()
        for cookie, value in cookies.items():
            reply = servers.request(server.port, "/", cookie)
            assert reply.body["foo"] == value
    finally:
        server.stop()


def test_kill_9_loses_at_most_interval_seconds(shm_name: str, tmp_path: Path) -> None:
    """Counters incremented without pause for a while; then the whole server is SIGKILLed, the
    segment removed and the server started again: each counter is back at least at the value it
    had INTERVAL seconds before the kill."""
    snap = tmp_path / "sessions.snap"
    server = warm_server(shm_name, snap).start(tmp_path)
    acknowledged: dict[str, list[tuple[float, int]]] = {}
    stop = threading.Event()
    try:
        cookies = []
        for _ in range(4):
            reply = servers.request(server.port, "/incr")
            assert reply.cookie
            cookies.append(reply.cookie)
            acknowledged[reply.cookie] = [(time.time(), 1)]

        def hammer(cookie: str) -> None:
            while not stop.is_set():
                try:
                    reply = servers.request(server.port, "/incr", cookie, timeout=5)
                except (OSError, http.client.HTTPException, ValueError):
                    return  # the server was killed mid-answer
                if reply.status == 200:
                    acknowledged[cookie].append((time.time(), int(reply.body["count"])))

        threads = [threading.Thread(target=hammer, args=(c,)) for c in cookies]
        for thread in threads:
            thread.start()
        time.sleep(3 * INTERVAL + 1.3)
        killed_at = time.time()
        group_killed(server)
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    finally:
        stop.set()
        server.stop()
    assert SessionTable.unlink_name(shm_name)  # the machine rebooted
    server = warm_server(shm_name, snap).start(tmp_path)
    try:
        assert "Restored 4 of 4 session(s)" in server.log()
        for cookie, history in acknowledged.items():
            assert len(history) > 20  # the counter really moved during the run
            reply = servers.request(server.port, "/get", cookie)
            restored = int(reply.body["session"]["count"])
            due = [count for at, count in history if at <= killed_at - INTERVAL]
            assert due, "no write was acknowledged early enough"
            # the last write may have been made but not acknowledged before the kill
            assert max(due) <= restored <= history[-1][1] + 1, (max(due), restored, history[-1])
    finally:
        server.stop()
