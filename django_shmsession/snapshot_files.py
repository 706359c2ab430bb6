"""Snapshot files on disk: atomic replacement, reading (files, stdin), the ``.state.json`` sidecar.

A snapshot holds every session key, and a session key is a login: every file here is created
mode 0600. A dump writes a temporary file in the snapshot's own directory (a rename across file
systems would not be atomic), fsyncs it, renames it over the old snapshot and fsyncs the
directory, so a crash or SIGKILL at any instant leaves either the old snapshot or the new one,
complete. A dumper killed before its rename leaves its temporary file; the next dump removes it.
Each dumper holds an open-file-description lock on its temporary file, so "is its writer dead?"
is a question the kernel answers (no pid that could have been reused).

Knows nothing of the table or of Django.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import mmap
import os
import secrets
import stat
import struct
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from . import faults
from .exceptions import SnapshotError

logger = logging.getLogger("django_shmsession")

MODE = 0o600
#: struct flock on Linux: l_type, l_whence, l_start, l_len (0: the whole file), l_pid, padding.
_FLOCK = struct.Struct("hhqqi4x")
#: Write buffer of a dump: big writes, few system calls.
BUFFER = 1024 * 1024
TEMP_MARK = ".tmp-"
STATE_SUFFIX = ".state.json"
#: Fault points of a file dump, in order (tests SIGKILL the dumper at each).
FAULT_POINTS = (
    "dump:after-open",
    "dump:after-block",
    "dump:before-fsync",
    "dump:before-rename",
    "dump:after-rename",
)


def _fault(point: str) -> None:
    if faults.hook is not None:
        faults.hook(point)


def _temp_prefix(path: str) -> str:
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}{TEMP_MARK}")


def _lock_exclusive(fd: int) -> bool:
    """Take an OFD write lock on ``fd`` without waiting; False if another open file holds it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return False
    return True


def remove_stale_temp_files(path: str) -> int:
    """Remove temporary files of dumps to ``path`` whose writer is gone; returns how many."""
    prefix = _temp_prefix(path)
    directory, start = os.path.split(prefix)
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(start):
            continue
        full = os.path.join(directory, name)
        try:
            fd = os.open(full, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if _lock_exclusive(fd):  # its writer died: nobody holds the lock
                os.unlink(full)
                removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    if removed:
        logger.info(
            "django-shmsession: removed %d unfinished snapshot file(s) of %s", removed, path
        )
    return removed


class AtomicFile:
    """A temporary file next to ``path`` that becomes ``path`` only by :meth:`commit`.

    Use as a context manager: leaving it without a commit (an exception) removes the file.

    :raises SnapshotError: the directory is missing or not writable.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.directory = os.path.dirname(self.path)
        if os.path.isdir(self.path):
            raise SnapshotError(f"{path} is a directory; give the path of a snapshot file")
        remove_stale_temp_files(self.path)
        self.temp = f"{_temp_prefix(self.path)}{os.getpid()}-{secrets.token_hex(4)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.temp, flags, MODE)
        except FileNotFoundError as err:
            raise SnapshotError(
                f"cannot write {path}: the directory {self.directory} does not exist; create "
                "it (owned by the site's user, e.g. mode 0700)"
            ) from err
        except PermissionError as err:
            raise SnapshotError(
                f"cannot write {path}: no permission to create files in {self.directory}; "
                "make it writable by the site's user"
            ) from err
        try:
            os.fchmod(fd, MODE)  # the umask may have taken bits away, never add them: be exact
            _lock_exclusive(fd)
            self.stream: BinaryIO = io.BufferedWriter(io.FileIO(fd, "wb", closefd=False), BUFFER)
        except BaseException:
            os.close(fd)
            os.unlink(self.temp)
            raise
        self.fd = fd
        self.committed = False
        _fault("dump:after-open")

    def commit(self) -> None:
        """Flush, fsync, rename over ``path``, fsync the directory: the new snapshot is durable."""
        self.stream.flush()
        _fault("dump:before-fsync")
        os.fsync(self.fd)
        _fault("dump:before-rename")
        os.rename(self.temp, self.path)
        self.committed = True
        _fault("dump:after-rename")
        fsync_directory(self.directory)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.close()
        os.close(self.fd)  # drops the lock
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (the entry lives in the directory, not the file)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def read_buffer(path: str) -> Iterator[tuple[Any, str]]:
    """The snapshot at ``path`` (``-``: stdin) as a read-only buffer, and a name for messages.

    A file is mapped, not read, so a 1 GiB snapshot costs no 1 GiB copy; stdin is first spooled
    to an anonymous temporary file (unlinked, mode 0600) so it can be mapped the same way.
    Do not truncate a snapshot while it is being restored (dumps replace files, never rewrite
    them, so they are safe).

    :raises SnapshotError: the file is missing or unreadable.
    """
    if path == "-":
        with tempfile.TemporaryFile(prefix="shmsession-restore-") as spool:
            os.fchmod(spool.fileno(), MODE)
            source = sys.stdin.buffer
            while chunk := source.read(BUFFER):
                spool.write(chunk)
            spool.flush()
            with _mapped(spool.fileno()) as buf:
                yield buf, "the snapshot on stdin"
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise SnapshotError(f"no snapshot at {path}: the file does not exist") from err
    except OSError as err:
        raise SnapshotError(f"cannot read the snapshot {path}: {err.strerror}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SnapshotError(f"{path} is not a regular file; give the path of a snapshot")
        if info.st_mode & 0o077:
            logger.warning(
                "django-shmsession: the snapshot %s is readable by other users (mode %o); "
                "it holds session keys: chmod 600 it",
                path,
                stat.S_IMODE(info.st_mode),
            )
        with _mapped(fd) as buf:
            yield buf, path
    finally:
        os.close(fd)


@contextlib.contextmanager
def _mapped(fd: int) -> Iterator[Any]:
    size = os.fstat(fd).st_size
    if size == 0:
        yield b""
        return
    mapping = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ)
    try:
        mapping.madvise(mmap.MADV_SEQUENTIAL)
        yield mapping
    finally:
        mapping.close()


# -- the state sidecar ----------------------------------------------------------------------------


def state_path(path: str) -> str:
    """Where the last dump and restore of the snapshot ``path`` are recorded."""
    return os.path.abspath(path) + STATE_SUFFIX


def read_state(path: str) -> dict[str, Any]:
    """The recorded ``{"last_dump": {...}, "last_restore": {...}}`` of ``path`` ({} if none)."""
    try:
        with open(state_path(path), "rb") as handle:
            state = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        logger.warning("django-shmsession: cannot read %s: %s", state_path(path), err)
        return {}
    return state if isinstance(state, dict) else {}


def record_state(path: str, event: str, facts: dict[str, Any]) -> None:
    """Store ``facts`` under ``event`` in the sidecar, atomically; failures are only logged
    (the dump or restore itself succeeded, and must be reported as such)."""
    target = state_path(path)
    try:
        state = read_state(path)
        state[event] = facts
        data = json.dumps(state, indent=1, sort_keys=True).encode()
        directory = os.path.dirname(target)
        fd, temp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(target) + TEMP_MARK)
        try:
            with os.fdopen(fd, "wb") as handle:  # mkstemp made it 0600
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    except OSError as err:
        logger.warning("django-shmsession: cannot record the %s in %s: %s", event, target, err)
