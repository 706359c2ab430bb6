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
