"""What ``manage.py shmsession list|sessions|logout|stats --format prometheus`` report.

Kept apart from the command so each piece is a plain function with a plain result: the tables
of this user in /dev/shm (found by opening each candidate the way a worker would: the table
layer alone knows what one of ours looks like), the live sessions of a table (from the table's
batched ``scan``, decoded with the engine's serializer to find the user id, never printing
values), one user's sessions deleted, and the stats in Prometheus' text format.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from django_shmsession import conf, store
from django_shmsession.exceptions import NotATable, ShmSessionError
from django_shmsession.platform import SHM_DIR, segment_path
from django_shmsession.table import SessionTable

__all__ = [
    "SHM_DIR",
    "SessionInfo",
    "TableInfo",
    "list_tables",
    "logout",
    "prometheus",
    "sessions",
    "shm_mappings",
]

#: Characters of a session key shown by ``sessions``: enough to tell sessions apart in a support
#: request, far too few to use as a cookie (keys are 32 characters).
KEY_PREFIX = 8


def _utc(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="seconds")


# -- list -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableInfo:
    """One table found in /dev/shm (``state`` is "ok" or why it cannot be opened)."""

    name: str
    size: int
    created: float | None  # None where the kernel gives no birth time
    state: str = "ok"
    entries: int | None = None
    mapped_by: list[tuple[int, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["created_utc"] = None if self.created is None else _utc(self.created)
        data["mapped_by"] = [{"pid": pid, "command": cmd} for pid, cmd in self.mapped_by]
        return data

    def describe(self) -> str:
        entries = "?" if self.entries is None else str(self.entries)
        pids = ", ".join(f"{pid} ({cmd})" for pid, cmd in self.mapped_by) or "no process"
        created = "?" if self.created is None else _utc(self.created)
        return (
            f"{self.name}  {self.size} bytes  {entries} entries  created {created}  "
            f"mapped by {pids}  {self.state}"
        )


def list_tables(config: conf.ShmSessionConfig) -> list[TableInfo]:
    """Every django-shmsession table of this user in /dev/shm, sorted by name.

    A candidate is a regular file of this user whose name could be a table's; it is one of ours
    when the table layer opens it (or refuses it for a reason only one of ours can have: another
    layout version, a broken pair, a corrupt header). Opening never creates or changes anything.
    """
    found = []
    mappings = shm_mappings()  # read /proc once for every table
    for entry in sorted(os.scandir(SHM_DIR), key=lambda e: e.name):
        name = f"/{entry.name}"
        if entry.name.startswith("sem.") or not conf.NAME_RE.match(name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not entry.is_file(follow_symlinks=False) or info.st_uid != os.geteuid():
            continue
        mapped = mappings.get((info.st_dev, info.st_ino), [])
        table = _describe(dataclasses.replace(config, name=name), info, mapped)
        if table is not None:
            found.append(table)
    return found


def _describe(
    config: conf.ShmSessionConfig, info: os.stat_result, mapped: list[tuple[int, str]]
) -> TableInfo | None:
    """The table's description, or None when the file is not a django-shmsession table."""
    created = birth_time(segment_path(config.name))
    base = TableInfo(config.name, info.st_size, created, mapped_by=mapped)
    try:
        table = store.open_table(config, create=False, adopt=True)
    except NotATable:
        return None
    except (ShmSessionError, ValueError) as err:
        return dataclasses.replace(base, state=f"{type(err).__name__}: {err}")
    with table:
        return dataclasses.replace(base, entries=table.stats().entries)


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [
        ("tv_sec", ctypes.c_int64),
        ("tv_nsec", ctypes.c_uint32),
        ("_reserved", ctypes.c_int32),
    ]


class _Statx(ctypes.Structure):
    """``struct statx`` (linux/stat.h) up to the four timestamps, then room for the rest."""

    _fields_ = [
        ("stx_mask", ctypes.c_uint32),
        ("stx_blksize", ctypes.c_uint32),
        ("stx_attributes", ctypes.c_uint64),
        ("stx_nlink", ctypes.c_uint32),
        ("stx_uid", ctypes.c_uint32),
        ("stx_gid", ctypes.c_uint32),
        ("stx_mode", ctypes.c_uint16),
        ("_spare0", ctypes.c_uint16),
        ("stx_ino", ctypes.c_uint64),
        ("stx_size", ctypes.c_uint64),
        ("stx_blocks", ctypes.c_uint64),
        ("stx_attributes_mask", ctypes.c_uint64),
        ("stx_atime", _StatxTimestamp),
        ("stx_btime", _StatxTimestamp),
        ("stx_ctime", _StatxTimestamp),
        ("stx_mtime", _StatxTimestamp),
        ("_rest", ctypes.c_uint64 * 20),
    ]


_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_BTIME = 0x800


def birth_time(path: str) -> float | None:
    """When ``path`` was created (statx's btime; tmpfs has it), or None where unavailable.

    Not ctime or mtime: writes through a table's mapping update both (measured on tmpfs), and
    Python's ``os.stat`` has no birth time on Linux before 3.15.
    """
    statx = getattr(ctypes.CDLL(None, use_errno=True), "statx", None)
    if statx is None:  # pragma: no cover - glibc < 2.28
        return None
    buf = _Statx()
    flags, mask = _AT_SYMLINK_NOFOLLOW, _STATX_BTIME
    if statx(_AT_FDCWD, os.fsencode(path), flags, mask, ctypes.byref(buf)) != 0:
        return None
    if not buf.stx_mask & _STATX_BTIME:  # pragma: no cover - a file system without btime
        return None
    return float(buf.stx_btime.tv_sec) + float(buf.stx_btime.tv_nsec) / 1e9


def shm_mappings() -> dict[tuple[int, int], list[tuple[int, str]]]:
    """(st_dev, st_ino) of each /dev/shm file mapped by a process this user may inspect (this
    one excepted) -> the (pid, command) of those processes, sorted; from /proc/<pid>/maps."""
    found: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for pid_dir in sorted(os.listdir("/proc")):
        if not pid_dir.isdigit() or int(pid_dir) == os.getpid():
            continue
        pid = int(pid_dir)
        files = _mapped_files(pid)
        command = _command(pid) if files else ""
        for file in files:
            found.setdefault(file, []).append((pid, command))
    return {file: sorted(pids) for file, pids in found.items()}


_MAPS_LINE = re.compile(r"^\S+ \S+ \S+ ([0-9a-f]+):([0-9a-f]+) (\d+)\s+/dev/shm/")


def _mapped_files(pid: int) -> set[tuple[int, int]]:
    try:
        with open(f"/proc/{pid}/maps") as maps:
            lines = maps.readlines()
    except OSError:  # gone meanwhile, or another user's process
        return set()
    found = set()
    for line in lines:
        match = _MAPS_LINE.match(line)
        if match:
            major, minor, inode = int(match[1], 16), int(match[2], 16), int(match[3])
            found.add((os.makedev(major, minor), inode))
    return found


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            words = file.read().split(b"\0")
    except OSError:
        return "?"
    return " ".join(w.decode(errors="replace") for w in words if w)[:80]


# -- sessions and logout ----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionInfo:
    """One live session, described without its values."""

    key: str
    size: int
    expires_at: float
    user_id: str | None

    @property
    def key_prefix(self) -> str:
        return self.key[:KEY_PREFIX]

    def as_dict(self) -> dict[str, Any]:
        return {
            "key_prefix": self.key_prefix,
            "size": self.size,
            "expires_at": self.expires_at,
            "expires_utc": _utc(self.expires_at),
            "user_id": self.user_id,
        }

    def describe(self) -> str:
        user = "-" if self.user_id is None else self.user_id
        return (
            f"{self.key_prefix}…  {self.size:>6} bytes  expires {_utc(self.expires_at)}  "
            f"user {user}"
        )


def sessions(table: SessionTable) -> Iterator[SessionInfo]:
    """Every live session of ``table``, batch by batch (each batch under the lock, released
    between batches, so requests keep flowing during a scan of a large table)."""
    from django_shmsession.backend import decode_session  # the engine's serializer

    cursor = 0
    while True:
        items, cursor = table.scan(cursor)
        now = time.time()
        for item in items:
            if item.expires_at <= now:
                continue
            data = decode_session(item.value)
            user = data.get("_auth_user_id") if data is not None else None
            yield SessionInfo(
                item.key, len(item.value), item.expires_at, None if user is None else str(user)
            )
        if cursor == 0:
            return


def logout(table: SessionTable, user_id: str) -> int:
    """Delete every session of ``user_id``; the number deleted.

    Keys are collected first, then deleted one by one (a session the user logged out of
    meanwhile is simply not counted).
    """
    keys = [s.key for s in sessions(table) if s.user_id == user_id]
    return sum(1 for key in keys if table.delete(key))


# -- Prometheus ---------------------------------------------------------------------------------

#: Stats fields that only grow (Prometheus counters, exposed with ``_total``); every other number
#: is a gauge. The text format: https://prometheus.io/docs/instrumenting/exposition_formats/
COUNTER_FIELDS = frozenset(
    {
        "hits",
        "misses",
        "sets",
        "deletes",
        "evictions",
        "expired",
        "lock_waits",
        "lock_recoveries",
        "lock_timeouts",
        "repairs",
        "rollbacks",
        "entries_dropped",
        "table_full_errors",
        "oversize_errors",
        "corruption_detected",
        "class_evictions",
    }
)
PREFIX = "django_shmsession_"


def prometheus(stats: Mapping[str, Any], class_names: Sequence[str] = ()) -> str:
    """The stats in Prometheus' text exposition format, labelled with the table's name.

    A per-class field (``class_entries``: one number per priority class) becomes one sample per
    class, labelled ``class="<name>"`` (from ``class_names``, else the class number).
    """
    table = f'table="{_escape(str(stats.get("name", "")))}"'
    lines = []
    for key, value in stats.items():
        if isinstance(value, (str, bool)):
            continue
        counter = key in COUNTER_FIELDS
        metric = f"{PREFIX}{key}_total" if counter else f"{PREFIX}{key}"
        lines.append(f"# HELP {metric} django-shmsession table stat {key!r}.")
        lines.append(f"# TYPE {metric} {'counter' if counter else 'gauge'}")
        if isinstance(value, (list, tuple)):
            for index, number in enumerate(value):
                name = class_names[index] if index < len(class_names) else str(index)
                lines.append(f'{metric}{{{table},class="{_escape(name)}"}} {number}')
        else:
            lines.append(f"{metric}{{{table}}} {value}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
