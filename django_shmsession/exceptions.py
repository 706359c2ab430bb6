"""Exception classes raised by django-shmsession.

Every error the table or the engine raises derives from :class:`ShmSessionError`, so callers can
catch one base class. Messages say what went wrong *and* what the user should do about it.
"""

from __future__ import annotations


class ShmSessionError(Exception):
    """Base class of every error raised by django-shmsession."""


class ValueTooLarge(ShmSessionError, ValueError):
    """A value is larger than the table's per-entry maximum."""

    def __init__(self, size: int, max_size: int, hint: str = "") -> None:
        self.size = size
        self.max_size = max_size
        message = f"value of {size} bytes exceeds the per-entry maximum of {max_size} bytes"
        if hint:
            message = f"{message}; {hint}"
        super().__init__(message)


class TableFull(ShmSessionError):
    """No room is left and the full-table policy is "raise"."""


class CorruptTable(ShmSessionError):
    """Bytes in the shared-memory segment failed a consistency check."""


class LayoutMismatch(ShmSessionError):
    """An existing segment has another magic, layout version or size than this code expects."""


class NotATable(LayoutMismatch):
    """A file under the table's name is not a django-shmsession table at all (unknown magic)."""


class SegmentTooLarge(ShmSessionError):
    """The segment cannot be allocated: /dev/shm has not enough free space."""


class SegmentNotFound(ShmSessionError):
    """The segment does not exist and the caller asked not to create it."""


class ForeignSegment(ShmSessionError, PermissionError):
    """The segment or semaphore belongs to another user or is readable by others."""


class LockTimeout(ShmSessionError, TimeoutError):
    """The table lock stayed held by a live process for longer than the lock timeout."""


class UnsupportedPlatform(ShmSessionError):
    """posix_ipc is missing or the platform lacks timed semaphore waits."""


class SettingsMismatch(ShmSessionError, ValueError):
    """A setting every process must share differs from the value the segment's creator recorded.

    ``setting`` names it (``"max_value_size"`` or ``"full_policy"``); ``recorded`` is the
    creator's value and ``requested`` this process's.
    """

    def __init__(self, name: str, setting: str, recorded: object, requested: object) -> None:
        self.setting = setting
        self.recorded = recorded
        self.requested = requested
        super().__init__(
            f"the session table {name!r} was created with {setting}={recorded!r}, but this "
            f"process asks for {setting}={requested!r}; every process must use the same value: "
            "change the setting to match, or stop all servers, unlink the table and start again"
        )


class WouldBlock(ShmSessionError):
    """A call made through ``SessionTable.inline`` would have had to wait (for the lock, or for
    a recovery to run); nothing was done, so the same call may be retried in a thread."""


class SnapshotError(ShmSessionError):
    """A session snapshot cannot be written or read (see docs/snapshot.md)."""


class ForeignSnapshot(SnapshotError):
    """The file is not a django-shmsession snapshot, or one in a format this version cannot read."""


class CorruptSnapshot(SnapshotError):
    """A snapshot is truncated or damaged; what verified may have been restored (see message)."""
