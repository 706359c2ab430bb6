"""Creating, opening, validating and removing the shared-memory segment and its semaphore.

Rules this module enforces (each learned the hard way, see shared/README.md):

* ``posix_ipc.SharedMemory`` with a nonzero size truncates an *existing* segment, so segments are
  created empty with ``O_CREX`` and sized by us, and existing ones are opened with size 0.
* ``ftruncate`` on tmpfs reserves nothing; touching pages later can SIGBUS. Pages are reserved
  with ``os.posix_fallocate``, which fails cleanly with ENOSPC when /dev/shm is too small.
* Creation races: every opener takes an ``fcntl`` lock on the segment file before looking at the
  header; whoever finds it empty (or half-initialized by a process that died) initializes it.
  The real magic is written last.
* The segment and the semaphore are private (0600) and must belong to the current user.
* Nothing here unlinks a segment on its own, except one this call created and failed to size.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import secrets
import stat
import threading
import zlib
from dataclasses import dataclass
from typing import Any

from .exceptions import (
    CorruptTable,
    ForeignSegment,
    LayoutMismatch,
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
    GEOMETRY,
    GEOMETRY_OFFSET,
    HEADER_CRC,
    HEADER_CRC_OFFSET,
    HEADER_SIZE,
    INIT_LOCK_BYTE,
    INIT_MAGIC,
    LAYOUT_VERSION,
    MAGIC,
    MAGIC_OFFSET,
    MAGIC_STRUCT,
    NIL,
    U32,
    Geometry,
)
from .lock import posix_ipc  # the one guarded import of posix_ipc

SHM_DIR = "/dev/shm"
MODE = 0o600
#: Longest segment name: semaphores live at /dev/shm/sem.<name>.lock and NAME_MAX is 255.
NAME_MAX = 240
SEMAPHORE_SUFFIX = ".lock"
_INIT_THREAD_LOCK = threading.Lock()


def validate_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a valid POSIX IPC name for a table."""
    if not isinstance(name, str) or not name.startswith("/") or "/" in name[1:]:
        raise ValueError(
            f"table name {name!r} must start with '/' and contain no other '/', "
            "e.g. '/mysite-sessions'"
        )
    if not 2 <= len(name.encode()) <= NAME_MAX or "\x00" in name:
        raise ValueError(f"table name {name!r} must be 1 to {NAME_MAX - 1} bytes after the '/'")


def semaphore_name(name: str) -> str:
    return name + SEMAPHORE_SUFFIX


def segment_path(name: str) -> str:
    return f"{SHM_DIR}/{name[1:]}"


def semaphore_path(name: str) -> str:
    return f"{SHM_DIR}/sem.{semaphore_name(name)[1:]}"


def shm_free_bytes() -> int:
    """Free bytes in /dev/shm (0 if it does not exist)."""
    try:
        info = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return info.f_bavail * info.f_frsize


def geometry_bytes(geometry: Geometry, secret: bytes) -> bytes:
    return GEOMETRY.pack(
        LAYOUT_VERSION,
        HEADER_SIZE,
        geometry.segment_size,
        geometry.bucket_count,
        geometry.entry_capacity,
        geometry.chunk_size,
        geometry.chunk_capacity,
        secret,
    )


def header_checksum(geometry_raw: bytes) -> int:
    return zlib.crc32(geometry_raw)


@dataclass
class Segment:
    """An open, validated segment: its mapping, geometry, hash secret and semaphore."""

    name: str
    fd: int
    memory: mmap.mmap
    geometry: Geometry
    secret: bytes
    semaphore: Any
    created: bool

    def rewrite_header(self) -> None:
        """Restore the geometry and checksum from this process's validated copy (repair)."""
        raw = geometry_bytes(self.geometry, self.secret)
        self.memory[GEOMETRY_OFFSET : GEOMETRY_OFFSET + len(raw)] = raw
        HEADER_CRC.pack_into(self.memory, HEADER_CRC_OFFSET, header_checksum(raw))
        MAGIC_STRUCT.pack_into(self.memory, MAGIC_OFFSET, MAGIC)

    def header_intact(self) -> bool:
        raw = bytes(self.memory[GEOMETRY_OFFSET : GEOMETRY_OFFSET + GEOMETRY.size])
        (crc,) = HEADER_CRC.unpack_from(self.memory, HEADER_CRC_OFFSET)
        (magic,) = MAGIC_STRUCT.unpack_from(self.memory, MAGIC_OFFSET)
        return (
            magic == MAGIC
            and raw == geometry_bytes(self.geometry, self.secret)
            and (crc == header_checksum(raw))
        )

    def close(self) -> None:
        self.memory.close()
        os.close(self.fd)
        self.semaphore.close()


def open_segment(name: str, size: int | None, chunk_size: int) -> Segment:
    """Open ``name``, creating and initializing it with ``size`` bytes if needed.

    ``size=None`` opens an existing segment only.
    """
    validate_name(name)
    if size is not None:
        Geometry.plan(size, chunk_size)  # a size too small is refused before anything is created
    fd, created = _open_fd(name, size)
    semaphore = None
    try:
        _check_private(fd, segment_path(name))
        # The semaphore first: its page must not be the one a full-size segment lacks.
        semaphore = _open_semaphore(name)
        # fcntl locks exclude other processes only; the thread lock excludes this one's threads.
        with _INIT_THREAD_LOCK:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, INIT_LOCK_BYTE)
            try:
                memory, geometry, secret = _map_initialized(name, fd, size, chunk_size, created)
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, INIT_LOCK_BYTE)
    except BaseException as err:
        if semaphore is not None:
            semaphore.close()
        os.close(fd)
        if created and isinstance(err, SegmentTooLarge):
            unlink(name)  # both were made by this call for a table that cannot exist
        raise
    return Segment(name, fd, memory, geometry, secret, semaphore, created)


def unlink(name: str) -> bool:
    """Remove the segment and its semaphore; True if either existed."""
    validate_name(name)
    existed = False
    for remove in (posix_ipc.unlink_shared_memory, posix_ipc.unlink_semaphore):
        target = name if remove is posix_ipc.unlink_shared_memory else semaphore_name(name)
        try:
            remove(target)
            existed = True
        except posix_ipc.ExistentialError:
            pass
    return existed


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
        return shm.fd, False
    raise ShmSessionError(f"could not open or create {name!r}: it keeps being removed")


def _foreign_message(name: str) -> str:
    return (
        f"the session table {segment_path(name)} belongs to another user or is not private "
        f"(mode 0600); run the site as its owner, or pick another SHMSESSION['NAME']"
    )


def _check_private(fd: int, path: str) -> None:
    info = os.fstat(fd)
    _require_private(info, path)


def _require_private(info: os.stat_result, path: str) -> None:
    if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise ForeignSegment(
            f"{path} is owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}; "
            f"it must belong to uid {os.geteuid()} with mode 600. Run the site as its owner, "
            "pick another SHMSESSION['NAME'], or remove the file if it is stale"
        )


def _map_initialized(
    name: str, fd: int, size: int | None, chunk_size: int, created: bool
) -> tuple[mmap.mmap, Geometry, bytes]:
    """Under the init lock: validate an initialized segment, or initialize an empty one."""
    actual = os.fstat(fd).st_size
    magic = os.pread(fd, len(MAGIC), MAGIC_OFFSET) if actual >= HEADER_SIZE else b""
    if magic == MAGIC:
        return _map_existing(name, fd, actual, size)
    if magic not in (b"", INIT_MAGIC, bytes(len(MAGIC))):
        raise LayoutMismatch(
            f"{segment_path(name)} is not a django-shmsession table (unknown magic {magic!r}) "
            f"or was written by an incompatible version; remove it with "
            f"`manage.py shmsession unlink` (drops its sessions) or choose another NAME"
        )
    if size is None:
        raise SegmentNotFound(
            f"the session table {name!r} exists but was never initialized; start the site "
            "(with SHMSESSION['SIZE'] set) to initialize it"
        )
    return _initialize(name, fd, size, chunk_size, created)


def _map_existing(
    name: str, fd: int, actual: int, size: int | None
) -> tuple[mmap.mmap, Geometry, bytes]:
    raw = os.pread(fd, GEOMETRY.size, GEOMETRY_OFFSET)
    (crc,) = HEADER_CRC.unpack(os.pread(fd, HEADER_CRC.size, HEADER_CRC_OFFSET))
    version, header_size, segment_size, buckets, entries, chunk_size, chunks, secret = (
        GEOMETRY.unpack(raw)
    )
    recreate = (
        "remove it with `manage.py shmsession unlink` (this drops its sessions) and restart the "
        "site to recreate it"
    )
    if version != LAYOUT_VERSION or header_size != HEADER_SIZE:
        raise LayoutMismatch(
            f"{segment_path(name)} has layout version {version}, this django-shmsession uses "
            f"{LAYOUT_VERSION}; {recreate}"
        )
    if crc != header_checksum(raw):
        raise CorruptTable(f"the header of {segment_path(name)} is corrupt; {recreate}")
    geometry = Geometry(segment_size, buckets, entries, chunk_size, chunks)
    if segment_size != actual or not geometry.is_consistent():
        raise CorruptTable(
            f"{segment_path(name)} is {actual} bytes but its header says {segment_size}; {recreate}"
        )
    if size is not None and size != segment_size:
        raise LayoutMismatch(
            f"the session table {segment_path(name)} is {segment_size} bytes but {size} bytes "
            f"were requested; an existing table is never resized: set SHMSESSION['SIZE'] to "
            f"{segment_size}, or {recreate} with the new size"
        )
    memory = mmap.mmap(fd, actual)
    return memory, geometry, secret


def _initialize(
    name: str, fd: int, size: int, chunk_size: int, created: bool
) -> tuple[mmap.mmap, Geometry, bytes]:
    geometry = Geometry.plan(size, chunk_size)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        os.ftruncate(fd, 0)
        if created:
            posix_ipc.unlink_shared_memory(name)
        if err.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise SegmentTooLarge(
                f"cannot allocate a {size}-byte session table in {SHM_DIR}: only "
                f"{shm_free_bytes()} bytes are free. Lower SHMSESSION['SIZE'], or give "
                f"{SHM_DIR} more room (Docker: --shm-size; tmpfs: mount -o remount,size=...)"
            ) from err
        raise
    memory = mmap.mmap(fd, size)
    secret = secrets.token_bytes(16)
    MAGIC_STRUCT.pack_into(memory, MAGIC_OFFSET, INIT_MAGIC)
    raw = geometry_bytes(geometry, secret)
    memory[GEOMETRY_OFFSET : GEOMETRY_OFFSET + len(raw)] = raw
    HEADER_CRC.pack_into(memory, HEADER_CRC_OFFSET, header_checksum(raw))
    memory[CONTROL_OFFSET : CONTROL_OFFSET + CONTROL_WORDS * 8] = bytes(CONTROL_WORDS * 8)
    control = memoryview(memory)[CONTROL_OFFSET : CONTROL_OFFSET + CONTROL_WORDS * 8].cast("Q")
    control[CTL_FREE_ENTRY] = NIL
    control[CTL_FREE_CHUNK] = NIL
    control[CTL_ENTRY_HWM] = 0
    control[CTL_CHUNK_HWM] = 0
    control.release()
    start = geometry.buckets_offset
    memory[start : start + geometry.bucket_count * U32] = b"\xff" * (geometry.bucket_count * U32)
    MAGIC_STRUCT.pack_into(memory, MAGIC_OFFSET, MAGIC)
    return memory, geometry, secret


def _open_semaphore(name: str) -> Any:
    try:
        semaphore = posix_ipc.Semaphore(
            semaphore_name(name), posix_ipc.O_CREAT, mode=MODE, initial_value=1
        )
    except posix_ipc.PermissionsError as err:
        raise ForeignSegment(_foreign_message(name)) from err
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.ENOMEM):
            raise
        raise SegmentTooLarge(
            f"{SHM_DIR} is full: not even the table's semaphore fits ({shm_free_bytes()} bytes "
            f"free). Free space in {SHM_DIR} or give it more room (Docker: --shm-size)"
        ) from err
    try:
        info = os.stat(semaphore_path(name))
    except FileNotFoundError:  # pragma: no cover - glibc keeps semaphores in /dev/shm
        return semaphore
    try:
        _require_private(info, semaphore_path(name))
    except ForeignSegment:
        semaphore.close()
        raise
    return semaphore
