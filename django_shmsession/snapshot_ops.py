"""Dump the live sessions of a table to a snapshot, and restore a snapshot into a table.

Both hold the table lock only in short batches (one ``scan`` batch, or one ``batch()`` of adds),
so requests keep flowing; both measure the longest batch, which bounds how long any request
waited on them. Knows nothing of Django: the management command and the gunicorn hooks pass a
table and a path.

Consistency of a dump: each scan batch is read under the lock, so every session in the file is
either its state before the dump or a state written during it, never a torn value. A session
deleted and re-created while the scan runs can be met twice; the later record is flagged and the
restore keeps, of all records of one key, the one that expires last.

A restore inserts in descending order of expiry with ``add(..., evict=False)``: it never
overwrites a session already in the table (that one is newer than the snapshot) and never evicts
one to make room, so a table smaller than the snapshot ends up with the sessions that expire
last, and the count of those that did not fit is reported.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

from . import __version__, faults
from .exceptions import CorruptSnapshot, TableFull, ValueTooLarge
from .snapshot import (
    F_SUPERSEDES,
    Damage,
    RecordRef,
    SnapshotReader,
    SnapshotRecord,
    SnapshotWriter,
)
from .snapshot_files import AtomicFile, read_buffer, read_state, record_state
from .table import PRIORITY_CLASSES, SessionTable

logger = logging.getLogger("django_shmsession")

#: Entries per scan batch of a dump (one lock hold copies this many values out).
BATCH = 128
#: Adds per lock hold of a restore: an add costs several times a scanned entry, so fewer of them
#: keep a hold as short as a scan batch's.
RESTORE_BATCH = 64
#: After this many adds in a row failed for lack of room, the rest is counted as not fitting
#: without trying (each try reclaims expired entries first: a long hopeless tail is slow).
HOPELESS = 1024


@dataclass(frozen=True)
class DumpResult:
    """What one dump wrote and how long it held the lock at most."""

    path: str
    table: str
    sessions: int
    bytes: int
    started_at: float
    duration: float
    longest_hold: float
    batches: int
    duplicates: int
    #: The median batch: what a hold typically costs (the longest one includes preemptions).
    median_hold: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"Dumped {self.sessions} session(s) from {self.table!r} to {self.path} "
            f"({self.bytes} bytes) in {self.duration:.3f} s; longest lock hold "
            f"{1000 * self.longest_hold:.2f} ms over {self.batches} batch(es)"
        )


@dataclass
class RestoreResult:
    """What one restore did with each record of the snapshot."""

    path: str
    table: str
    snapshot_created_at: float | None = None
    records: int = 0
    restored: int = 0
    expired: int = 0
    kept_newer: int = 0
    superseded: int = 0
    did_not_fit: int = 0
    too_large: int = 0
    unreadable: int = 0
    bytes: int = 0
    started_at: float = 0.0
    duration: float = 0.0
    longest_hold: float = 0.0
    median_hold: float = 0.0
    damage: Damage = field(default_factory=Damage)

    @property
    def damaged(self) -> bool:
        return not self.damage.ok

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["damage"] = {
            "ok": self.damage.ok,
            "summary": self.damage.summary(self.records),
            "problems": list(self.damage.problems),
        }
        return data

    def summary(self) -> str:
        age = ""
        if self.snapshot_created_at is not None:
            age = f" (taken {max(self.started_at - self.snapshot_created_at, 0):.0f} s before)"
        return (
            f"Restored {self.restored} of {self.records} session(s) from {self.path}{age} into "
            f"{self.table!r} in {self.duration:.3f} s: {self.expired} expired, "
            f"{self.kept_newer} kept (newer in the table), {self.superseded} superseded, "
            f"{self.did_not_fit} did not fit, {self.too_large} too large; longest lock hold "
            f"{1000 * self.longest_hold:.2f} ms"
        )

    def raise_if_damaged(self) -> None:
        """:raises CorruptSnapshot: the snapshot was truncated or damaged (after the restore of
        everything that verified, which this result counts)."""
        if self.damaged:
            raise CorruptSnapshot(
                f"{self.path} is damaged: {self.damage.summary(self.records)}. The "
                f"{self.restored} session(s) that verified were restored; the rest are lost "
                "unless an older snapshot has them"
            )


# -- dump ------------------------------------------------------------------------------------------


def dump(
    table: SessionTable,
    path: str,
    *,
    batch_size: int = BATCH,
    clock: Callable[[], float] = time.time,
) -> DumpResult:
    """Write every live session of ``table`` to ``path`` (``-``: stdout), atomically for a file.

    :raises SnapshotError: the file cannot be created (missing or read-only directory).
    :raises OSError: writing failed (disk full); the previous snapshot is left as it was.
    """
    if path == "-":
        stream = sys.stdout.buffer
        result = dump_to_stream(table, stream, path, batch_size=batch_size, clock=clock)
        stream.flush()
        return result
    with AtomicFile(path) as target:
        result = dump_to_stream(table, target.stream, path, batch_size=batch_size, clock=clock)
        target.commit()
    record_state(path, "last_dump", _dump_facts(result))
    return result


def dump_to_stream(
    table: SessionTable,
    stream: BinaryIO,
    path: str,
    *,
    batch_size: int = BATCH,
    clock: Callable[[], float] = time.time,
) -> DumpResult:
    """Scan ``table`` batch by batch and write the snapshot to ``stream``."""
    started_at = clock()
    start = time.perf_counter()
    writer = SnapshotWriter(stream, _meta(table, started_at))
    seen: set[int] = set()  # hash(key) of every record written: duplicates are rare
    holds: list[float] = []
    duplicates = 0
    cursor = 0
    while True:
        before = time.perf_counter()
        items, cursor = table.scan(cursor, batch_size)
        holds.append(time.perf_counter() - before)
        records = []
        for item in items:
            key = item.key
            marker = hash(key)
            flags = 0
            if marker in seen:  # maybe a re-created session; the reader settles it
                flags = F_SUPERSEDES
                duplicates += 1
            seen.add(marker)
            records.append((key, item.value, item.expires_at, item.priority, flags))
        writer.write_block(records)
        if faults.hook is not None:
            faults.hook("dump:after-block")
        if cursor == 0:
            break
    duration = time.perf_counter() - start
    size = writer.finish(duration, clock())
    return DumpResult(
        path=path,
        table=table.name,
        sessions=writer.records,
        bytes=size,
        started_at=started_at,
        duration=duration,
        longest_hold=max(holds),
        batches=len(holds),
        duplicates=duplicates,
        median_hold=statistics.median(holds),
    )


def _meta(table: SessionTable, started_at: float) -> dict[str, Any]:
    return {
        "created_at": started_at,
        "table": table.name,
        "segment_size": table.size,
        "producer": f"django-shmsession {__version__}",
        "pid": os.getpid(),
    }


def _dump_facts(result: DumpResult) -> dict[str, Any]:
    return {
        "at": result.started_at,
        "table": result.table,
        "sessions": result.sessions,
        "bytes": result.bytes,
        "duration": round(result.duration, 6),
        "longest_hold": round(result.longest_hold, 6),
    }


# -- restore ---------------------------------------------------------------------------------------


def restore(
    table: SessionTable,
    path: str,
    *,
    batch_size: int = RESTORE_BATCH,
    clock: Callable[[], float] = time.time,
) -> RestoreResult:
    """Load the snapshot at ``path`` (``-``: stdin) into ``table``; see the module docstring.

    Returns the counts even for a damaged snapshot (what verified is restored); call
    :meth:`RestoreResult.raise_if_damaged` to turn damage into an error.

    :raises SnapshotError: the file is missing or unreadable.
    :raises ForeignSnapshot: it is not a snapshot, or of a newer format.
    :raises CorruptSnapshot: it is empty, or its header is damaged (nothing restored).
    """
    started_at = clock()
    start = time.perf_counter()
    with read_buffer(path) as (buf, source):
        reader = SnapshotReader(buf, source)
        result = RestoreResult(path=path, table=table.name, started_at=started_at)
        result.snapshot_created_at = reader.header.created_at
        result.bytes = reader.size
        _restore_from(reader, table, result, batch_size, clock)
    result.duration = time.perf_counter() - start
    if path != "-":
        record_state(path, "last_restore", _restore_facts(result))
    return result


def _restore_from(
    reader: SnapshotReader,
    table: SessionTable,
    result: RestoreResult,
    batch_size: int,
    clock: Callable[[], float],
) -> None:
    offsets = array("Q")
    expiries = array("d")
    flagged: list[int] = []
    for ref in reader.refs():
        if ref.flags & F_SUPERSEDES:
            flagged.append(len(offsets))
        offsets.append(ref.offset)
        expiries.append(ref.expires_at)
    result.records = len(offsets)
    result.damage = reader.damage
    result.unreadable = _unreadable(reader.damage, result.records)
    # Descending expiry: a table too small keeps the sessions that expire last; ties keep file
    # order (sorted is stable), so a duplicate's later copy stays after its earlier one.
    order = sorted(range(len(offsets)), key=expiries.__getitem__, reverse=True)
    now = clock()
    live = _count_live(order, expiries, now)
    result.expired = len(order) - live
    del order[live:]
    if flagged:
        order = _drop_superseded(reader, offsets, order, flagged, result)
    _insert(reader, table, offsets, order, result, batch_size)


def _unreadable(damage: Damage, verified: int) -> int:
    expected = damage.expected_records
    if expected is None:
        expected = damage.promised_records
    return max(expected - verified, damage.bad_records, 0)


def _count_live(order: list[int], expiries: array[float], now: float) -> int:
    """How many of ``order`` (sorted by descending expiry) are still live at ``now``."""
    low, high = 0, len(order)
    while low < high:
        mid = (low + high) // 2
        if expiries[order[mid]] > now:
            low = mid + 1
        else:
            high = mid
    return low


def _drop_superseded(
    reader: SnapshotReader,
    offsets: array[int],
    order: list[int],
    flagged: list[int],
    result: RestoreResult,
) -> list[int]:
    """Keep, of the records sharing a key with a flagged one, the first in ``order`` (the one
    that expires last); count the others as superseded."""

    def key(i: int) -> bytes:
        return reader.key_of(RecordRef(offsets[i], 0.0, 0))

    suspects = {key(i) for i in flagged}
    kept: list[int] = []
    winners: set[bytes] = set()
    for i in order:
        k = key(i)
        if k in suspects:
            if k in winners:
                result.superseded += 1
                continue
            winners.add(k)
        kept.append(i)
    return kept


def _insert(
    reader: SnapshotReader,
    table: SessionTable,
    offsets: array[int],
    order: list[int],
    result: RestoreResult,
    batch_size: int,
) -> None:
    holds: list[float] = []
    record_at = reader.record_at
    failed_in_a_row = 0
    for done in range(0, len(order), batch_size):
        if failed_in_a_row >= HOPELESS or _no_entry_left(table, failed_in_a_row):
            result.did_not_fit += len(order) - done
            break
        records = [record_at(offsets[i]) for i in order[done : done + batch_size]]
        before = time.perf_counter()
        failed_in_a_row = table.batch(_add_all, table, records, result, failed_in_a_row)
        holds.append(time.perf_counter() - before)
    if holds:
        result.longest_hold = max(holds)
        result.median_hold = statistics.median(holds)


def _add_all(
    table: SessionTable, records: list[SnapshotRecord | None], result: RestoreResult, failed: int
) -> int:
    """Add ``records`` (run under one lock hold by ``table.batch``); returns the count of adds in
    a row that failed for lack of room."""
    add = table.add
    top = PRIORITY_CLASSES - 1
    for record in records:
        if record is None:  # the file changed between the verification and now
            result.unreadable += 1
            continue
        key, value, expires_at, priority, _flags = record
        # A class this table does not have (a snapshot of a table with more): its highest.
        try:
            added = add(key, value, expires_at, min(priority, top), evict=False)
        except TableFull:
            result.did_not_fit += 1
            failed += 1
            continue
        except ValueTooLarge:
            result.too_large += 1
            continue
        except ValueError:  # a key this table refuses (the format allows longer keys)
            result.unreadable += 1
            continue
        failed = 0
        if added:
            result.restored += 1
        else:
            result.kept_newer += 1
    return failed


def _no_entry_left(table: SessionTable, failed_in_a_row: int) -> bool:
    """After a failed add: True if no entry slot is left (every further add would fail)."""
    if not failed_in_a_row:
        return False
    stats = table.stats()
    return bool(stats.entries >= stats.entry_capacity)


def _restore_facts(result: RestoreResult) -> dict[str, Any]:
    return {
        "at": result.started_at,
        "table": result.table,
        "sessions": result.restored,
        "records": result.records,
        "expired": result.expired,
        "kept_newer": result.kept_newer,
        "did_not_fit": result.did_not_fit,
        "unreadable": result.unreadable,
        "bytes": result.bytes,
        "duration": round(result.duration, 6),
        "longest_hold": round(result.longest_hold, 6),
        "damaged": result.damaged,
    }


def iter_records(path: str) -> Iterator[SnapshotRecord]:
    """Every verified record of the snapshot at ``path``, in file order (for tests and tools).

    :raises SnapshotError: as :func:`restore`.
    """
    with read_buffer(path) as (buf, source):
        reader = SnapshotReader(buf, source)
        for ref in reader.refs():
            record = reader.record(ref)
            if record is not None:
                yield record


#: The ``stats`` keys of the last dump and restore (from the snapshot's state sidecar).
STATS_KEYS = tuple(
    f"last_{event}_{what}"
    for event in ("dump", "restore")
    for what in ("at", "sessions", "bytes", "duration")
)


def last_runs(path: str | None) -> dict[str, Any]:
    """``snapshot_path`` and the :data:`STATS_KEYS` recorded for ``path`` (None: never ran)."""
    found: dict[str, Any] = {"snapshot_path": path or ""}
    state = read_state(path) if path else {}
    for key in STATS_KEYS:
        event, what = key[len("last_") :].split("_", 1)
        facts = state.get(f"last_{event}")
        found[key] = facts.get(what) if isinstance(facts, dict) else None
    return found
