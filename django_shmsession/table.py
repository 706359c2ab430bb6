"""A bounded, crash-safe key -> bytes table in POSIX shared memory. It knows nothing of Django.

Every process that opens the same name sees the same entries. This module is the public API;
the work is split by invariant: :mod:`.index` (bucket chains), :mod:`.alloc` (entries and
chunks), :mod:`.eviction` (making room), :mod:`.writes` (the four writes), :mod:`.intent` and
:mod:`.recovery` (the intent log that makes every write recoverable in O(1)), :mod:`.integrity`
(batched verification and the full rebuild), :mod:`.lock` (the critical section).

Each write records its intent before it stores anything shared and publishes its result with a
single one-byte store; a process killed at any instruction leaves one armed intent, which the
next lock holder rolls back or forward in well under a millisecond. So a crash loses at most
the write in flight, and only the key being written.

The lock is held only for table work: keys are hashed and values checksummed before it is taken.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ParamSpec, TypeVar

from . import eviction, faults, index, integrity, segment, writes
from .exceptions import (
    SettingsMismatch,
    ShmSessionError,
    TableFull,
    ValueTooLarge,
)
from .faults import set_fault_hook
from .intent import IntentLog
from .layout import (
    APP_WORDS,
    COUNTERS,
    CTL_APP_WORDS,
    CTL_CHUNKS_USED,
    CTL_CLASS_ENTRIES,
    CTL_CLASS_EVICTIONS,
    CTL_DELETES,
    CTL_ENTRIES,
    CTL_EVICTIONS,
    CTL_EXPIRED,
    CTL_EXPIRY_FLOOR,
    CTL_GENERATION,
    CTL_HINTS_STALE,
    CTL_HITS,
    CTL_MISSES,
    CTL_OVERSIZE,
    CTL_SETS,
    CTL_SETTING_FULL_POLICY,
    CTL_SETTING_MAX_VALUE,
    CTL_TABLE_FULL,
    CTL_VALUE_BYTES,
    DEFAULT_CHUNK_SIZE,
    ENTRY_USED,
    F_ACTIVE,
    F_HASH,
    F_KEY,
    F_KEY_LEN,
    FULL_POLICY_CODES,
    KEY_MAX,
    NIL,
    PRIORITY_CLASSES,
)
from .lock import TableLock
from .memory import CorruptEntry, TableMemory, Words
from .recovery import RECOVERY_FAULT_POINTS, TableRecovery

__all__ = [
    "FAULT_POINTS",
    "PRIORITY_CLASSES",
    "CheckReport",
    "ScanItem",
    "SessionTable",
    "TableStats",
    "set_fault_hook",
]

#: Every fault point of the table's writes and recovery (the lock's are ``lock.FAULT_POINTS``):
#: ``"<write>:<before|after>-<store>"``, ``"recover-<write>:after-<store>"`` for the stores
#: recovery replays, ``"recover:..."``/``"repair:..."`` for recovery's own steps.
FAULT_POINTS: tuple[str, ...] = (*writes.FAULT_POINTS, *RECOVERY_FAULT_POINTS)

_P = ParamSpec("_P")
_T = TypeVar("_T")

FULL_POLICIES = ("evict", "raise")
DEFAULT_MAX_VALUE_SIZE = 65536
_SET, _ADD, _REPLACE = 0, 1, 2
#: Seconds clear_expired() sleeps between batches so waiting requests get the lock.
SWEEP_PAUSE = 0.00005


@dataclass(frozen=True)
class ScanItem:
    """One live entry as :meth:`SessionTable.scan` copied it out (verified, unexpired)."""

    key: str
    value: bytes
    expires_at: float
    priority: int


@dataclass(frozen=True)
class TableStats:
    """A consistent snapshot of occupancy and counters (taken under the lock)."""

    name: str
    segment_size: int
    entry_capacity: int
    entries: int
    chunk_size: int
    chunk_capacity: int
    chunks_used: int
    value_bytes: int
    metadata_bytes: int
    overhead_bytes: int
    hits: int
    misses: int
    sets: int
    deletes: int
    evictions: int
    expired: int
    lock_waits: int
    lock_recoveries: int
    repairs: int
    table_full_errors: int
    oversize_errors: int
    corruption_detected: int
    rollbacks: int
    entries_dropped: int
    lock_timeouts: int
    generation: int
    #: Live entries and evictions per priority class (index = class; hints, see eviction.py).
    class_entries: tuple[int, ...] = ()
    class_evictions: tuple[int, ...] = ()

    @property
    def occupancy(self) -> float:
        """Fraction of the scarcer resource (entries or chunks) in use."""
        return max(self.entries / self.entry_capacity, self.chunks_used / self.chunk_capacity)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(asdict(self))
        data["class_entries"] = list(self.class_entries)
        data["class_evictions"] = list(self.class_evictions)
        data["occupancy"] = round(self.occupancy, 6)
        return data


@dataclass
class CheckReport:
    """What :meth:`SessionTable.check` found; ``ok`` is True when nothing was wrong."""

    ok: bool
    entries: int
    problems: list[str] = field(default_factory=list)
    repaired: bool = False
    dropped: int = 0
    #: False when writes during the batched scan kept the global counts from being compared
    #: (every entry, chain and chunk was still checked; see ``integrity.BatchCheck``).
    counts_checked: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SessionTable:
    """A key -> bytes table with absolute expiry times, shared through /dev/shm.

    ``size`` is used only to create the segment; ``size=None`` opens an existing one. See the
    package README for the full contract; each method documents its own.
    """

    def __init__(
        self,
        name: str,
        size: int | None = None,
        *,
        max_value_size: int | None = None,
        full_policy: str | None = None,
        lock_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        """Open (or, with ``size``, create) the table ``name``.

        ``max_value_size`` and ``full_policy`` must agree between all processes: the creator
        records them in the segment (defaults 65536 and "evict"); an opener that passes None
        takes the recorded values, one that passes others gets SettingsMismatch.

        :raises SettingsMismatch: a value differs from the one the creator recorded.
        :raises SegmentNotFound: ``size`` is None and the table does not exist.
        :raises LayoutMismatch: the segment was made by another layout version.
        :raises SegmentTooLarge: /dev/shm has no room for ``size`` bytes.
        """
        if full_policy is not None and full_policy not in FULL_POLICIES:
            raise ValueError(f"full_policy must be 'evict' or 'raise', not {full_policy!r}")
        if max_value_size is not None and (
            not isinstance(max_value_size, int) or max_value_size <= 0
        ):
            raise ValueError(f"max_value_size must be a positive int, not {max_value_size!r}")
        if not lock_timeout > 0:
            raise ValueError(
                f"lock_timeout must be a positive number of seconds, not {lock_timeout!r}"
            )
        if size is not None and (not isinstance(size, int) or size <= 0):
            raise ValueError(f"size must be a positive number of bytes, not {size!r}")
        recorded = (
            (CTL_SETTING_MAX_VALUE, max_value_size or DEFAULT_MAX_VALUE_SIZE),
            (CTL_SETTING_FULL_POLICY, FULL_POLICY_CODES[full_policy or "evict"]),
            (CTL_EXPIRY_FLOOR, eviction.NO_FLOOR),
        )
        self._segment = segment.open_segment(name, size, chunk_size, recorded)
        self._memory = TableMemory(self._segment)
        self._control = self._memory.control
        self._access = self._memory.access
        self._hints = eviction.Hints(self._memory)
        geometry = self._segment.geometry
        try:
            max_value_size, full_policy = self._agreed_settings(max_value_size, full_policy)
            if not 0 < max_value_size <= geometry.data_capacity // 2:
                raise ValueError(
                    f"max_value_size {max_value_size} must be between 1 and half the table's "
                    f"data space ({geometry.data_capacity // 2} bytes); create a larger table "
                    "or lower it"
                )
        except BaseException:
            self._hints.release()
            self._memory.release()
            self._segment.close()
            raise
        self._log = IntentLog(self._memory)
        #: Log records made under the lock, emitted by the lock after it is released.
        self._events: list[tuple[int, str, tuple[Any, ...]]] = []
        self._recovery = TableRecovery(self._memory, self._log, self._hints, self._events)
        self._lock = TableLock(
            self._segment, self._control, lock_timeout, self._recovery, self._events
        )
        #: Runs an operation under the lock (recovering first and after, see lock.py); bound
        #: once, a call less per operation. A closed handle's lock refuses to run.
        self._locked = self._lock.runner()
        self._max_value_size = max_value_size
        #: Chunks kept free for updates that do not grow (see :mod:`.eviction`).
        self._reserve = geometry.chunks_for(max_value_size)
        self._evict = full_policy == "evict"
        self._clock = clock
        self._closed = False
        #: What log messages tell the user to do about a full table, and what they call each
        #: priority class: the layer above sets both in its own terms (the table knows none).
        self.resize_hint = "create a larger table"
        self.class_names: tuple[str, ...] = tuple(f"class {n}" for n in range(PRIORITY_CLASSES))
        self._eviction_log = _EvictionLog()

    def _agreed_settings(
        self, max_value_size: int | None, full_policy: str | None
    ) -> tuple[int, str]:
        """The settings this handle uses: those asked for, checked against the ones the
        creator recorded, else the recorded ones.

        A recorded value that no creator could have written (a damaged word) counts as not
        recorded, and this handle records its own.
        """
        control = self._control
        policies = {code: policy for policy, code in FULL_POLICY_CODES.items()}
        stored = int(control[CTL_SETTING_MAX_VALUE])
        valid = 0 < stored <= self._segment.geometry.data_capacity // 2
        recorded_size = stored if valid else None
        recorded_policy = policies.get(int(control[CTL_SETTING_FULL_POLICY]))
        if max_value_size is not None and recorded_size not in (None, max_value_size):
            raise SettingsMismatch(
                self._segment.name, "max_value_size", recorded_size, max_value_size
            )
        if full_policy is not None and recorded_policy not in (None, full_policy):
            raise SettingsMismatch(self._segment.name, "full_policy", recorded_policy, full_policy)
        size = max_value_size or recorded_size or DEFAULT_MAX_VALUE_SIZE
        policy = full_policy or recorded_policy or "evict"
        if recorded_size is None:
            control[CTL_SETTING_MAX_VALUE] = size
        if recorded_policy is None:
            control[CTL_SETTING_FULL_POLICY] = FULL_POLICY_CODES[policy]
        return size, policy

    # -- public API -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._segment.name

    @property
    def size(self) -> int:
        return self._segment.geometry.segment_size

    @property
    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the mapped segment file: tells whether ``name`` still names it."""
        info = os.fstat(self._segment.fd)
        return info.st_dev, info.st_ino

    @property
    def created(self) -> bool:
        """True when this handle created (and initialized) the segment."""
        return self._segment.created

    @property
    def pair(self) -> segment.PairIdentity:
        """The (segment, semaphore) identities this handle maps, as verified when it opened."""
        return self._segment.pair

    @property
    def max_value_size(self) -> int:
        return self._max_value_size

    def get(self, key: str) -> bytes | None:
        """The value of a live entry, or None when it is missing or expired."""
        encoded = self._encode_key(key)
        key_hash = self._memory.key_hash(encoded)
        found = self._locked(self._copy_out, encoded, key_hash)
        if found is None:
            return None
        value, expires_at, crc = found
        if self._memory.checksum(key_hash, expires_at, value) == crc:  # verified outside the lock
            return value
        return self._locked(self._get, encoded, key_hash)  # verify under the lock: repairs

    def exists(self, key: str) -> bool:
        encoded = self._encode_key(key)
        return self._locked(self._exists, encoded, self._memory.key_hash(encoded))

    def set(self, key: str, value: bytes, expires_at: float, priority: int = 0) -> None:
        """Insert or overwrite ``key``.

        ``priority`` is the entry's eviction class (0 to ``PRIORITY_CLASSES - 1``): when room is
        needed, expired entries go first, then the lowest class present, least recently used
        first (see :mod:`.eviction`).

        :raises ValueTooLarge: the value exceeds ``max_value_size``.
        :raises TableFull: no room, and the policy is "raise".
        """
        self._store(key, value, expires_at, _SET, priority, True)

    def add(
        self, key: str, value: bytes, expires_at: float, priority: int = 0, *, evict: bool = True
    ) -> bool:
        """Insert ``key`` only if no live entry has it; False otherwise (``must_create``).

        With ``evict=False`` no live entry is evicted to make room, whatever the policy (for
        restoring a snapshot into a table that may be too small): expired ones are reclaimed,
        then TableFull is raised.

        :raises ValueTooLarge: the value exceeds ``max_value_size``.
        :raises TableFull: no room, and the policy is "raise" or ``evict`` is False.
        """
        return self._store(key, value, expires_at, _ADD, priority, evict)

    def replace(self, key: str, value: bytes, expires_at: float, priority: int = 0) -> bool:
        """Overwrite ``key`` only if a live entry has it; False otherwise.

        An update never resurrects an entry deleted or expired meanwhile.

        :raises ValueTooLarge: the value exceeds ``max_value_size``.
        :raises TableFull: a growing update found no room, and the policy is "raise".
        """
        return self._store(key, value, expires_at, _REPLACE, priority, True)

    def replace_if(
        self, key: str, expected: bytes, value: bytes, expires_at: float, priority: int = 0
    ) -> bool:
        """Overwrite ``key`` only if its live entry holds exactly ``expected``; False otherwise.

        A compare-and-set, decided under the lock: a layer that read a value, worked out its
        successor and must not overwrite what another process stored in between (a cache
        refreshing its copy) writes with this instead of ``set``.

        :raises ValueTooLarge: the value exceeds ``max_value_size``.
        :raises TableFull: a growing update found no room, and the policy is "raise".
        """
        if not isinstance(expected, bytes):
            raise TypeError(f"expected must be bytes, not {type(expected).__name__}")
        return self._store(key, value, expires_at, _REPLACE, priority, True, expected)

    def scan(self, cursor: int = 0, batch_size: int = 256) -> tuple[list[ScanItem], int]:
        """One batch of live entries from ``cursor`` on, and the cursor of the next batch.

        Each batch is read under the lock (values verified, expired entries skipped), and the
        lock is released between batches: an entry written meanwhile appears in its old or its
        new state, never torn, and one deleted and re-added may appear twice (keep the
        later-expiring copy). The returned cursor is 0 when the scan is complete.

        :raises ValueError: ``batch_size`` is not positive or ``cursor`` is negative.
        """
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if not isinstance(cursor, int) or cursor < 0:
            raise ValueError(f"cursor must be a non-negative int from scan(), not {cursor!r}")
        return self._locked(self._scan, cursor, batch_size)

    def batch(self, operation: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Call ``operation`` holding the lock once for every table call it makes.

        For bulk work (restoring a snapshot): each call inside runs without taking the lock
        again. Keep batches short: every other process waits meanwhile.

        :raises LockTimeout: as any table call.
        """
        result: _T = self._locked(_call, operation, args, kwargs)
        return result

    def inline(self, operation: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Call ``operation`` (a method of this table) only if that needs no waiting.

        For an event loop: when the lock is not free at once, or an interrupted write must be
        recovered first, WouldBlock is raised where the lock would be taken, so the caller can
        run the same call in a thread. For the methods that take the lock once (set, add,
        replace, delete, exists, stats, scan, and get unless a checksum fails outside the lock)
        nothing was done; the others (clear_expired, check) may have completed earlier steps,
        each of which is whole, so calling them again is still right.

        :raises WouldBlock: the call would have waited.
        """
        return self._lock.without_waiting(operation, *args, **kwargs)

    def read_app_word(self, index: int) -> int:
        """Word ``index`` of the words reserved for the layers above (one aligned load)."""
        if index.__class__ is not int or not 0 <= index < APP_WORDS:  # on every L1 hit: inline
            self._app_word_index(index)  # raises
        return self._control[CTL_APP_WORDS + index]

    def write_app_word(self, index: int, value: int) -> None:
        """Store ``value`` (an unsigned 64-bit int) into app word ``index`` (one store)."""
        if not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise ValueError(f"app words hold unsigned 64-bit ints, not {value!r}")
        self._control[CTL_APP_WORDS + self._app_word_index(index)] = value

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if a live entry was removed."""
        encoded = self._encode_key(key)
        return self._locked(self._delete, encoded, self._memory.key_hash(encoded))

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        return self._locked(self._clear)

    def clear_expired(self, batch_size: int = 256) -> int:
        """Remove expired entries in batches, releasing the lock between batches.

        Returns how many were removed.
        """
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        removed = 0
        start = 0
        while True:
            count, start, done = self._locked(self._sweep, start, batch_size)
            removed += count
            if done:
                return removed
            # Without a pause the sweeper retakes the lock before a woken waiter runs: a reader
            # waited up to 391 ms during a 1M-entry sweep; with 50 µs, about 1 ms.
            time.sleep(SWEEP_PAUSE)

    def stats(self) -> TableStats:
        return self._locked(self._stats)

    def check(self, repair: bool = False, batch_size: int = 256) -> CheckReport:
        """Verify every structure; with ``repair=True`` rebuild what is damaged.

        The scan runs in batches of ``batch_size`` entries, each under the lock, releasing it
        between batches like :meth:`clear_expired`, so a large table never stalls requests for
        long. Only a repair (a full rebuild, needed only when damage was found) holds the lock
        for the whole table. Damaged entries are dropped; every intact entry survives a repair.
        """
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        checker = self._locked(integrity.BatchCheck, self._memory, batch_size)
        while not self._locked(checker.step, self._memory):
            time.sleep(SWEEP_PAUSE)
        problems = checker.problems[: integrity.MAX_REPORTED]
        entries = int(self._locked(self._control.__getitem__, CTL_ENTRIES))
        report = CheckReport(
            ok=not problems,
            entries=entries,
            problems=problems,
            counts_checked=checker.counts_checked,
        )
        if problems and repair:
            result = self._locked(self._recovery.rebuild)
            report.entries, report.repaired, report.dropped = result.kept, True, result.dropped
        return report

    def recover_dead_holder(self) -> bool:
        """If a dead process holds the lock, adopt it, recover and release; True if it did.

        For gunicorn's ``child_exit`` hook: recovers at once instead of after a lock timeout.
        """
        self._require_open()
        return self._lock.recover_dead_holder()

    def close(self) -> None:
        """Unmap the segment. The segment and its sessions stay for other processes."""
        if self._closed:
            return
        self._closed = True
        self._lock.close()
        self._log.release()
        self._hints.release()
        self._memory.release()
        self._segment.close()

    def unlink(self) -> bool:
        """Remove the segment and its semaphore from /dev/shm (this handle stays usable)."""
        return segment.unlink(self.name)

    @staticmethod
    def unlink_name(name: str) -> bool:
        """Remove the segment and semaphore called ``name``; True if either existed."""
        return segment.unlink(name)

    def __enter__(self) -> SessionTable:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SessionTable {self.name!r} {self.size} bytes>"

    # -- locking --------------------------------------------------------------------------------

    @staticmethod
    def _app_word_index(index: int) -> int:
        if not isinstance(index, int) or not 0 <= index < APP_WORDS:
            raise ValueError(f"app word index must be in range({APP_WORDS}), not {index!r}")
        return index

    def _require_open(self) -> None:
        if self._closed:
            raise ShmSessionError("this SessionTable is closed; open a new one")

    # -- argument checks (outside the lock) -----------------------------------------------------

    @staticmethod
    def _encode_key(key: str) -> bytes:
        if not isinstance(key, str):
            raise TypeError(f"keys must be str, not {type(key).__name__}")
        encoded = key.encode()
        if not 0 < len(encoded) <= KEY_MAX:
            raise ValueError(f"keys must be 1 to {KEY_MAX} bytes of UTF-8, got {key[:80]!r}")
        return encoded

    def _store(
        self,
        key: str,
        value: bytes,
        expires_at: float,
        mode: int,
        priority: int,
        evict: bool,
        expected: bytes | None = None,
    ) -> bool:
        encoded = self._encode_key(key)
        if priority.__class__ is not int or not 0 <= priority < PRIORITY_CLASSES:
            raise ValueError(
                f"priority must be an int from 0 to {PRIORITY_CLASSES - 1}, not {priority!r}"
            )
        if not isinstance(value, bytes):
            raise TypeError(f"values must be bytes, not {type(value).__name__}")
        if len(value) > self._max_value_size:
            self._locked(self._count, CTL_OVERSIZE)
            raise ValueTooLarge(len(value), self._max_value_size)
        expires_at = float(expires_at)
        if not math.isfinite(expires_at):
            raise ValueError(f"expires_at must be a finite timestamp, not {expires_at!r}")
        memory = self._memory
        key_hash = memory.key_hash(encoded)
        crc = memory.checksum(key_hash, expires_at, value)
        if expected is not None:
            return self._locked(
                self._write_if, encoded, key_hash, expected, value, expires_at, crc, priority
            )
        return self._locked(
            self._write, encoded, key_hash, value, expires_at, crc, mode, priority, evict
        )

    def _count(self, counter: int) -> None:
        self._control[counter] += 1

    # -- operations (lock held) -----------------------------------------------------------------

    def _live_descriptor(self, index: int) -> tuple[float, int, int, int]:
        memory = self._memory
        return memory.descriptor(index, memory.active(index))

    def _live_expiry(self, index: int) -> float:
        return self._live_descriptor(index)[0]

    def _copy_out(self, key: bytes, key_hash: int) -> tuple[bytes, float, int] | None:
        """(value, expires_at, crc) of a live entry, copied out unverified; None on a miss."""
        control = self._control
        found, fields = index.find(self._memory, key, key_hash)
        if found == NIL:
            control[CTL_MISSES] += 1
            return None
        expires_at, length, first, crc = index.descriptor_of(found, fields)
        now = self._clock()
        if expires_at <= now:
            self._delete_index(found, fields)
            control[CTL_EXPIRED] += 1
            control[CTL_MISSES] += 1
            return None
        control[CTL_HITS] += 1
        second = int(now) & 0xFFFFFFFF
        if self._access[found] != second:  # coarse: at most one store per entry per second
            self._access[found] = second
        return self._memory.read_value(found, first, length), expires_at, crc

    def _get(self, key: bytes, key_hash: int) -> bytes | None:
        """A get that verifies the checksum under the lock (a mismatch drops the entry)."""
        found = self._copy_out(key, key_hash)
        if found is None:
            return None
        value, expires_at, crc = found
        if self._memory.checksum(key_hash, expires_at, value) != crc:
            self._control[CTL_HITS] -= 1
            where, _fields = index.find(self._memory, key, key_hash)
            raise CorruptEntry(f"entry {where} failed its checksum", where)
        return value

    def _exists(self, key: bytes, key_hash: int) -> bool:
        found, fields = index.find(self._memory, key, key_hash)
        if found == NIL:
            return False
        if index.descriptor_of(found, fields)[0] <= self._clock():
            self._delete_index(found, fields)
            self._control[CTL_EXPIRED] += 1
            return False
        return True

    def _delete(self, key: bytes, key_hash: int) -> bool:
        found, fields = index.find(self._memory, key, key_hash)
        if found == NIL:
            return False
        live = index.descriptor_of(found, fields)[0] > self._clock()
        self._delete_index(found, fields)
        self._control[CTL_DELETES if live else CTL_EXPIRED] += 1
        return live

    def _write(
        self,
        key: bytes,
        key_hash: int,
        value: bytes,
        expires_at: float,
        crc: int,
        mode: int,
        priority: int,
        evict: bool,
    ) -> bool:
        """Decide (insert, update or nothing), make room, then write."""
        memory = self._memory
        found, fields = index.find(memory, key, key_hash)
        size = memory.chunk_size
        chunks = -(-len(value) // size)  # Geometry.chunks_for, inline (the hot path)
        old_chunks: int | None = None  # an insert
        now = self._clock()
        if found != NIL:
            old = index.descriptor_of(found, fields)  # (expires_at, length, first, crc)
            if mode == _ADD and old[0] > now:
                return False
            if mode == _REPLACE and old[0] <= now:
                self._delete_index(found, fields)
                self._control[CTL_EXPIRED] += 1
                return False
            old_chunks = -(-old[1] // size)
        elif mode == _REPLACE:
            return False
        words = memory.words()
        if not eviction.has_room(memory, words, found == NIL, chunks, old_chunks, self._reserve):
            words = self._make_room(found == NIL, chunks, old_chunks, found, evict)
        control = self._control
        if found == NIL:
            found = writes.insert(
                memory,
                self._log,
                faults.hook,
                key,
                key_hash,
                words,
                value,
                expires_at,
                crc,
                priority,
                self._hints,
            )
        else:
            writes.update(
                memory,
                self._log,
                faults.hook,
                found,
                fields[F_ACTIVE],
                old,
                words,
                value,
                expires_at,
                crc,
                priority,
                self._hints,
                index.priority_of(fields),
            )
        self._access[found] = int(now) & 0xFFFFFFFF
        control[CTL_SETS] += 1
        return True

    def _write_if(
        self,
        key: bytes,
        key_hash: int,
        expected: bytes,
        value: bytes,
        expires_at: float,
        crc: int,
        priority: int,
    ) -> bool:
        """``replace_if`` under the lock: compare the live value, verified (a damaged entry
        raises CorruptEntry: the lock's runner drops it and retries, which then finds no
        match), then write."""
        if self._get(key, key_hash) != expected:
            return False
        return self._write(key, key_hash, value, expires_at, crc, _REPLACE, priority, True)

    def _delete_index(self, found: int, fields: tuple[Any, ...] | None = None) -> None:
        """Delete entry ``found``; ``fields`` is the entry as a lookup just unpacked it."""
        writes.delete(self._memory, self._log, faults.hook, found, self._hints, fields)

    def _make_room(
        self, need_entry: bool, chunks: int, old: int | None, protect: int, evict: bool
    ) -> Words:
        """Reclaim expired entries, then (policy "evict", and ``evict``) evict live ones.

        ``old`` is the chunk count of the value an update replaces (None for an insert): an
        update that does not grow needs only the reserve, so it never evicts or fails. Returns
        the checked words (:meth:`TableMemory.words`) the write then plans from. Called only
        when :func:`eviction.has_room` said no, so the common case costs no call here.
        """
        memory = self._memory
        control = self._control
        may_evict = self._evict and evict
        if control[CTL_HINTS_STALE]:  # a write was interrupted: its hints may be missing
            self._hints.recount()
        words = memory.words()
        while not eviction.has_room(memory, words, need_entry, chunks, old, self._reserve):
            if control[CTL_EXPIRY_FLOOR] <= self._clock() and self._reclaim(protect, False):
                words = memory.words()
                continue
            victim, _expired, priority = eviction.pick_victim(memory, protect)
            if victim == NIL or not may_evict:
                if self._reclaim(protect, True):  # every range, before TableFull
                    words = memory.words()
                    continue
                raise self._full(evict)
            self._delete_index(victim)
            control[CTL_EVICTIONS] += 1
            control[CTL_CLASS_EVICTIONS + priority] += 1
            self._eviction_log.evicted(priority, self._events, self)
            words = memory.words()
        return words

    def _reclaim(self, protect: int, every_range: bool) -> int:
        """Remove expired entries (see :meth:`eviction.Hints.reclaim`); how many went."""
        removed = self._hints.reclaim(
            self._clock(), self._live_expiry, self._delete_index, protect, every_range
        )
        self._control[CTL_EXPIRED] += removed
        return removed

    def _full(self, evict: bool) -> TableFull:
        control = self._control
        memory = self._memory
        control[CTL_TABLE_FULL] += 1
        message = (
            f"the session table {self.name!r} is full ({control[CTL_ENTRIES]} entries, "
            f"{control[CTL_CHUNKS_USED]} of {memory.geometry.chunk_capacity} chunks used, none "
            f"expired); {self.resize_hint}"
        )
        if evict:  # not a caller that asked for no eviction (a restore counts what did not fit)
            message += " or use the 'evict' full policy" if not self._evict else ""
            self._events.append((logging.ERROR, "django-shmsession: %s", (message,)))
        return TableFull(message)

    # -- maintenance ----------------------------------------------------------------------------

    def _clear(self) -> int:
        return writes.clear(self._memory, self._log, faults.hook)

    def _scan(self, cursor: int, batch_size: int) -> tuple[list[ScanItem], int]:
        memory = self._memory
        now = self._clock()
        hwm = memory.entry_hwm()
        items: list[ScanItem] = []
        position = cursor
        while position < hwm and len(items) < batch_size:
            if memory.state(position) == ENTRY_USED:
                item = self._scan_item(position, now)
                if item is not None:
                    items.append(item)
            position += 1
        return items, (position if position < hwm else 0)

    def _scan_item(self, position: int, now: float) -> ScanItem | None:
        """Entry ``position`` copied out and verified (None when it expired)."""
        memory = self._memory
        fields = memory.entry(position)
        expires_at, length, first, crc = index.descriptor_of(position, fields)
        if expires_at <= now:
            return None
        key_hash = fields[F_HASH]
        value = memory.read_value(position, first, length)
        if memory.checksum(key_hash, expires_at, value) != crc:
            raise CorruptEntry(f"entry {position} failed its checksum", position)
        try:
            key = fields[F_KEY][: fields[F_KEY_LEN]].decode()
        except UnicodeDecodeError:
            raise CorruptEntry(f"entry {position} has a key that is not UTF-8", position) from None
        priority = memory.priority(position, fields[F_ACTIVE])
        return ScanItem(key, value, expires_at, priority)

    def _sweep(self, start: int, batch_size: int) -> tuple[int, int, bool]:
        memory = self._memory
        now = self._clock()
        hwm = memory.entry_hwm()
        end = min(start + batch_size, hwm)
        removed = 0
        for candidate in range(start, end):
            if memory.state(candidate) == ENTRY_USED and self._live_expiry(candidate) <= now:
                self._delete_index(candidate)
                removed += 1
        self._control[CTL_EXPIRED] += removed
        return removed, end, end >= hwm

    def _stats(self) -> TableStats:
        control = self._control
        geometry = self._memory.geometry
        counters = {name: control[word] for name, word in COUNTERS.items()}
        chunks_used = control[CTL_CHUNKS_USED]
        value_bytes = control[CTL_VALUE_BYTES]
        return TableStats(
            name=self.name,
            segment_size=geometry.segment_size,
            entry_capacity=geometry.entry_capacity,
            entries=control[CTL_ENTRIES],
            chunk_size=geometry.chunk_size,
            chunk_capacity=geometry.chunk_capacity,
            chunks_used=chunks_used,
            value_bytes=value_bytes,
            metadata_bytes=geometry.metadata_bytes,
            overhead_bytes=chunks_used * geometry.chunk_size - value_bytes,
            generation=control[CTL_GENERATION],
            class_entries=tuple(
                int(control[CTL_CLASS_ENTRIES + n]) for n in range(PRIORITY_CLASSES)
            ),
            class_evictions=tuple(
                int(control[CTL_CLASS_EVICTIONS + n]) for n in range(PRIORITY_CLASSES)
            ),
            **counters,
        )


def _call(operation: Callable[..., _T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> _T:
    return operation(*args, **kwargs)


class _EvictionLog:
    """Rate-limited log lines about evictions: at most one per ``INTERVAL`` seconds per process,
    with the count since the last line, WARNING when entries above class 0 were evicted."""

    INTERVAL = 60.0

    def __init__(self) -> None:
        self.counts = [0] * PRIORITY_CLASSES
        self.last = -float("inf")

    def evicted(
        self, priority: int, events: list[tuple[int, str, tuple[Any, ...]]], table: SessionTable
    ) -> None:
        """Count one eviction (lock held); queue a log line if the interval has passed."""
        self.counts[priority] += 1
        now = time.monotonic()
        if now - self.last < self.INTERVAL:
            return
        total = sum(self.counts)
        valued = total - self.counts[0]
        detail = ", ".join(
            f"{count} {table.class_names[n]}" for n, count in enumerate(self.counts) if count
        )
        since = "since the last report" if self.last > -float("inf") else "(first this process)"
        level = logging.WARNING if valued else logging.INFO
        events.append(
            (
                level,
                "django-shmsession: the session table %s is full: evicted %d sessions %s (%s); %s",
                (table.name, total, since, detail, table.resize_hint),
            )
        )
        self.counts = [0] * PRIORITY_CLASSES
        self.last = now
