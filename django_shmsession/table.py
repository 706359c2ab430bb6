"""A bounded, crash-safe key -> bytes table in POSIX shared memory. It knows nothing of Django.

Every process that opens the same name sees the same entries. Writes follow one rule that makes
a SIGKILL at any instruction harmless: new bytes go to unreachable places first and are
published by a single one-byte store (an entry's ``state`` for inserts and deletes, its
``active`` descriptor for updates). The control word ``dirty`` is set around each write; whoever
takes the lock from a dead holder (or finds ``dirty`` set) rebuilds every derived structure from
the committed entries (:mod:`django_shmsession.integrity`). So a crash loses at most the write
in flight, and only the key being written.

The lock is held only for table work: keys are hashed and values checksummed before it is taken.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ParamSpec, TypeVar

from . import integrity, segment
from .exceptions import CorruptTable, ShmSessionError, TableFull, ValueTooLarge
from .layout import (
    COUNTERS,
    CTL_CHUNK_HWM,
    CTL_CHUNKS_USED,
    CTL_CORRUPTION,
    CTL_DELETES,
    CTL_DIRTY,
    CTL_ENTRIES,
    CTL_ENTRY_HWM,
    CTL_EVICTIONS,
    CTL_EXPIRED,
    CTL_FREE_CHUNK,
    CTL_FREE_ENTRY,
    CTL_GENERATION,
    CTL_HITS,
    CTL_MISSES,
    CTL_OVERSIZE,
    CTL_OWNER_EPOCH,
    CTL_OWNER_PID,
    CTL_SETS,
    CTL_TABLE_FULL,
    CTL_VALUE_BYTES,
    DEFAULT_CHUNK_SIZE,
    DIRTY_WRITING,
    ENTRY_FREE,
    ENTRY_USED,
    F_ACTIVE,
    F_DESCRIPTOR_FIELDS,
    F_DESCRIPTORS,
    F_HASH,
    F_KEY,
    F_KEY_LEN,
    F_NEXT,
    F_STATE,
    KEY_MAX,
    NIL,
    U32,
)
from .lock import IDENTITY, TableLock
from .memory import TableMemory, pad_key

__all__ = ["FAULT_POINTS", "CheckReport", "SessionTable", "TableStats", "set_fault_hook"]

#: Named points inside writes where tests may inject a crash (see :func:`set_fault_hook`).
FAULT_POINTS = (
    "lock:acquired",
    "insert:chunks_written",
    "insert:entry_written",
    "insert:committed",
    "insert:linked",
    "update:chunks_written",
    "update:descriptor_written",
    "update:committed",
    "update:old_freed",
    "delete:committed",
    "delete:unlinked",
    "delete:chunks_freed",
    "lock:releasing",
)

_P = ParamSpec("_P")
_T = TypeVar("_T")

_fault_hook: Callable[[str], None] | None = None


def set_fault_hook(hook: Callable[[str], None] | None) -> None:
    """Install ``hook(point)`` to be called at each of :data:`FAULT_POINTS` (tests only)."""
    global _fault_hook
    _fault_hook = hook


FULL_POLICIES = ("evict", "raise")
#: Entries sampled per eviction (Redis's volatile-ttl samples 5 by default).
EVICTION_SAMPLE = 8
EVICTION_PROBES = 64
_SET, _ADD, _REPLACE = 0, 1, 2
#: Seconds clear_expired() sleeps between batches so waiting requests get the lock.
SWEEP_PAUSE = 0.00005


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
    generation: int

    @property
    def occupancy(self) -> float:
        """Fraction of the scarcer resource (entries or chunks) in use."""
        return max(self.entries / self.entry_capacity, self.chunks_used / self.chunk_capacity)

    def as_dict(self) -> dict[str, int | float | str]:
        data: dict[str, int | float | str] = dict(asdict(self))
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
        max_value_size: int = 65536,
        full_policy: str = "evict",
        lock_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if full_policy not in FULL_POLICIES:
            raise ValueError(f"full_policy must be 'evict' or 'raise', not {full_policy!r}")
        if not lock_timeout > 0:
            raise ValueError(
                f"lock_timeout must be a positive number of seconds, not {lock_timeout!r}"
            )
        if size is not None and (not isinstance(size, int) or size <= 0):
            raise ValueError(f"size must be a positive number of bytes, not {size!r}")
        self._segment = segment.open_segment(name, size, chunk_size)
        geometry = self._segment.geometry
        if not 0 < max_value_size <= geometry.data_capacity // 2:
            self._segment.close()
            raise ValueError(
                f"max_value_size {max_value_size} must be between 1 and half the table's data "
                f"space ({geometry.data_capacity // 2} bytes); create a larger table or lower it"
            )
        self._memory = TableMemory(self._segment)
        self._control = self._memory.control
        self._lock = TableLock(
            self._segment.semaphore, self._control, self._segment.fd, lock_timeout
        )
        self._max_value_size = max_value_size
        self._evict = full_policy == "evict"
        self._clock = clock
        self._closed = False

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

    def set(self, key: str, value: bytes, expires_at: float) -> None:
        """Insert or overwrite ``key``."""
        self._store(key, value, expires_at, _SET)

    def add(self, key: str, value: bytes, expires_at: float) -> bool:
        """Insert ``key`` only if no live entry has it; False otherwise (``must_create``)."""
        return self._store(key, value, expires_at, _ADD)

    def replace(self, key: str, value: bytes, expires_at: float) -> bool:
        """Overwrite ``key`` only if a live entry has it; False otherwise.

        An update never resurrects an entry deleted or expired meanwhile.
        """
        return self._store(key, value, expires_at, _REPLACE)

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

    def check(self, repair: bool = False) -> CheckReport:
        """Verify every structure; with ``repair=True`` rebuild what is damaged.

        Damaged entries are dropped; every intact entry survives a repair.
        """
        return self._locked(self._check, repair)

    def recover_dead_holder(self) -> bool:
        """If a dead process holds the lock, adopt it, repair and release; True if it did.

        For gunicorn's ``child_exit`` hook: recovers at once instead of after a lock timeout.
        """
        self._require_open()
        if not self._lock.adopt_if_dead():
            return False
        try:
            if self._control[CTL_DIRTY]:
                self._repair()
        finally:
            self._lock.release()
        return True

    def close(self) -> None:
        """Unmap the segment. The segment and its sessions stay for other processes."""
        if self._closed:
            return
        self._closed = True
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

    def _locked(self, operation: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``operation`` under the lock; repair first if a dead writer left work half-done.

        A CorruptTable from the operation triggers one repair and one retry.
        """
        if self._closed:
            raise ShmSessionError("this SessionTable is closed; open a new one")
        control = self._control
        lock = self._lock
        semaphore = lock.semaphore
        mine = lock.mine
        pid = IDENTITY.pid
        try:
            # Inside the try: on Python 3.10 a signal handler can raise right after the call
            # returns. The finally below releases only what this thread recorded as its own.
            lock.acquire()
            if _fault_hook is not None:
                _fault_hook("lock:acquired")
            if control[CTL_DIRTY]:  # the previous holder died (adopted) or failed mid-write
                self._repair()
            try:
                return operation(*args, **kwargs)
            except CorruptTable:
                control[CTL_CORRUPTION] += 1
                self._repair()
                return operation(*args, **kwargs)
        finally:
            # No call before the post where a signal handler could raise (TableLock.release()
            # is inlined below), so the lock is never left taken by a live process.
            if control[CTL_OWNER_PID] == pid and control[CTL_OWNER_EPOCH] == mine.epoch:
                try:
                    if control[CTL_DIRTY]:  # an exception interrupted a write in this process
                        self._repair()
                    if _fault_hook is not None:
                        _fault_hook("lock:releasing")
                finally:
                    control[CTL_OWNER_PID] = 0
                    semaphore.release()

    def _repair(self) -> integrity.RepairResult:
        return integrity.rebuild(self._memory)

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

    def _store(self, key: str, value: bytes, expires_at: float, mode: int) -> bool:
        encoded = self._encode_key(key)
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
        return self._locked(self._write, encoded, key_hash, value, expires_at, crc, mode)

    def _count(self, counter: int) -> None:
        self._control[counter] += 1

    # -- operations (lock held) -----------------------------------------------------------------

    def _find(self, key: bytes, key_hash: int) -> tuple[int, tuple[Any, ...]]:
        """(index, fields) of the entry holding ``key``, or (NIL, ())."""
        key_len = len(key)
        padded = pad_key(key)
        memory = self._memory
        mask = memory.mask
        bucket = key_hash & mask
        index = memory.buckets[bucket]
        hwm = memory.entry_hwm()
        entry = memory.entry
        for _ in range(hwm + 1):
            if index == NIL:
                return NIL, ()
            if index >= hwm:
                raise CorruptTable(f"bucket {bucket} links to entry {index} beyond {hwm}")
            fields = entry(index)
            if (
                fields[F_HASH] == key_hash
                and fields[F_KEY] == padded
                and fields[F_KEY_LEN] == key_len
                and fields[F_STATE] == ENTRY_USED
            ):
                return index, fields
            if fields[F_HASH] & mask != bucket and fields[F_STATE] == ENTRY_USED:
                raise CorruptTable(f"entry {index} is chained in the wrong bucket")
            index = fields[F_NEXT]
        raise CorruptTable(f"bucket {bucket} has a cycle")

    @staticmethod
    def _descriptor_of(index: int, fields: tuple[Any, ...]) -> tuple[float, int, int, int]:
        """The live (expires_at, value_len, first_chunk, crc) of an unpacked entry."""
        active = fields[F_ACTIVE]
        if active > 1:
            raise CorruptTable(f"entry {index} has an invalid active descriptor {active}")
        start = F_DESCRIPTORS + active * F_DESCRIPTOR_FIELDS
        return fields[start : start + F_DESCRIPTOR_FIELDS]

    def _live_descriptor(self, index: int) -> tuple[float, int, int, int]:
        memory = self._memory
        return memory.descriptor(index, memory.active(index))

    def _copy_out(self, key: bytes, key_hash: int) -> tuple[bytes, float, int] | None:
        """(value, expires_at, crc) of a live entry, copied out unverified; None on a miss."""
        control = self._control
        index, fields = self._find(key, key_hash)
        if index == NIL:
            control[CTL_MISSES] += 1
            return None
        expires_at, length, first, crc = self._descriptor_of(index, fields)
        if expires_at <= self._clock():
            self._delete_index(index)
            control[CTL_EXPIRED] += 1
            control[CTL_MISSES] += 1
            return None
        control[CTL_HITS] += 1
        return self._memory.read_value(index, first, length), expires_at, crc

    def _get(self, key: bytes, key_hash: int) -> bytes | None:
        """A get that verifies the checksum under the lock (CorruptTable -> repair and retry)."""
        found = self._copy_out(key, key_hash)
        if found is None:
            return None
        value, expires_at, crc = found
        if self._memory.checksum(key_hash, expires_at, value) != crc:
            self._control[CTL_HITS] -= 1
            raise CorruptTable("an entry failed its checksum")
        return value

    def _exists(self, key: bytes, key_hash: int) -> bool:
        index, fields = self._find(key, key_hash)
        if index == NIL:
            return False
        if self._descriptor_of(index, fields)[0] <= self._clock():
            self._delete_index(index)
            self._control[CTL_EXPIRED] += 1
            return False
        return True

    def _delete(self, key: bytes, key_hash: int) -> bool:
        index, fields = self._find(key, key_hash)
        if index == NIL:
            return False
        live = self._descriptor_of(index, fields)[0] > self._clock()
        self._delete_index(index)
        self._control[CTL_DELETES if live else CTL_EXPIRED] += 1
        return live

    def _write(
        self, key: bytes, key_hash: int, value: bytes, expires_at: float, crc: int, mode: int
    ) -> bool:
        index, fields = self._find(key, key_hash)
        if index != NIL:
            live = self._descriptor_of(index, fields)[0] > self._clock()
            if mode == _ADD and live:
                return False
            if mode == _REPLACE and not live:
                self._delete_index(index)
                self._control[CTL_EXPIRED] += 1
                return False
            self._update(index, key, value, expires_at, crc)
        elif mode == _REPLACE:
            return False
        else:
            self._insert(key, key_hash, value, expires_at, crc)
        self._control[CTL_SETS] += 1
        return True

    def _insert(self, key: bytes, key_hash: int, value: bytes, expires_at: float, crc: int) -> None:
        memory = self._memory
        control = self._control
        chunks = memory.geometry.chunks_for(len(value))
        self._make_room(True, chunks, NIL)
        control[CTL_DIRTY] = DIRTY_WRITING
        index = self._alloc_entry()
        first = self._alloc_chunks(chunks, index)
        memory.write_value(first, value)
        if _fault_hook is not None:
            _fault_hook("insert:chunks_written")
        bucket = key_hash & memory.mask
        memory.write_head(index, key, key_hash, memory.buckets[bucket])
        memory.write_descriptor(index, 0, expires_at, len(value), first, crc)
        if _fault_hook is not None:
            _fault_hook("insert:entry_written")
        memory.set_state(index, ENTRY_USED)  # commit
        if _fault_hook is not None:
            _fault_hook("insert:committed")
        memory.buckets[bucket] = index
        if _fault_hook is not None:
            _fault_hook("insert:linked")
        control[CTL_ENTRIES] += 1
        control[CTL_VALUE_BYTES] += len(value)
        control[CTL_DIRTY] = 0

    def _update(self, index: int, key: bytes, value: bytes, expires_at: float, crc: int) -> None:
        memory = self._memory
        control = self._control
        chunks = memory.geometry.chunks_for(len(value))
        self._make_room(False, chunks, index)
        active = memory.active(index)
        _old_expiry, old_length, old_first, _old_crc = memory.descriptor(index, active)
        control[CTL_DIRTY] = DIRTY_WRITING
        first = self._alloc_chunks(chunks, index)
        memory.write_value(first, value)
        if _fault_hook is not None:
            _fault_hook("update:chunks_written")
        memory.write_descriptor(index, 1 - active, expires_at, len(value), first, crc)
        if _fault_hook is not None:
            _fault_hook("update:descriptor_written")
        memory.set_active(index, 1 - active)  # commit
        if _fault_hook is not None:
            _fault_hook("update:committed")
        self._free_chunks(index, old_first, old_length)
        if _fault_hook is not None:
            _fault_hook("update:old_freed")
        control[CTL_VALUE_BYTES] += len(value) - old_length
        control[CTL_DIRTY] = 0

    def _delete_index(self, index: int) -> None:
        memory = self._memory
        control = self._control
        _state, active, _key_len, next_index, key_hash = memory.head(index)
        _expiry, length, first, _crc = memory.descriptor(index, active)
        control[CTL_DIRTY] = DIRTY_WRITING
        memory.set_state(index, ENTRY_FREE)  # commit
        if _fault_hook is not None:
            _fault_hook("delete:committed")
        self._unlink(index, key_hash, next_index)
        if _fault_hook is not None:
            _fault_hook("delete:unlinked")
        self._free_chunks(index, first, length)
        if _fault_hook is not None:
            _fault_hook("delete:chunks_freed")
        memory.set_next(index, memory.free_entry_head())
        control[CTL_FREE_ENTRY] = index
        control[CTL_ENTRIES] -= 1
        control[CTL_VALUE_BYTES] -= length
        control[CTL_DIRTY] = 0

    def _unlink(self, index: int, key_hash: int, next_index: int) -> None:
        memory = self._memory
        bucket = key_hash & memory.mask
        current = memory.buckets[bucket]
        previous = NIL
        for _ in range(memory.entry_hwm() + 1):
            if current == index:
                if previous == NIL:
                    memory.buckets[bucket] = next_index
                else:
                    memory.set_next(previous, next_index)
                return
            if current == NIL:
                break
            memory.check_entry_index(current)
            previous = current
            current = memory.head(current)[3]
        raise CorruptTable(f"entry {index} is missing from its bucket chain")

    # -- allocation -----------------------------------------------------------------------------

    def _has_room(self, need_entry: bool, chunks: int) -> bool:
        control = self._control
        geometry = self._memory.geometry
        if (
            need_entry
            and control[CTL_FREE_ENTRY] == NIL
            and self._memory.entry_hwm() >= geometry.entry_capacity
        ):
            return False
        used = control[CTL_CHUNKS_USED]
        if used > geometry.chunk_capacity or control[CTL_ENTRIES] > geometry.entry_capacity:
            raise CorruptTable("the entry or chunk count exceeds the capacity")
        return geometry.chunk_capacity - used >= chunks

    def _make_room(self, need_entry: bool, chunks: int, protect: int) -> None:
        """Reclaim expired entries, then (policy "evict") evict the soonest-expiring ones."""
        while not self._has_room(need_entry, chunks):
            victim, expired = self._pick_victim(protect)
            if victim == NIL or not (expired or self._evict):
                self._control[CTL_TABLE_FULL] += 1
                raise TableFull(
                    f"the session table {self.name!r} is full "
                    f"({self._control[CTL_ENTRIES]} entries, "
                    f"{self._control[CTL_CHUNKS_USED]} of {self._memory.geometry.chunk_capacity} "
                    "chunks used); create a larger table or use the 'evict' full policy"
                )
            self._delete_index(victim)
            self._control[CTL_EXPIRED if expired else CTL_EVICTIONS] += 1

    def _pick_victim(self, protect: int) -> tuple[int, bool]:
        """Sample entries like Redis's volatile-ttl; (index of soonest expiry, already expired)."""
        memory = self._memory
        hwm = memory.entry_hwm()
        best, best_expiry, sampled = NIL, float("inf"), 0
        if hwm == 0:
            return NIL, False
        for _ in range(EVICTION_PROBES):
            index = random.randrange(hwm)
            if index == protect or memory.state(index) != ENTRY_USED:
                continue
            expiry = self._live_descriptor(index)[0]
            if expiry < best_expiry:
                best, best_expiry = index, expiry
            sampled += 1
            if sampled >= EVICTION_SAMPLE:
                break
        if best == NIL:  # sparse table: scan from a random start for any entry
            start = random.randrange(hwm)
            for offset in range(hwm):
                index = (start + offset) % hwm
                if index != protect and memory.state(index) == ENTRY_USED:
                    best, best_expiry = index, self._live_descriptor(index)[0]
                    break
        return best, best != NIL and best_expiry <= self._clock()

    def _alloc_entry(self) -> int:
        memory = self._memory
        control = self._control
        head = memory.free_entry_head()
        if head != NIL:
            state, _active, _key_len, next_index, _hash = memory.head(head)
            if state != ENTRY_FREE:
                raise CorruptTable(f"free-entry stack holds entry {head}, which is in use")
            control[CTL_FREE_ENTRY] = next_index
            return head
        hwm = memory.entry_hwm()
        if hwm >= memory.geometry.entry_capacity:
            raise CorruptTable("no free entry although the free count said there was one")
        # A slot above the mark may hold a committed entry from before clear(): free it before
        # it enters the range that repair examines, or a crash here would bring it back.
        memory.set_state(hwm, ENTRY_FREE)
        control[CTL_ENTRY_HWM] = hwm + 1
        return hwm

    def _alloc_chunks(self, count: int, index: int) -> int:
        """Pop ``count`` chunks, chain them and mark them owned by ``index``; first chunk or NIL."""
        if count == 0:
            return NIL
        memory = self._memory
        control = self._control
        links, owners = memory.links, memory.owners
        capacity = memory.geometry.chunk_capacity
        head, hwm = memory.free_chunk_head(), memory.chunk_hwm()
        first = previous = NIL
        for _ in range(count):
            if head != NIL:
                chunk = head
                if chunk >= hwm or owners[chunk] != 0:
                    raise CorruptTable(f"free-chunk stack holds chunk {chunk}, which is in use")
                head = links[chunk]
            elif hwm < capacity:
                chunk = hwm
                hwm += 1
            else:
                raise CorruptTable("no free chunk although the free count said there was one")
            owners[chunk] = index + 1
            if previous == NIL:
                first = chunk
            else:
                links[previous] = chunk
            previous = chunk
        links[previous] = NIL
        control[CTL_FREE_CHUNK] = head
        control[CTL_CHUNK_HWM] = hwm
        control[CTL_CHUNKS_USED] += count
        return first

    def _free_chunks(self, index: int, first: int, length: int) -> None:
        memory = self._memory
        control = self._control
        owners = memory.owners
        chain = list(memory.chain(index, first, length))  # checked before anything is freed
        if not chain:
            return
        for chunk in chain:
            owners[chunk] = 0
        memory.links[chain[-1]] = memory.free_chunk_head()
        control[CTL_FREE_CHUNK] = first
        control[CTL_CHUNKS_USED] -= len(chain)

    # -- maintenance ----------------------------------------------------------------------------

    def _clear(self) -> int:
        memory = self._memory
        control = self._control
        removed = control[CTL_ENTRIES]
        control[CTL_DIRTY] = DIRTY_WRITING
        geometry = memory.geometry
        memory.buckets[:] = memoryview(b"\xff" * (geometry.bucket_count * U32)).cast("I")
        for word, value in (
            (CTL_FREE_ENTRY, NIL),
            (CTL_FREE_CHUNK, NIL),
            (CTL_ENTRY_HWM, 0),
            (CTL_CHUNK_HWM, 0),
            (CTL_ENTRIES, 0),
            (CTL_CHUNKS_USED, 0),
            (CTL_VALUE_BYTES, 0),
        ):
            control[word] = value
        control[CTL_DELETES] += removed
        control[CTL_GENERATION] += 1
        control[CTL_DIRTY] = 0
        return int(removed)

    def _sweep(self, start: int, batch_size: int) -> tuple[int, int, bool]:
        memory = self._memory
        now = self._clock()
        hwm = memory.entry_hwm()
        end = min(start + batch_size, hwm)
        removed = 0
        for index in range(start, end):
            if memory.state(index) == ENTRY_USED and self._live_descriptor(index)[0] <= now:
                self._delete_index(index)
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
            **counters,
        )

    def _check(self, repair: bool) -> CheckReport:
        problems = integrity.verify(self._memory)
        entries = self._control[CTL_ENTRIES]
        if not problems or not repair:
            return CheckReport(ok=not problems, entries=entries, problems=problems)
        result = self._repair()
        return CheckReport(
            ok=False, entries=result.kept, problems=problems, repaired=True, dropped=result.dropped
        )
