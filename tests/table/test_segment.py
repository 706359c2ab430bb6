"""Creating, opening and removing segments: sizes, layout checks, permissions, /dev/shm space."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import posix_ipc
import pytest

from django_shmsession import layout, platform, segment
from django_shmsession.exceptions import (
    ForeignSegment,
    LayoutMismatch,
    SegmentNotFound,
    SegmentTooLarge,
)
from django_shmsession.table import SessionTable

from .conftest import DEFAULT_SIZE, TableFactory
from .helpers import FakeClock, leftover_files, raw_mapping, sem_path, shm_path, unique_name

NOBODY = 65534


def test_opening_a_missing_table_without_size_raises_and_creates_nothing(shm_name: str) -> None:
    with pytest.raises(SegmentNotFound, match=shm_name):
        SessionTable(shm_name)
    assert leftover_files(shm_name) == []


def test_creation_allocates_the_requested_size(table: SessionTable, shm_name: str) -> None:
    info = os.stat(shm_path(shm_name))
    assert info.st_size == DEFAULT_SIZE
    # posix_fallocate reserved the pages: they are counted as allocated blocks, not a sparse file
    assert info.st_blocks * 512 >= DEFAULT_SIZE


def test_reopening_with_the_same_size_keeps_the_data(
    make_table: TableFactory, clock: FakeClock
) -> None:
    make_table().set("a", b"v", clock.now + 60)
    assert make_table(DEFAULT_SIZE).get("a") == b"v"


@pytest.mark.parametrize("other_size", [DEFAULT_SIZE // 2, DEFAULT_SIZE * 2, DEFAULT_SIZE + 4096])
def test_opening_with_another_size_raises_and_changes_nothing(
    make_table: TableFactory, clock: FakeClock, shm_name: str, other_size: int
) -> None:
    first = make_table()
    first.set("a", b"v", clock.now + 60)
    with open(shm_path(shm_name), "rb") as f:
        before = f.read()
    with pytest.raises(LayoutMismatch) as info:
        SessionTable(shm_name, other_size)
    assert str(DEFAULT_SIZE) in str(info.value)
    assert str(other_size) in str(info.value)
    with open(shm_path(shm_name), "rb") as f:
        assert f.read() == before
    assert first.get("a") == b"v"


def test_a_segment_with_a_foreign_magic_is_refused(table: SessionTable, shm_name: str) -> None:
    table.close()
    with raw_mapping(shm_name) as mapping:
        mapping[layout.MAGIC_OFFSET : layout.MAGIC_OFFSET + 8] = b"NOTOURS!"
    for size in (None, DEFAULT_SIZE):
        with pytest.raises(LayoutMismatch, match="unlink"):
            SessionTable(shm_name, size)
    with raw_mapping(shm_name) as mapping:
        assert mapping[:8] == b"NOTOURS!"  # refused, never re-initialized


@pytest.mark.parametrize("version", [1, layout.LAYOUT_VERSION + 1])
def test_a_segment_of_another_layout_version_is_refused(
    table: SessionTable, shm_name: str, version: int
) -> None:
    """Version 1 is what django-shmsession 0.1 wrote: its segments must be recreated."""
    table.close()
    with raw_mapping(shm_name) as mapping:
        fields = list(layout.GEOMETRY.unpack_from(mapping, layout.GEOMETRY_OFFSET))
        fields[0] = version
        layout.GEOMETRY.pack_into(mapping, layout.GEOMETRY_OFFSET, *fields)
    with pytest.raises(LayoutMismatch, match=f"version {version},.*shmsession unlink"):
        SessionTable(shm_name)


def test_segment_and_semaphore_are_private_even_with_a_lax_umask(shm_name: str) -> None:
    old = os.umask(0)
    try:
        table = SessionTable(shm_name, DEFAULT_SIZE)
    finally:
        os.umask(old)
    table.close()
    assert stat.S_IMODE(os.stat(shm_path(shm_name)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sem_path(shm_name)).st_mode) == 0o600


@pytest.mark.parametrize("which", ["segment", "semaphore"])
def test_a_table_owned_by_another_user_is_refused(
    table: SessionTable, shm_name: str, which: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    table.close()
    path = shm_path(shm_name) if which == "segment" else sem_path(shm_name)
    os.chown(path, NOBODY, NOBODY)
    for size in (None, DEFAULT_SIZE):
        with pytest.raises(ForeignSegment, match=str(NOBODY)):
            SessionTable(shm_name, size)
    assert os.stat(shm_path(shm_name)).st_size == DEFAULT_SIZE


def test_a_segment_readable_by_others_is_refused(table: SessionTable, shm_name: str) -> None:
    table.close()
    os.chmod(shm_path(shm_name), 0o644)
    with pytest.raises(ForeignSegment, match="600"):
        SessionTable(shm_name)


def test_unlink_removes_segment_and_semaphore(table: SessionTable, shm_name: str) -> None:
    assert leftover_files(shm_name) != []
    table.unlink()
    assert leftover_files(shm_name) == []
    with pytest.raises(SegmentNotFound):
        SessionTable(shm_name)


def test_unlink_name_reports_whether_the_table_existed(make_table: TableFactory) -> None:
    name = make_table().name
    assert SessionTable.unlink_name(name) is True
    assert SessionTable.unlink_name(name) is False
    assert leftover_files(name) == []


@pytest.mark.multiprocess
def test_nothing_unlinks_a_table_on_close_or_process_exit(shm_name: str) -> None:
    code = f"""
        from django_shmsession.table import SessionTable
        t = SessionTable({shm_name!r}, {DEFAULT_SIZE})
        t.set("a", b"survives", 4e9)
        t.close()
        SessionTable({shm_name!r}).get("a")
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=60)
    table = SessionTable(shm_name)
    try:
        assert table.get("a") == b"survives"
    finally:
        table.close()


def test_a_too_small_size_is_refused_with_a_clear_error(shm_name: str) -> None:
    with pytest.raises(ValueError, match="too small"):
        SessionTable(shm_name, 4096)
    assert leftover_files(shm_name) == []


@pytest.mark.parametrize("name", ["no-slash", "/two/slashes", "/", "/" + "x" * 300])
def test_invalid_names_raise_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        SessionTable(name, DEFAULT_SIZE)


# -- /dev/shm too small ------------------------------------------------------------------------

SMALL_SHM_SCRIPT = """
import os, sys
from django_shmsession.exceptions import SegmentTooLarge
from django_shmsession.table import SessionTable

name = sys.argv[1]
# leave 3 MiB of the 8 MiB tmpfs free, then ask for 4 MiB
with open("/dev/shm/filler", "wb") as f:
    os.posix_fallocate(f.fileno(), 0, 5 * 1024 * 1024)
try:
    SessionTable(name, 4 * 1024 * 1024)
except SegmentTooLarge as err:
    print("SegmentTooLarge:", err)
else:
    print("created")
print("left:", sorted(f for f in os.listdir("/dev/shm") if f != "filler"))
small = SessionTable(name, 1024 * 1024)  # what does fit still works
small.set("a", b"v", 4e9)
print("small:", small.get("a"))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_table_larger_than_free_dev_shm_fails_at_creation_and_leaves_nothing(
    tmp_path: os.PathLike[str],
) -> None:
    """Run in a private mount namespace whose /dev/shm is an 8 MiB tmpfs we filled to 5 MiB."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to mount a private small /dev/shm")
    name = unique_name()
    command = [
        unshare,
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs -o size=8m,mode=1777 tmpfs /dev/shm && exec "$0" -c "$1" "$2"',
        sys.executable,
        SMALL_SHM_SCRIPT,
        name,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "mount" in result.stderr and "Traceback" not in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("SegmentTooLarge:"), result.stdout
    assert str(4 * 1024 * 1024) in lines[0]
    assert "--shm-size" in lines[0]
    assert lines[1] == "left: []"
    assert lines[2] == "small: b'v'"
    assert leftover_files(name) == []  # the real /dev/shm never saw it


def test_segment_too_large_is_raised_for_a_size_beyond_dev_shm(shm_name: str) -> None:
    """A size above the whole tmpfs fails at once (the kernel refuses before allocating)."""
    info = os.statvfs("/dev/shm")
    total = info.f_blocks * info.f_frsize
    with pytest.raises(SegmentTooLarge):
        SessionTable(shm_name, total + 64 * 1024 * 1024)
    assert leftover_files(shm_name) == []


def test_each_table_gets_its_own_random_hash_secret(make_table: TableFactory) -> None:
    """Keys are hashed with a secret kept in the segment, so hash floods cannot be precomputed."""
    first = make_table()
    other_name = unique_name()
    try:
        SessionTable(other_name, DEFAULT_SIZE).close()
        secrets = []
        for name in (first.name, other_name):
            with raw_mapping(name) as mapping:
                secrets.append(layout.GEOMETRY.unpack_from(mapping, layout.GEOMETRY_OFFSET)[7])
        assert secrets[0] != secrets[1]
        assert bytes(16) not in secrets
    finally:
        SessionTable.unlink_name(other_name)


# -- creators that died half-way ---------------------------------------------------------------


def make_raw_segment(name: str, size: int, head: bytes) -> None:
    """A segment as a creator that died early leaves it: ``size`` bytes starting with ``head``."""
    fd = os.open(shm_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, head, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("size", "head"),
    [(0, b""), (DEFAULT_SIZE, b""), (DEFAULT_SIZE, layout.INIT_MAGIC), (4096, layout.INIT_MAGIC)],
    ids=["empty-file", "zeroed", "init-magic", "init-magic-short"],
)
def test_a_half_created_segment_is_initialized_by_the_next_creator(
    shm_name: str, clock: FakeClock, size: int, head: bytes
) -> None:
    make_raw_segment(shm_name, size, head)
    with pytest.raises(SegmentNotFound):
        SessionTable(shm_name)  # open-only: nothing to open yet, and nothing is changed
    with SessionTable(shm_name, DEFAULT_SIZE, clock=clock) as table:
        table.set("a", b"v", clock.now + 60)
        assert table.get("a") == b"v"
        assert table.check().ok
    assert os.stat(shm_path(shm_name)).st_size == DEFAULT_SIZE


CREATOR_SCRIPT = """
import sys
from django_shmsession.table import SessionTable
print("imported", flush=True)
SessionTable(sys.argv[1], int(sys.argv[2])).set("from-creator", b"v", 4e9)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_creators_killed_at_random_moments_never_leave_an_unusable_segment(
    name_factory: Callable[[], str],
) -> None:
    """SIGKILL a process while it creates a 64 MiB table; the next one must still get a table.

    Creating 64 MiB takes tens of milliseconds here (posix_fallocate zeroes the pages), so the
    kills land before, during and after the allocation and the header writes.
    """
    rng = random.Random(99)
    size = 64 * 1024 * 1024
    for _ in range(10):
        name = name_factory()
        command = [sys.executable, "-c", CREATOR_SCRIPT, name, str(size)]
        creator = subprocess.Popen(command, stdout=subprocess.PIPE)
        assert creator.stdout is not None
        assert creator.stdout.readline() == b"imported\n"
        time.sleep(rng.uniform(0.0, 0.02))
        creator.kill()
        creator.stdout.close()
        creator.wait(30)
        with SessionTable(name, size) as table:
            assert table.get("from-creator") in (None, b"v")
            table.set("next", b"works", 4e9)
            assert table.get("next") == b"works"
            assert table.check().ok


def test_the_longest_allowed_name_works(clock: FakeClock) -> None:
    """Semaphores live at /dev/shm/sem.<name>.lock, so the limit is below NAME_MAX (255)."""
    name = unique_name()
    name += "x" * (240 - len(name))
    try:
        with SessionTable(name, DEFAULT_SIZE, clock=clock) as table:
            table.set("a", b"v", clock.now + 60)
            assert table.get("a") == b"v"
        assert leftover_files(name) != []
    finally:
        SessionTable.unlink_name(name)
    assert leftover_files(name) == []


def test_a_handle_keeps_working_after_unlink(table: SessionTable, clock: FakeClock) -> None:
    """Unlinking removes the names only: processes that mapped the table carry on."""
    table.set("a", b"v", clock.now + 60)
    assert table.unlink() is True
    assert table.get("a") == b"v"
    table.set("b", b"w", clock.now + 60)
    assert table.get("b") == b"w"
    with pytest.raises(SegmentNotFound):
        SessionTable(table.name)


# -- one segment, one semaphore ----------------------------------------------------------------


def pair_files(name: str) -> tuple[tuple[int, int], tuple[int, int]]:
    seg, sem = os.stat(shm_path(name)), os.stat(sem_path(name))
    return (seg.st_dev, seg.st_ino), (sem.st_dev, sem.st_ino)


def test_the_header_records_the_semaphore_the_segment_was_created_with(
    table: SessionTable, shm_name: str
) -> None:
    fields = layout.GEOMETRY.unpack_from(raw_bytes(shm_name), layout.GEOMETRY_OFFSET)
    assert (fields[8], fields[9]) == pair_files(shm_name)[1]


def raw_bytes(name: str) -> bytes:
    with open(shm_path(name), "rb") as f:
        return f.read(layout.HEADER_SIZE)


@pytest.mark.parametrize("damage", ["semaphore-removed", "semaphore-replaced", "truncated"])
def test_a_broken_pair_is_replaced_by_a_new_pair(shm_name: str, damage: str) -> None:
    """The old segment's sessions are the accepted cost; pairing it with another semaphore is
    not: two locks on one table."""
    with SessionTable(shm_name, DEFAULT_SIZE) as old:
        old.set("a", b"v", 4e9)
        before = pair_files(shm_name)
        if damage == "truncated":
            os.truncate(shm_path(shm_name), 8192)
        else:
            os.unlink(sem_path(shm_name))
            if damage == "semaphore-replaced":
                posix_ipc.Semaphore(shm_name + ".lock", posix_ipc.O_CREX, 0o600, 1).close()
        with pytest.raises(SegmentNotFound, match="unusable"):
            SessionTable(shm_name)  # open-only never creates
        with SessionTable(shm_name, DEFAULT_SIZE) as new:
            after = pair_files(shm_name)
            assert after[0] != before[0]
            assert after[1] != before[1]
            assert new.get("a") is None
            new.set("b", b"w", 4e9)
            with SessionTable(shm_name) as third:
                assert third.get("b") == b"w"
    assert [f for f in leftover_files(shm_name) if ".new-" in f] == []


def test_the_init_lock_is_per_open_file_description_not_per_process(
    table: SessionTable, shm_name: str
) -> None:
    """lockf locks vanish when the process closes any descriptor of the file, and do not
    exclude threads; OFD locks on a description of their own do both."""
    fd = os.open(shm_path(shm_name), os.O_RDWR)
    try:
        with segment._init_lock(fd):
            other = platform.reopen(fd)
            try:
                assert platform.lock_byte(other, layout.INIT_LOCK_BYTE, wait=False) is False
                os.close(os.open(shm_path(shm_name), os.O_RDWR))  # dropped a lockf lock
                assert platform.lock_byte(other, layout.INIT_LOCK_BYTE, wait=False) is False
                done = threading.Event()
                thread = threading.Thread(
                    target=lambda: (segment.open_segment(shm_name, None, 512).close(), done.set())
                )
                thread.start()
                assert not done.wait(0.3)  # another thread of this process waits for it
            finally:
                os.close(other)
        thread.join(10)
        assert done.is_set()
    finally:
        os.close(fd)


def test_the_flock_struct_matches_this_platform() -> None:
    """l_type, l_whence, l_start, l_len, l_pid: 32 bytes on Linux x86_64 and arm64."""
    assert platform._FLOCK.size == 32


OPENER_SCRIPT = """
import json, os, sys, time
from django_shmsession import segment
name, size, until = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
seen = []
while time.time() < until:
    try:
        s = segment.open_segment(name, size, 512)
    except Exception as err:
        seen.append(["error", type(err).__name__])
        continue
    seen.append([list(s.pair.segment), list(s.pair.semaphore), s.created])
    s.close()
print(json.dumps(seen))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("removal", ["unlink", "semaphore", "segment", "both-reversed"])
def test_openers_racing_removals_never_pair_one_segment_with_two_semaphores(
    shm_name: str, removal: str
) -> None:
    """Four processes open the table in a loop while it is removed again and again: every
    segment any of them opened came with one semaphore, and every semaphore with one segment."""
    SessionTable(shm_name, DEFAULT_SIZE).close()
    until = time.time() + 3
    command = [sys.executable, "-c", OPENER_SCRIPT, shm_name, str(DEFAULT_SIZE), str(until)]
    openers = [subprocess.Popen(command, stdout=subprocess.PIPE) for _ in range(4)]
    while time.time() < until:
        with contextlib.suppress(FileNotFoundError):
            if removal == "unlink":
                SessionTable.unlink_name(shm_name)
            elif removal == "semaphore":
                os.unlink(sem_path(shm_name))
            elif removal == "segment":
                os.unlink(shm_path(shm_name))
            else:
                os.unlink(sem_path(shm_name))
                os.unlink(shm_path(shm_name))
        time.sleep(0.02)
    seen = [json.loads(opener.communicate(timeout=60)[0]) for opener in openers]
    pairs = [(tuple(s[0]), tuple(s[1])) for run in seen for s in run if s[0] != "error"]
    errors = [s for run in seen for s in run if s[0] == "error"]
    assert len(pairs) > 20, (len(pairs), errors[:5])
    semaphores_of: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
    segments_of: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
    for seg, sem in pairs:
        semaphores_of.setdefault(seg, set()).add(sem)
        segments_of.setdefault(sem, set()).add(seg)
    assert all(len(sems) == 1 for sems in semaphores_of.values())
    assert all(len(segs) == 1 for segs in segments_of.values())
    assert len(errors) <= len(pairs) // 10, errors[:5]  # "keeps being replaced" only rarely


SAME_PAIR_SCRIPT = """
import json, sys, time
from django_shmsession import segment
name, size, at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, at - time.time()))
s = segment.open_segment(name, size, 512)
print(json.dumps([list(s.pair.segment), list(s.pair.semaphore), s.created]))
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("damage", ["semaphore", "truncate"])
def test_processes_replacing_a_broken_pair_at_once_all_end_on_one_new_pair(
    shm_name: str, damage: str
) -> None:
    SessionTable(shm_name, DEFAULT_SIZE).close()
    old = pair_files(shm_name)
    if damage == "semaphore":
        os.unlink(sem_path(shm_name))
    else:
        os.truncate(shm_path(shm_name), 8192)
    at = time.time() + 1.0  # after every interpreter started: they open at the same moment
    command = [sys.executable, "-c", SAME_PAIR_SCRIPT, shm_name, str(DEFAULT_SIZE), str(at)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE) for _ in range(6)]
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert {(tuple(r[0]), tuple(r[1])) for r in results} == {pair_files(shm_name)}
    assert pair_files(shm_name)[0] != old[0]
    assert sum(r[2] for r in results) == 1  # one creator, never a third pair
