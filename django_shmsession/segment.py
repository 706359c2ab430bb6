"""Creating, opening, validating and removing the shared-memory segment and its semaphore.

Rules this module enforces (each learned the hard way, see shared/README.md):

* ``posix_ipc.SharedMemory`` with a nonzero size truncates an *existing* segment, so segments are
  created empty with ``O_CREX`` and sized by us, and existing ones are opened with size 0.
* ``ftruncate`` on tmpfs reserves nothing; touching pages later can SIGBUS. Pages are reserved
  with ``os.posix_fallocate``, which fails cleanly with ENOSPC when /dev/shm is too small.
* Creation races: every opener takes an open-file-description lock on byte ``INIT_LOCK_BYTE`` of
  the segment (on a description of its own, so threads of one process exclude each other too)
  before looking at the header. Only the process that created the file initializes it in place;
  the real magic is written last.
* **One segment, one semaphore.** Initialization makes a fresh semaphore (created under a private
  temporary name with ``O_CREX``, then renamed over the table's semaphore name) and records its
  identity (st_dev, st_ino) in the header, so a new segment never pairs with an old semaphore.
  Opening verifies that the name still names that semaphore. A segment whose semaphore is gone
  or another one, whose file size no longer matches its header (truncated under running workers:
  touching it would SIGBUS), or that was left uninitialized by a creator that died, is *broken*:
  under its init lock, if the name still names it, its name is removed and a new pair created.
  Concurrent openers serialize on the old segment's init lock and all end on the one new pair.
* The segment and the semaphore are private (0600) and must belong to the current user.
* Nothing here unlinks a working segment on its own.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
import stat
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from .exceptions import (
    CorruptTable,
    ForeignSegment,
    LayoutMismatch,
    NotATable,
    SegmentNotFound,
    SegmentTooLarge,
    ShmSessionError,
)
from .layout import (
    CONTROL_OFFSET,
    CONTROL_WORDS,
    CTL_CHUNK_HWM,
    CTL_ENTRY_HWM,
    CTL_FREE_CHUNK,
    CTL_FREE_ENTRY,
    FIXED_SIZE,
    GEOMETRY,
    GEOMETRY_OFFSET,
    HEADER_CRC,
    HEADER_CRC_OFFSET,
    HEADER_SIZE,
    INIT_LOCK_BYTE,
    INIT_MAGIC,
    INTENT_SIZE,
    LAYOUT_VERSION,
    MAGIC,
    MAGIC_OFFSET,
    MAGIC_STRUCT,
    NIL,
    REGISTRY_OFFSET,
    SLOT_COUNT,
    U32,
    Geometry,
)
from .platform import (
    NAME_MAX,
    SEMAPHORE_SUFFIX,
    SHM_DIR,
    foreign_file_message,
    lock_byte,
    posix_ipc,
    reopen,
    segment_path,
    semaphore_file,
    semaphore_name,
    semaphore_path,
    shm_free_bytes,
    validate_name,
)

__all__ = [
    "MODE",
    "NAME_MAX",
    "SEMAPHORE_SUFFIX",
    "SHM_DIR",
    "PairIdentity",
    "Segment",
    "current_pair",
    "open_segment",
    "segment_path",
    "semaphore_name",
    "semaphore_path",
    "shm_free_bytes",
    "unlink",
    "validate_name",
]

MODE = 0o600
#: open_segment starts over at least this often (and for 4 * ABANDONED_AFTER) when the name is
#: replaced under it, before giving up.
ATTEMPTS = 20
#: An uninitialized segment whose file did not change for this long lost its creator (a live
#: creator takes the init lock microseconds after creating the file and holds it until done).
ABANDONED_AFTER = 0.5
_RETRY_PAUSE = 0.01

FileId = tuple[int, int]  # (st_dev, st_ino)


@dataclass(frozen=True)
class PairIdentity:
    """What names a table, by stat alone: the segment file, its size, and the semaphore."""

    segment: FileId
    size: int
    semaphore: FileId


def current_pair(name: str) -> PairIdentity | None:
    """The pair ``name`` names right now, or None when either file is missing.

    Stats only (never touches a mapping: a truncated segment would SIGBUS).
    """
    try:
        seg = os.stat(segment_path(name))
        sem = os.stat(semaphore_path(name))
    except FileNotFoundError:
        return None
    return PairIdentity((seg.st_dev, seg.st_ino), seg.st_size, (sem.st_dev, sem.st_ino))


def geometry_bytes(geometry: Geometry, secret: bytes, semaphore_id: FileId) -> bytes:
    return GEOMETRY.pack(
        LAYOUT_VERSION,
        HEADER_SIZE,
        geometry.segment_size,
        geometry.bucket_count,
        geometry.entry_capacity,
        geometry.chunk_size,
        geometry.chunk_capacity,
        secret,
        semaphore_id[0],
        semaphore_id[1],
        SLOT_COUNT,
        INTENT_SIZE,
    )


def header_checksum(geometry_raw: bytes) -> int:
    return zlib.crc32(geometry_raw)


@dataclass(eq=False)
class Segment:
    """An open, validated segment: its mapping, geometry, hash secret and its own semaphore.

    Closed explicitly by ``close()``, or when the last reference goes (``__del__``): a handle
    replaced after an unlink must give its pages back even if nobody calls ``close()``.
    """

    name: str
    fd: int
    memory: mmap.mmap
    geometry: Geometry
    secret: bytes
    semaphore: Any
    created: bool
    pair: PairIdentity
    closed: bool = field(default=False, init=False)

    @property
    def semaphore_id(self) -> FileId:
        return self.pair.semaphore

    def rewrite_header(self) -> None:
        """Restore the geometry and checksum from this process's validated copy (repair)."""
        raw = geometry_bytes(self.geometry, self.secret, self.semaphore_id)
        self.memory[GEOMETRY_OFFSET : GEOMETRY_OFFSET + len(raw)] = raw
        HEADER_CRC.pack_into(self.memory, HEADER_CRC_OFFSET, header_checksum(raw))
        MAGIC_STRUCT.pack_into(self.memory, MAGIC_OFFSET, MAGIC)

    def header_intact(self) -> bool:
        raw = bytes(self.memory[GEOMETRY_OFFSET : GEOMETRY_OFFSET + GEOMETRY.size])
        (crc,) = HEADER_CRC.unpack_from(self.memory, HEADER_CRC_OFFSET)
        (magic,) = MAGIC_STRUCT.unpack_from(self.memory, MAGIC_OFFSET)
        return (
            magic == MAGIC
            and raw == geometry_bytes(self.geometry, self.secret, self.semaphore_id)
            and (crc == header_checksum(raw))
        )

    def close(self) -> None:
        """Unmap, close the fd and the semaphore; idempotent. The segment itself stays."""
        if self.closed:
            return
        self.closed = True
        with suppress(BufferError):  # a view still exports it: unmapped when that view goes
            self.memory.close()
        os.close(self.fd)
        self.semaphore.close()

    def __del__(self) -> None:
        # posix_ipc's Semaphore does not sem_close on collection and an int fd never closes
        # itself: without this, every dropped handle pinned a whole segment in /dev/shm.
        with suppress(Exception):  # interpreter shutdown: modules may be gone
            self.close()


class _Retry:
    """open_segment must start over (after ``delay`` seconds): the name changed under it."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay


#: (control word, value) pairs a creator stores while initializing (settings it records).
Recorded = Sequence[tuple[int, int]]


def open_segment(name: str, size: int | None, chunk_size: int, recorded: Recorded = ()) -> Segment:
    """Open ``name``, creating and initializing it with ``size`` bytes if needed.

    ``size=None`` opens an existing, intact pair only (SegmentNotFound otherwise). A creator
    stores each ``recorded`` (control word, value) while initializing, before the magic: so
    every opener of an initialized segment sees them.
    """
    validate_name(name)
    if size is not None:
        Geometry.plan(size, chunk_size)  # a size too small is refused before anything is created
    deadline = time.monotonic() + 4 * ABANDONED_AFTER
    attempts = 0
    while attempts < ATTEMPTS or time.monotonic() < deadline:
        attempts += 1
        fd, created = _open_fd(name, size)
        try:
            outcome = _open_under_init_lock(name, fd, size, chunk_size, created, recorded)
        except BaseException:
            os.close(fd)
            raise
        if isinstance(outcome, Segment):
            return outcome
        os.close(fd)
        time.sleep(outcome.delay)
    raise ShmSessionError(f"could not open or create {name!r}: it keeps being replaced")


def unlink(name: str) -> bool:
    """Remove the segment and its semaphore; True if either existed.

    Both go under the segment's init lock, the semaphore first: while the lock is held no
    opener can look at the segment, and until the segment's name goes it stops any creator,
    so no process can pair a new segment with the old semaphore (or the old segment with a
    new one) between the two removals.
    """
    validate_name(name)
    _remove_temporaries(name)
    try:
        fd = posix_ipc.SharedMemory(name, 0).fd
    except posix_ipc.ExistentialError:
        return _unlink_semaphore(name)
    except posix_ipc.PermissionsError as err:
        raise ForeignSegment(_foreign_message(name)) from err
    except OSError as err:
        raise _translated(name, err) from err
    try:
        with _init_lock(fd):
            removed_semaphore = _unlink_semaphore(name)
            removed_segment = _unlink_segment_if_named(name, fd)
    finally:
        os.close(fd)
    return removed_semaphore or removed_segment


@contextmanager
def _init_lock(fd: int) -> Iterator[None]:
    """Hold the init lock of the file behind ``fd`` (on a description of our own)."""
    lock_fd = reopen(fd)
    try:
        lock_byte(lock_fd, INIT_LOCK_BYTE, wait=True)
        yield
    finally:
        os.close(lock_fd)  # the last descriptor of the description: the kernel drops the lock


def _unlink_semaphore(name: str) -> bool:
    try:
        posix_ipc.unlink_semaphore(semaphore_name(name))
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.PermissionsError as err:
        raise ForeignSegment(foreign_file_message(semaphore_path(name))) from err
    return True


def _names(name: str, fd: int) -> bool:
    """True when ``name`` still names the file behind ``fd``."""
    try:
        info = os.stat(segment_path(name))
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (info.st_dev, info.st_ino) == (mine.st_dev, mine.st_ino)


def _unlink_segment_if_named(name: str, fd: int) -> bool:
    """Remove the name if it names ``fd``'s file (call under its init lock)."""
    if not _names(name, fd):
        return False
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:  # pragma: no cover - removed by hand just now
        return False
    return True


def _open_fd(name: str, size: int | None) -> tuple[int, bool]:
    """Return (fd, created). Never passes a size to posix_ipc (that would truncate)."""
    for _ in range(10):
        if size is not None:
            try:
                shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=MODE, size=0)
            except posix_ipc.ExistentialError:
                pass  # exists: open it below
            except posix_ipc.PermissionsError as err:
                raise ForeignSegment(_foreign_message(name)) from err
            except OSError as err:
                raise _translated(name, err) from err
            else:
                return shm.fd, True
        try:
            shm = posix_ipc.SharedMemory(name, 0)
        except posix_ipc.ExistentialError:
            if size is None:
                raise SegmentNotFound(
                    f"no session table {name!r} exists ({segment_path(name)}); start the site "
                    "(or the gunicorn master) once to create it"
                ) from None
            continue  # unlinked between our two calls: try to create again
        except posix_ipc.PermissionsError as err:
            raise ForeignSegment(_foreign_message(name)) from err
        except OSError as err:
            raise _translated(name, err) from err
        return shm.fd, False
    raise ShmSessionError(f"could not open or create {name!r}: it keeps being removed")


def _foreign_message(name: str) -> str:
    return f"cannot use the session table {name!r}: {foreign_file_message(segment_path(name))}"


def _translated(name: str, err: OSError) -> OSError:
    """ELOOP: shm_open refuses to follow a symbolic link planted under the table's name (it
    opens with O_NOFOLLOW); say so, naming the link and its owner, instead of a bare errno."""
    if err.errno == errno.ELOOP:
        return ForeignSegment(_foreign_message(name))
    return err


def _require_private(info: os.stat_result, path: str) -> None:
    if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise ForeignSegment(f"cannot use the session table: {foreign_file_message(path)}")


# -- opening: under the segment's init lock --------------------------------------------------------


def _open_under_init_lock(
    name: str, fd: int, size: int | None, chunk_size: int, created: bool, recorded: Recorded
) -> Segment | _Retry:
    _require_private(os.fstat(fd), segment_path(name))
    with _init_lock(fd):
        if not _names(name, fd):
            return _Retry()  # replaced or removed before we got the lock: open the current one
        info = os.fstat(fd)
        magic = os.pread(fd, len(MAGIC), MAGIC_OFFSET) if info.st_size >= HEADER_SIZE else b""
        if magic == MAGIC:
            return _open_initialized(name, fd, info.st_size, size)
        if magic not in (b"", INIT_MAGIC, bytes(len(MAGIC))):
            raise NotATable(
                f"{segment_path(name)} is not a django-shmsession table (unknown magic "
                f"{magic!r}) or was written by an incompatible version; remove it with "
                f"`manage.py shmsession unlink` (drops its sessions) or choose another NAME"
            )
        if size is None:
            raise SegmentNotFound(
                f"the session table {name!r} exists but was never initialized; start the site "
                "(with SHMSESSION['SIZE'] set) to initialize it"
            )
        if created:
            return _initialize(name, fd, size, chunk_size, recorded)
        return _replace_if_abandoned(name, fd, info)


def _replace_if_abandoned(name: str, fd: int, info: os.stat_result) -> _Retry:
    """An uninitialized segment someone else created: wait for its creator, unless it is gone.

    Never initialized in place: it may be a live table truncated to nothing, still mapped by
    workers that would then write into a new table under their old semaphore.
    """
    if time.time() - info.st_ctime < ABANDONED_AFTER:
        return _Retry(_RETRY_PAUSE)
    _unlink_segment_if_named(name, fd)
    return _Retry()


def _open_initialized(name: str, fd: int, actual: int, size: int | None) -> Segment | _Retry:
    geometry, secret, semaphore_id = _read_header(name, fd)
    broken = _broken_because(name, geometry, actual, semaphore_id)
    if broken is not None:
        if size is None:
            raise SegmentNotFound(
                f"the session table {name!r} is unusable ({broken}); the site replaces it with "
                "a new, empty one at its next request"
            )
        _unlink_segment_if_named(name, fd)  # under its init lock: the next opener creates
        return _Retry()
    if size is not None and size != geometry.segment_size:
        raise LayoutMismatch(
            f"the session table {segment_path(name)} is {geometry.segment_size} bytes but "
            f"{size} bytes were requested; an existing table is never resized: set "
            f"SHMSESSION['SIZE'] to {geometry.segment_size}, or {_RECREATE} with the new size"
        )
    semaphore = _open_paired_semaphore(name, semaphore_id)
    if semaphore is None:
        return _Retry()  # replaced between the check and the open: look again
    memory = mmap.mmap(fd, actual)
    pair = _pair_of(fd, actual, semaphore_id)
    return Segment(name, fd, memory, geometry, secret, semaphore, False, pair)


_RECREATE = (
    "remove it with `manage.py shmsession unlink` (this drops its sessions) and restart the "
    "site to recreate it"
)


def _read_header(name: str, fd: int) -> tuple[Geometry, bytes, FileId]:
    """The validated geometry, secret and recorded semaphore identity of an initialized file."""
    raw = os.pread(fd, GEOMETRY.size, GEOMETRY_OFFSET)
    (crc,) = HEADER_CRC.unpack(os.pread(fd, HEADER_CRC.size, HEADER_CRC_OFFSET))
    (
        version,
        header_size,
        segment_size,
        buckets,
        entries,
        chunk_size,
        chunks,
        secret,
        sem_dev,
        sem_ino,
        slot_count,
        intent_size,
    ) = GEOMETRY.unpack(raw)
    if (
        version != LAYOUT_VERSION
        or header_size != HEADER_SIZE
        or slot_count != SLOT_COUNT
        or intent_size != INTENT_SIZE
    ):
        raise LayoutMismatch(
            f"{segment_path(name)} has layout version {version}, this django-shmsession uses "
            f"{LAYOUT_VERSION}; {_RECREATE}"
        )
    if crc != header_checksum(raw):
        raise CorruptTable(f"the header of {segment_path(name)} is corrupt; {_RECREATE}")
    geometry = Geometry(segment_size, buckets, entries, chunk_size, chunks)
    if not geometry.is_consistent():
        raise CorruptTable(f"the geometry in {segment_path(name)} is inconsistent; {_RECREATE}")
    return geometry, secret, (sem_dev, sem_ino)


def _broken_because(name: str, geometry: Geometry, actual: int, semaphore_id: FileId) -> str | None:
    """Why this initialized segment cannot be used as it is, or None when the pair is intact."""
    if actual != geometry.segment_size:
        return f"{segment_path(name)} is {actual} bytes but its header says {geometry.segment_size}"
    try:
        info = os.stat(semaphore_path(name))
    except FileNotFoundError:
        return f"its semaphore {semaphore_path(name)} was removed"
    if (info.st_dev, info.st_ino) != semaphore_id:
        return f"{semaphore_path(name)} is not the semaphore it was created with"
    return None


def _open_paired_semaphore(name: str, semaphore_id: FileId) -> Any | None:
    """Open the existing semaphore if it is the recorded one; None if it changed meanwhile.

    Opened, then stat'ed: the recorded semaphore was named before its header was written (and
    so before we read it), and a name that stops naming a file never names it again, so a
    match after the open proves the open got that very semaphore.
    """
    try:
        semaphore = posix_ipc.Semaphore(semaphore_name(name), 0)
    except posix_ipc.ExistentialError:
        return None
    except posix_ipc.PermissionsError as err:
        raise ForeignSegment(foreign_file_message(semaphore_path(name))) from err
    try:
        info = os.stat(semaphore_path(name))
        if (info.st_dev, info.st_ino) != semaphore_id:
            semaphore.close()
            return None
        _require_private(info, semaphore_path(name))
    except BaseException:
        semaphore.close()
        raise
    return semaphore


def _pair_of(fd: int, size: int, semaphore_id: FileId) -> PairIdentity:
    info = os.fstat(fd)
    return PairIdentity((info.st_dev, info.st_ino), size, semaphore_id)


# -- creating: by the process that created the file, under its init lock --------------------------


def _initialize(name: str, fd: int, size: int, chunk_size: int, recorded: Recorded) -> Segment:
    """Reserve the pages, install a fresh semaphore, write the header (magic last)."""
    geometry = Geometry.plan(size, chunk_size)
    _reserve(name, fd, size)
    try:
        semaphore, semaphore_id = _install_fresh_semaphore(name)
    except BaseException:
        os.ftruncate(fd, 0)
        _unlink_segment_if_named(name, fd)  # this call created it for a table that cannot exist
        raise
    try:
        memory = mmap.mmap(fd, size)
        secret = secrets.token_bytes(16)
        _write_header(memory, geometry, secret, semaphore_id, recorded)
    except BaseException:
        semaphore.close()
        raise
    pair = _pair_of(fd, size, semaphore_id)
    return Segment(name, fd, memory, geometry, secret, semaphore, True, pair)


def _install_fresh_semaphore(name: str) -> tuple[Any, FileId]:
    """A new semaphore (value 1) under the table's semaphore name, and its identity.

    Created under a temporary name that is ours alone, so its stat is certainly the semaphore
    we hold, then renamed over the table's name: any old semaphore is replaced in one step.
    A creator killed between the two steps leaves the temporary behind: later creators remove
    old ones, and ``unlink`` removes them all.
    """
    _remove_temporaries(name, older_than=TEMPORARY_MAX_AGE)
    semaphore, temporary = _create_temporary_semaphore(name)
    try:
        info = os.stat(semaphore_file(temporary))
        _require_private(info, semaphore_file(temporary))
        os.rename(semaphore_file(temporary), semaphore_path(name))
    except BaseException:
        semaphore.close()
        _unlink_quietly(temporary)
        raise
    return semaphore, (info.st_dev, info.st_ino)


#: Seconds after which a temporary semaphore surely lost its creator (it lives microseconds).
TEMPORARY_MAX_AGE = 60.0
_TEMPORARY_SUFFIX = re.compile(r"\.new-[0-9a-f]{12}")


def _temporary_prefix(name: str) -> str:
    return name[:200]


def _create_temporary_semaphore(name: str) -> tuple[Any, str]:
    for _ in range(10):
        temporary = f"{_temporary_prefix(name)}.new-{secrets.token_hex(6)}"
        try:
            semaphore = posix_ipc.Semaphore(temporary, posix_ipc.O_CREX, mode=MODE, initial_value=1)
        except posix_ipc.ExistentialError:  # pragma: no cover - 48 random bits collided
            continue
        except posix_ipc.PermissionsError as err:
            raise ForeignSegment(_foreign_message(name)) from err
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.ENOMEM):
                raise
            raise SegmentTooLarge(
                f"{SHM_DIR} is full: the table fits but its semaphore does not "
                f"({shm_free_bytes()} bytes free). Lower SHMSESSION['SIZE'] a little, or give "
                f"{SHM_DIR} more room (Docker: --shm-size)"
            ) from err
        return semaphore, temporary
    raise ShmSessionError(  # pragma: no cover - see above
        f"could not create a semaphore for {name!r}"
    )


def _remove_temporaries(name: str, older_than: float = 0.0) -> None:
    """Remove temporary semaphores of ``name`` left by creators that died before renaming."""
    prefix = "sem." + _temporary_prefix(name)[1:]
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:  # pragma: no cover - no /dev/shm: creation fails anyway
        return
    now = time.time()
    for entry in entries:
        if not entry.startswith(prefix) or not _TEMPORARY_SUFFIX.fullmatch(entry[len(prefix) :]):
            continue
        path = f"{SHM_DIR}/{entry}"
        with suppress(FileNotFoundError):
            if now - os.stat(path).st_ctime >= older_than:
                os.unlink(path)


def _unlink_quietly(semaphore: str) -> None:
    with suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_semaphore(semaphore)


def _reserve(name: str, fd: int, size: int) -> None:
    """posix_fallocate the whole segment; on ENOSPC remove the file this call created."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        os.ftruncate(fd, 0)
        _unlink_segment_if_named(name, fd)
        if err.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise SegmentTooLarge(
                f"cannot allocate a {size}-byte session table in {SHM_DIR}: only "
                f"{shm_free_bytes()} bytes are free. Lower SHMSESSION['SIZE'], or give "
                f"{SHM_DIR} more room (Docker: --shm-size; tmpfs: mount -o remount,size=...)"
            ) from err
        raise


def _write_header(
    memory: mmap.mmap, geometry: Geometry, secret: bytes, semaphore_id: FileId, recorded: Recorded
) -> None:
    MAGIC_STRUCT.pack_into(memory, MAGIC_OFFSET, INIT_MAGIC)
    raw = geometry_bytes(geometry, secret, semaphore_id)
    memory[GEOMETRY_OFFSET : GEOMETRY_OFFSET + len(raw)] = raw
    HEADER_CRC.pack_into(memory, HEADER_CRC_OFFSET, header_checksum(raw))
    memory[CONTROL_OFFSET : CONTROL_OFFSET + CONTROL_WORDS * 8] = bytes(CONTROL_WORDS * 8)
    memory[REGISTRY_OFFSET:FIXED_SIZE] = bytes(FIXED_SIZE - REGISTRY_OFFSET)  # registry, intent
    control = memoryview(memory)[CONTROL_OFFSET : CONTROL_OFFSET + CONTROL_WORDS * 8].cast("Q")
    control[CTL_FREE_ENTRY] = NIL
    control[CTL_FREE_CHUNK] = NIL
    control[CTL_ENTRY_HWM] = 0
    control[CTL_CHUNK_HWM] = 0
    for word, value in recorded:
        control[word] = value
    control.release()
    start = geometry.buckets_offset
    memory[start : start + geometry.bucket_count * U32] = b"\xff" * (geometry.bucket_count * U32)
    MAGIC_STRUCT.pack_into(memory, MAGIC_OFFSET, MAGIC)
