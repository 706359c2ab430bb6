"""The per-process table handle: cached, reset on setting changes, and never left on an orphan."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading

import pytest

from django_shmsession import store
from django_shmsession.backend import SessionStore
from django_shmsession.segment import current_pair, segment_path, semaphore_path
from django_shmsession.table import SessionTable

from . import servers


def saved_session(value: str) -> SessionStore:
    s = SessionStore()
    s["v"] = value
    s.save()
    return s


def test_handle_is_cached() -> None:
    assert store.get_table() is store.get_table()


def test_no_stat_between_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    table = store.get_table()

    def fail(name: str) -> None:
        raise AssertionError("stat on the hot path")

    monkeypatch.setattr(store, "current_pair", fail)
    assert store.get_table() is table  # within RECHECK_INTERVAL: no system call


def test_reset_reopens_same_segment() -> None:
    s = saved_session("kept")
    first = store.get_table()
    store.reset()
    assert store.get_table() is not first
    assert SessionStore(s.session_key)["v"] == "kept"


def test_removed_segment_is_recreated_not_orphaned(
    shm_name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """systemd's RemoveIPC (or `shmsession unlink` from another process) removed the segment:
    after the next check this process uses a new one that every other process can see too."""
    old = saved_session("old")
    SessionTable.unlink_name(shm_name)
    monkeypatch.setattr(store, "_next_check", 0.0)
    with caplog.at_level(logging.WARNING, logger="django_shmsession"):
        new = saved_session("new")
    assert "was removed" in caplog.text
    assert os.path.exists(segment_path(shm_name))
    with SessionTable(shm_name) as fresh_view:  # what a newly started process sees
        assert fresh_view.get(new.session_key or "") is not None
    assert SessionStore(old.session_key).load() == {}


def test_replaced_segment_is_followed(shm_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store.get_table()
    SessionTable.unlink_name(shm_name)
    with SessionTable(shm_name, 1024 * 1024) as other:  # another process recreated it
        monkeypatch.setattr(store, "_next_check", 0.0)
        s = saved_session("seen-by-both")
        assert other.get(s.session_key or "") is not None


# -- one pair, no leak ---------------------------------------------------------------------------


def shm_mappings() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every /dev/shm file this process maps (segments and semaphores)."""
    return servers.shm_mappings(os.getpid())


def open_shm_fds() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every /dev/shm file this process holds a descriptor of."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/shm/"):
                continue
            info = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        found.add((info.st_dev, info.st_ino))
    return found


def recheck_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "_next_check", 0.0)


def pinned_bytes() -> int:
    """/dev/shm bytes this process keeps alive: allocated blocks of the files it maps or holds.

    Read through /proc/self/map_files, which opens a mapped file even after it was unlinked.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for entry in os.listdir("/proc/self/map_files"):
        with contextlib.suppress(OSError):
            path = f"/proc/self/map_files/{entry}"
            if not os.readlink(path).startswith("/dev/shm/"):
                continue
            info = os.stat(path)
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


def test_the_pair_is_what_the_names_name(shm_name: str) -> None:
    table = store.get_table()
    assert store.pair_of(table) == current_pair(shm_name)
    seg, sem = os.stat(segment_path(shm_name)), os.stat(semaphore_path(shm_name))
    assert store.pair_of(table).segment == (seg.st_dev, seg.st_ino)
    assert store.pair_of(table).semaphore == (sem.st_dev, sem.st_ino)
    assert shm_mappings() >= {store.pair_of(table).segment, store.pair_of(table).semaphore}


@pytest.mark.parametrize(
    "removal",
    [["segment"], ["semaphore"], ["segment", "semaphore"], ["semaphore", "segment"], ["truncate"]],
    ids="-then-".join,
)
def test_every_removal_order_switches_to_one_new_pair(
    shm_name: str, monkeypatch: pytest.MonkeyPatch, removal: list[str]
) -> None:
    """Whatever was removed (or truncated), the next check moves this process to a new pair that
    a newly started process opens too, and the old handle is closed: nothing of it stays mapped."""
    old = saved_session("old")
    old_pair = store.pair_of(store.get_table())
    for step in removal:
        if step == "segment":
            os.unlink(segment_path(shm_name))
        elif step == "semaphore":
            os.unlink(semaphore_path(shm_name))
        else:
            os.truncate(segment_path(shm_name), 8192)  # never touched by us afterwards: SIGBUS
    recheck_now(monkeypatch)
    new = saved_session("new")
    table = store.get_table()
    assert store.pair_of(table) != old_pair
    assert store.pair_of(table).segment != old_pair.segment
    assert store.pair_of(table).semaphore != old_pair.semaphore
    assert store.pair_of(table) == current_pair(shm_name)
    with SessionTable(shm_name) as fresh_view:  # a process started after the event
        assert store.pair_of(fresh_view) == store.pair_of(table)
        assert fresh_view.get(new.session_key or "") is not None
    assert SessionStore(old.session_key).load() == {}
    assert store.retired_handles() == 0
    mapped = shm_mappings()
    assert old_pair.segment not in mapped
    assert old_pair.semaphore not in mapped
    assert old_pair.segment not in open_shm_fds()


def test_a_replaced_handle_in_use_closes_when_its_last_user_lets_go(
    shm_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread mid-call keeps the old handle working; when it lets go, the handle closes."""
    in_use = store.get_table()
    old_pair = store.pair_of(in_use)
    SessionTable.unlink_name(shm_name)
    recheck_now(monkeypatch)
    assert store.get_table() is not in_use
    assert store.retired_handles() == 1
    in_use.set("still", b"works", 4e9)  # the thread's call completes on the old pair
    assert in_use.get("still") == b"works"
    assert old_pair.segment in shm_mappings()
    del in_use
    gc.collect()
    assert old_pair.segment not in shm_mappings()
    assert old_pair.segment not in open_shm_fds()
    assert old_pair.semaphore not in shm_mappings()
    recheck_now(monkeypatch)
    store.get_table()
    assert store.retired_handles() == 0


def test_many_unlinks_leave_one_segment_pinned(
    shm_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After N unlinks while serving (threads too), this process pins one segment, not N."""
    saved_session("first")
    one_segment = pinned_bytes()
    assert one_segment >= 1024 * 1024
    stop = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                saved_session("busy")
            except BaseException as err:  # reported below
                errors.append(err)

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(10):
            SessionTable.unlink_name(shm_name)
            recheck_now(monkeypatch)
            saved_session("after")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    gc.collect()
    assert not errors, errors[:3]
    assert store.retired_handles() == 0
    segments = {p for p in shm_mappings() if p != store.pair_of(store.get_table()).semaphore}
    assert segments == {store.pair_of(store.get_table()).segment}
    assert pinned_bytes() <= one_segment + 64 * 1024
