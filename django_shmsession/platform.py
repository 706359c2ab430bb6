"""What django-shmsession needs from the platform, in one place: posix_ipc, /dev/shm paths, and
open-file-description byte locks.

* ``posix_ipc`` is imported here and nowhere else. Importing it from this module
  (``from .platform import posix_ipc``) raises :class:`UnsupportedPlatform` with a message that
  says what to install when it is missing, or when the platform has no timed semaphore waits
  (macOS): without them a holder that dies would block every waiter forever. The system checks
  call :func:`unsupported_reason` instead, so ``manage.py check`` can report the problem without
  importing the table.
* Linux (glibc) shows a segment ``/<name>`` as ``/dev/shm/<name>`` and a semaphore ``/<name>`` as
  ``/dev/shm/sem.<name>``; the segment and the checks both rely on these paths.
* ``fcntl.lockf`` locks belong to the process and vanish when it closes *any* descriptor of the
  file; open-file-description locks (``F_OFD_*``, Linux 3.15+) belong to one open file, exclude
  each other between descriptions of one process (so threads too), and are dropped by the kernel
  when the last descriptor of that description goes, death included.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import os
import pwd
import stat
import struct
from typing import Any

from .exceptions import UnsupportedPlatform

__all__ = [
    "NAME_MAX",
    "SEMAPHORE_SUFFIX",
    "SHM_DIR",
    "foreign_file_message",
    "lock_byte",
    "posix_ipc",  # noqa: F822 - served by the module __getattr__ below
    "reopen",
    "segment_path",
    "semaphore_file",
    "semaphore_name",
    "semaphore_path",
    "shm_free_bytes",
    "unlock_byte",
    "unsupported_reason",
    "validate_name",
]

SHM_DIR = "/dev/shm"
#: Longest table name: the semaphore lives at /dev/shm/sem.<name>.lock and NAME_MAX is 255.
NAME_MAX = 240
SEMAPHORE_SUFFIX = ".lock"


def _load_posix_ipc() -> tuple[Any, str | None]:
    """(the posix_ipc module, None), or (None, why it cannot be imported)."""
    try:
        return importlib.import_module("posix_ipc"), None
    except ImportError as err:
        return None, str(err)


def unsupported_reason() -> tuple[str, str] | None:
    """None when the table can run here; else (check id, message) for ``manage.py check``."""
    module, error = _load_posix_ipc()
    if module is None:
        return "E001", (
            f"posix_ipc cannot be imported ({error}); install it: `pip install posix-ipc` "
            "(it needs a C compiler on Linux)"
        )
    if not getattr(module, "SEMAPHORE_TIMEOUT_SUPPORTED", False):
        return "E002", (
            "this platform has no timed semaphore waits (macOS lacks sem_timedwait), so a "
            "worker killed while holding the session lock could block every other worker "
            "forever; run on Linux, or use another SESSION_ENGINE"
        )
    return None


def __getattr__(name: str) -> Any:
    """``posix_ipc`` on demand (``from .platform import posix_ipc``), so a platform without it
    fails with a message saying what to do, while the system checks can still import this
    module to report the problem."""
    if name != "posix_ipc":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    reason = unsupported_reason()
    if reason is not None:
        raise UnsupportedPlatform(f"django-shmsession cannot run here: {reason[1]}")
    return _load_posix_ipc()[0]


# -- names and paths -------------------------------------------------------------------------------


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
    """The POSIX name of the table's lock semaphore."""
    return name + SEMAPHORE_SUFFIX


def segment_path(name: str) -> str:
    """Where Linux shows the segment ``name``."""
    return f"{SHM_DIR}/{name[1:]}"


def semaphore_file(posix_name: str) -> str:
    """Where glibc keeps the semaphore called ``posix_name`` (a small file every opener maps)."""
    return f"{SHM_DIR}/sem.{posix_name[1:]}"


def semaphore_path(name: str) -> str:
    """Where glibc keeps the lock semaphore of the table ``name``."""
    return semaphore_file(semaphore_name(name))


def shm_free_bytes() -> int:
    """Free bytes in /dev/shm (0 if it does not exist)."""
    try:
        info = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return info.f_bavail * info.f_frsize


def _user(uid: int) -> str:
    """``uid 1001 (alice)``, or ``uid 1001`` when it has no passwd entry."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def foreign_file_message(path: str) -> str:
    """Why ``path`` (a segment or semaphore file) is not ours to use, and who can remove it.

    Names the file, what it is (a symbolic link planted under the table's name, or a file of
    another user or with a mode others can read), its owner, and who can remove it: in a sticky
    /dev/shm (mode 1777, the default) only the file's owner, the directory's owner or root can,
    so "remove the file" is no advice for the site's user.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"{path} was removed meanwhile; try again"
    owner = _user(info.st_uid)
    if stat.S_ISLNK(info.st_mode):
        what = f"{path} is a symbolic link to {os.readlink(path)!r} owned by {owner}"
    else:
        what = f"{path} is owned by {owner} with mode {stat.S_IMODE(info.st_mode):o}"
    me = os.geteuid()
    wanted = f"a session table must be a regular file of {_user(me)} with mode 600"
    return f"{what}; {wanted}. {_who_can_remove(path, info, me)}"


def _who_can_remove(path: str, info: os.stat_result, me: int) -> str:
    folder = os.stat(os.path.dirname(path))
    sticky = bool(folder.st_mode & stat.S_ISVTX)
    if me == 0 or info.st_uid == me or folder.st_uid == me or not sticky:
        return (
            f"If it is stale, remove it (`rm {path}`; this process's user can), run every "
            "process of the site as one user, or set SHMSESSION['NAME'] to another name"
        )
    return (
        f"{os.path.dirname(path)} is sticky, so only {_user(info.st_uid)} or root can remove "
        f"it (`sudo rm {path}`); or set SHMSESSION['NAME'] to another name, or run the site "
        f"as {_user(info.st_uid)}"
    )


# -- open-file-description locks -------------------------------------------------------------------

#: ``struct flock`` on Linux (l_type, l_whence, l_start, l_len, l_pid, padding): 32 bytes on
#: x86_64 and arm64 (checked against the C struct). l_pid must be 0 for OFD locks.
_FLOCK = struct.Struct("hhqqi4x")


def _flock(lock_type: int, offset: int) -> bytes:
    return _FLOCK.pack(lock_type, os.SEEK_SET, offset, 1, 0)


def reopen(fd: int) -> int:
    """A new open file description of the file behind ``fd`` (also when it was unlinked).

    OFD locks are per description: a lock meant to exclude other threads of this process too
    must be taken on a description of its own, not on a shared ``fd``.
    """
    return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)


def lock_byte(fd: int, offset: int, *, wait: bool) -> bool:
    """Take an exclusive OFD lock on byte ``offset`` of ``fd``'s description.

    With ``wait`` blocks until granted (retrying on EINTR) and returns True; without, returns
    False at once when another description holds it.
    """
    command = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    request = _flock(fcntl.F_WRLCK, offset)
    while True:
        try:
            fcntl.fcntl(fd, command, request)
        except InterruptedError:  # pragma: no cover - PEP 475 retries, but be explicit
            continue
        except OSError as err:
            if not wait and err.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True


def unlock_byte(fd: int, offset: int) -> None:
    """Release this description's OFD lock on byte ``offset``."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, offset))
