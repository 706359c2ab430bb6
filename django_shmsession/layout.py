"""The binary layout of the shared-memory segment: the one place where offsets are declared.

Every other module reads and writes the segment through the constants and :class:`Geometry`
methods defined here; nothing else computes an offset by hand. ``docs/layout.md`` describes the
same layout in prose and must be kept in step with this module.

Segment (all integers little-endian; the package refuses to run on big-endian hosts)::

    +---------------------------+ 0
    | header page (4096 bytes)  |  magic, geometry, secret, header checksum,
    |                           |  control words (lock owner, free lists, counts, stats)
    +---------------------------+ Geometry.buckets_offset
    | buckets: u32[bucket_count]|  head entry index of each hash chain, NIL when empty
    +---------------------------+ Geometry.entries_offset
    | entries: ENTRY_SIZE each  |  key, hash, chain link, state, two value descriptors
    +---------------------------+ Geometry.access_offset
    | access: u32[entries]      |  coarse last read or write of each entry (seconds), for LRU
    +---------------------------+ Geometry.chunk_links_offset
    | chunk links: u32[chunks]  |  next chunk of a value chain, or of the free-chunk stack
    +---------------------------+ Geometry.chunk_owners_offset
    | chunk owners: u32[chunks] |  entry index + 1 that owns the chunk, 0 when free
    +---------------------------+ Geometry.chunks_offset
    | chunk data: chunk_size ea.|  value bytes
    +---------------------------+ Geometry.segment_size

Header page:

* ``0``: ``MAGIC`` (8 bytes). ``INIT_MAGIC`` while a process initializes the segment; the real
  magic is written last, so a segment with ``MAGIC`` is always fully initialized.
* ``GEOMETRY_OFFSET``: :data:`GEOMETRY` -- layout version, header size, segment size, bucket
  count, entry capacity, chunk size, chunk capacity, hash secret (16 bytes).
* ``HEADER_CRC_OFFSET``: CRC-32 of the geometry bytes, so a damaged geometry or secret is
  detected instead of silently re-hashing every key.
* ``CONTROL_OFFSET``: ``CONTROL_WORDS`` u64 words indexed by the ``CTL_*`` constants. They are
  accessed through a ``memoryview`` cast to ``"Q"`` (one machine store per word).

Entry (``ENTRY_SIZE`` = 128 bytes)::

    0   state      u8   ENTRY_FREE or ENTRY_USED (the commit byte of inserts and deletes)
    1   active     u8   which descriptor (0 or 1) holds the live value (the commit byte of
                        updates: a new value is written to the other descriptor, then flipped)
    2   key_len    u8   length of the UTF-8 key, <= KEY_MAX
    3   (pad)
    4   next       u32  next entry in the same hash chain (or in the free-entry stack)
    8   key_hash   u64  keyed blake2b of the key
    16  key        64s
    80  desc[0]    DESCRIPTOR
    104 desc[1]    DESCRIPTOR

Descriptor (24 bytes): expires_at f64 (absolute wall-clock seconds), value_len u32, first_chunk
u32 (NIL for an empty value), crc u32, priority u8 (the eviction class, 0 evicted first), pad.
``crc`` is the CRC-32 of the value with the seed
``(h ^ (h >> 32) ^ value_len ^ int(expires_at * 1000)) & 0xFFFFFFFF`` where ``h`` is the key hash
(see ``TableMemory.checksum``).

Entries at or above ``CTL_ENTRY_HWM`` and chunks at or above ``CTL_CHUNK_HWM`` have never been
used: they are free without being on a free stack, so creating or clearing a table costs time
proportional to the bucket array only.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field

if sys.byteorder != "little":  # pragma: no cover - no such host in CI
    raise ImportError("django-shmsession supports little-endian hosts only")

MAGIC = b"SHMSESS\x01"
INIT_MAGIC = b"SHMSINIT"
#: Version 2: process registry, intent log, semaphore identity in the header (see docs/layout.md).
#: Version 3: a priority class per descriptor, the last-access array, settings recorded by the
#: creator, eviction hints.
LAYOUT_VERSION = 3

HEADER_SIZE = 4096
NIL = 0xFFFFFFFF
KEY_MAX = 64

#: Byte offsets of the segment file used as open-file-description (``F_OFD_*``) record locks,
#: never as data: INIT serializes creation and initialization, ARBITER picks the one waiter that
#: may adopt a lock left by a dead holder, and byte ``SLOT_LOCK_BASE + i`` is held by the thread
#: that owns registry slot ``i`` for as long as it lives. The kernel drops each lock when the last
#: descriptor of its open file goes away, death included: liveness without pids.
INIT_LOCK_BYTE = 0
ARBITER_LOCK_BYTE = 1
SLOT_LOCK_BASE = 4096

MAGIC_STRUCT = struct.Struct("<8s")
MAGIC_OFFSET = 0

#: version, header_size, segment_size, bucket_count, entry_capacity, chunk_size, chunk_capacity,
#: secret, semaphore st_dev, semaphore st_ino, registry slot count, intent area size.
GEOMETRY = struct.Struct("<IIQIIII16sQQII")
GEOMETRY_OFFSET = 8
HEADER_CRC = struct.Struct("<I")
HEADER_CRC_OFFSET = GEOMETRY_OFFSET + GEOMETRY.size

CONTROL_OFFSET = 128
CONTROL_WORDS = 64

# Control words (u64), accessed through a memoryview cast to "Q": one aligned store per word.
CTL_REPAIR = 0  # REPAIR_NEEDED: corruption was found, the next holder rebuilds; REPAIR_RUNNING
REPAIR_NEEDED = 1
REPAIR_RUNNING = 2  # a full rebuild is running: waiters give a live repairer more than the timeout
CTL_LOCK_HOLDER = 1  # token (see slot_token) of the thread that holds the lock; 0 when none
CTL_LOCK_PROBE = 2  # adoption probe number: waiters echo it in their slot after a failed wait
CTL_LOCK_EPOCH = 3  # advances on every acquire, adoption and release
CTL_FREE_ENTRY = 4  # head of the free-entry stack (NIL when empty)
CTL_FREE_CHUNK = 5  # head of the free-chunk stack (NIL when empty)
CTL_ENTRY_HWM = 6  # entries [hwm, capacity) have never been used
CTL_CHUNK_HWM = 7
CTL_ENTRIES = 8  # live entries
CTL_CHUNKS_USED = 9
CTL_VALUE_BYTES = 10
CTL_GENERATION = 11  # bumped by clear() and repairs
CTL_LOCK_PRIORITY = 12  # token of the longest waiter: others defer to it (roughly FIFO hand-off)
CTL_LOCK_PRIORITY_SINCE = 13  # CLOCK_MONOTONIC ns when the priority was last refreshed
CTL_SLOT_HWM = 14  # registry slots [hwm, SLOT_COUNT) have never been claimed (scans stop there)
CTL_LOCK_PROBE_EPOCH = 15  # the epoch the current probe started at (any arbiter may finish it)
# Statistics counters.
CTL_HITS = 16
CTL_MISSES = 17
CTL_SETS = 18
CTL_DELETES = 19
CTL_EVICTIONS = 20
CTL_EXPIRED = 21
CTL_LOCK_WAITS = 22
CTL_LOCK_RECOVERIES = 23
CTL_REPAIRS = 24
CTL_TABLE_FULL = 25
CTL_OVERSIZE = 26
CTL_CORRUPTION = 27
CTL_ROLLBACKS = 28  # interrupted writes undone from the intent log
CTL_ENTRIES_DROPPED = 29  # entries dropped because they failed a check
CTL_LOCK_TIMEOUTS = 30
# Settings every process must agree on, recorded by the creator (0: not recorded).
CTL_SETTING_MAX_VALUE = 31  # max_value_size in bytes
CTL_SETTING_FULL_POLICY = 32  # FULL_POLICY_CODES[full_policy]
# Eviction hints. They steer eviction only: any value is safe (checked or clamped on use), so
# they are kept outside the intent log, and recovery marks them stale (CTL_HINTS_STALE).
CTL_EXPIRY_FLOOR = 33  # the least region floor (below): no entry expires before this second
CTL_EVICT_CURSOR = 35  # where the next directed search for a low-priority victim starts
CTL_HINTS_STALE = 36  # 1 when the class counts or floors may be off (a write was interrupted)
#: Live entries per priority class: words CTL_CLASS_ENTRIES .. + PRIORITY_CLASSES - 1.
CTL_CLASS_ENTRIES = 40
#: Evictions per priority class (statistics): words CTL_CLASS_EVICTIONS .. + PRIORITY_CLASSES - 1.
CTL_CLASS_EVICTIONS = 44
#: Words for the layers above the table (the tiered engine's listener heartbeat, ...): the
#: table never interprets them. Words CTL_APP_WORDS .. + APP_WORDS - 1, zero in a new segment.
CTL_APP_WORDS = 48
APP_WORDS = 8

#: Expiry floors: the entries are split into FLOOR_REGIONS equal ranges, and u32 word ``r`` at
#: ``FLOORS_OFFSET`` (in the header page) is a whole second no live entry of range ``r``
#: expires before (writes lower it; reclaiming a range's expired entries makes it exact). So
#: finding expired entries costs a walk of one range, not of the table. A hint: any value is
#: safe (too low costs a walk, too high delays a reclaim until the next recount).
FLOORS_OFFSET = 1024
FLOOR_REGIONS = 256

#: Priority classes an entry may carry (0 is evicted first). Stored in its descriptor.
PRIORITY_CLASSES = 4
#: FULL_POLICY setting -> its code in CTL_SETTING_FULL_POLICY.
FULL_POLICY_CODES = {"evict": 1, "raise": 2}

#: Counter name -> control word, as reported by ``SessionTable.stats()``.
COUNTERS = {
    "hits": CTL_HITS,
    "misses": CTL_MISSES,
    "sets": CTL_SETS,
    "deletes": CTL_DELETES,
    "evictions": CTL_EVICTIONS,
    "expired": CTL_EXPIRED,
    "lock_waits": CTL_LOCK_WAITS,
    "lock_recoveries": CTL_LOCK_RECOVERIES,
    "repairs": CTL_REPAIRS,
    "table_full_errors": CTL_TABLE_FULL,
    "oversize_errors": CTL_OVERSIZE,
    "corruption_detected": CTL_CORRUPTION,
    "rollbacks": CTL_ROLLBACKS,
    "entries_dropped": CTL_ENTRIES_DROPPED,
    "lock_timeouts": CTL_LOCK_TIMEOUTS,
}

# -- the process registry --------------------------------------------------------------------------
#: One slot per thread that uses the table (claimed lazily, held through an OFD lock on byte
#: ``SLOT_LOCK_BASE + slot``). Each slot is ``SLOT_WORDS`` u64 words at
#: ``REGISTRY_OFFSET + slot * SLOT_SIZE``, indexed by the ``SW_*`` constants.
REGISTRY_OFFSET = HEADER_SIZE
SLOT_COUNT = 1024
SLOT_WORDS = 8
SLOT_SIZE = SLOT_WORDS * 8
REGISTRY_SIZE = SLOT_COUNT * SLOT_SIZE
SW_STATE = 0  # SLOT_IDLE / SLOT_ACQUIRING / SLOT_RELEASING (holding is CTL_LOCK_HOLDER == token)
SW_ACK = 1  # the CTL_LOCK_PROBE value read before this slot's last failed wait
SW_INCARNATION = 2  # bumped by every claim, so a dead holder's reused slot is not the holder
SW_PID = 3  # for messages only (pids are not identity: namespaces, reuse)
SW_TID = 4  # for messages only
SW_SINCE = 5  # CLOCK_MONOTONIC ns when this slot started waiting (0 when not waiting)
SLOT_IDLE = 0
SLOT_ACQUIRING = 1  # about to wait, waiting, holding, or just got the semaphore (not recorded)
SLOT_RELEASING = 3  # cleared ``holder``, not yet posted
#: Slot tokens are ``incarnation << SLOT_TOKEN_BITS | (slot + 1)``; 0 means none.
SLOT_TOKEN_BITS = 16


def slot_token(slot: int, incarnation: int) -> int:
    """The one-word identity of a slot's current owner (one aligned store: never torn)."""
    return (incarnation << SLOT_TOKEN_BITS) | (slot + 1)


def token_slot(token: int) -> int:
    """The slot index of a nonzero token (may be out of range if the word is corrupt)."""
    return (token & ((1 << SLOT_TOKEN_BITS) - 1)) - 1


def token_incarnation(token: int) -> int:
    return token >> SLOT_TOKEN_BITS


# -- the intent log --------------------------------------------------------------------------------
#: One write's intent (what it will change and the old values), armed before the write touches
#: shared state and disarmed after it; recovery rolls that one write back (before its commit
#: byte) or forward (after it). See :mod:`django_shmsession.intent` and docs/layout.md.
#:
#: ``INTENT_ARMED`` (u64 at ``INTENT_ARMED_OFFSET``) is the arm word: the record's sequence
#: number while a write is in flight, 0 otherwise; it is stored last when arming and is the one
#: store that disarms. ``INTENT_CRC`` is the CRC-32 of the packed ``INTENT_BODY``, so a damaged
#: record is detected instead of being applied.
INTENT_OFFSET = REGISTRY_OFFSET + REGISTRY_SIZE
INTENT_SIZE = 4096
INTENT_ARMED = struct.Struct("<Q")
INTENT_ARMED_OFFSET = INTENT_OFFSET
INTENT_CRC = struct.Struct("<I")
INTENT_CRC_OFFSET = INTENT_OFFSET + 8
INTENT_BODY_OFFSET = INTENT_OFFSET + 16
#: seq, op, old_active, from_hwm, (pad), then u32: entry, bucket, pred, succ, free_entry,
#: entry_hwm, chunks, stack_taken, last_stack, last_link, free_chunk, free_chunk_mid,
#: chunk_hwm, first, freed_first, freed_count, length, old_length; then u64: entries,
#: chunks_used, value_bytes, deletes, generation (all "old" values: before the write).
INTENT_BODY = struct.Struct("<QBBBx18I5Q")
INTENT_OP_INSERT = 1
INTENT_OP_UPDATE = 2
INTENT_OP_DELETE = 3
INTENT_OP_CLEAR = 4
INTENT_OP_NAMES = {
    INTENT_OP_INSERT: "insert",
    INTENT_OP_UPDATE: "update",
    INTENT_OP_DELETE: "delete",
    INTENT_OP_CLEAR: "clear",
}
#: Everything before the bucket array.
FIXED_SIZE = INTENT_OFFSET + INTENT_SIZE

ENTRY_FREE = 0
ENTRY_USED = 1

#: state, active, key_len, pad, next, key_hash
ENTRY_HEAD = struct.Struct("<BBBxIQ")
ENTRY_KEY_OFFSET = ENTRY_HEAD.size  # 16
ENTRY_STATE_OFFSET = 0
ENTRY_ACTIVE_OFFSET = 1
ENTRY_NEXT = struct.Struct("<I")
ENTRY_NEXT_OFFSET = 4
#: expires_at, value_len, first_chunk, crc (the checked fields; the crc covers the value)
DESCRIPTOR = struct.Struct("<dIII4x")
#: The whole descriptor as written: the checked fields, then the entry's priority class (a hint
#: for eviction, clamped to PRIORITY_CLASSES - 1 when read), then 3 bytes of padding.
DESCRIPTOR_WRITE = struct.Struct("<dIIIB3x")
DESCRIPTOR_PRIORITY_OFFSET = 20
DESCRIPTOR_OFFSET = ENTRY_KEY_OFFSET + KEY_MAX  # 80
ENTRY_SIZE = DESCRIPTOR_OFFSET + 2 * DESCRIPTOR.size  # 128
#: The whole entry in one unpack (the lookup hot path): head, zero-padded key, both descriptors.
ENTRY = struct.Struct("<BBBxIQ64sdIIIB3xdIIIB3x")
#: Field positions in an ``ENTRY`` tuple; descriptor ``which`` starts at
#: ``F_DESCRIPTORS + which * F_DESCRIPTOR_FIELDS`` with (expires_at, value_len, first_chunk, crc,
#: priority): the first four are the checked fields, ``F_PRIORITY`` is the hint.
F_STATE, F_ACTIVE, F_KEY_LEN, F_NEXT, F_HASH, F_KEY = range(6)
F_DESCRIPTORS = 6
F_DESCRIPTOR_FIELDS = 5
F_PRIORITY = 4
#: What the hints' recount reads of each entry: state, active, and each descriptor's expiry and
#: priority (one ``iter_unpack`` over the entry array: no key or value is copied).
ENTRY_HINTS = struct.Struct("<BB78xd12xB3xd12xB3x")

U32 = 4
DEFAULT_CHUNK_SIZE = 512
#: Data chunks planned per entry slot: 1.5 x 512 B chunks suits Django's typical 100 B-1 KB
#: sessions while still leaving room for a few large ones.
DEFAULT_CHUNKS_PER_ENTRY = 1.5
MIN_ENTRIES = 16


def _align(value: int, alignment: int = 64) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class Geometry:
    """Sizes and region offsets of one segment; derived from the header, never from guesses.

    Region offsets are computed once here (they sit on the hot path of every lookup).
    """

    segment_size: int
    bucket_count: int
    entry_capacity: int
    chunk_size: int
    chunk_capacity: int
    buckets_offset: int = field(init=False)
    entries_offset: int = field(init=False)
    access_offset: int = field(init=False)
    chunk_links_offset: int = field(init=False)
    chunk_owners_offset: int = field(init=False)
    chunks_offset: int = field(init=False)

    def __post_init__(self) -> None:
        offsets = {"buckets_offset": FIXED_SIZE}
        offsets["entries_offset"] = _align(FIXED_SIZE + self.bucket_count * U32)
        offsets["access_offset"] = _align(
            offsets["entries_offset"] + self.entry_capacity * ENTRY_SIZE
        )
        offsets["chunk_links_offset"] = _align(offsets["access_offset"] + self.entry_capacity * U32)
        offsets["chunk_owners_offset"] = _align(
            offsets["chunk_links_offset"] + self.chunk_capacity * U32
        )
        offsets["chunks_offset"] = _align(
            offsets["chunk_owners_offset"] + self.chunk_capacity * U32
        )
        for name, value in offsets.items():
            object.__setattr__(self, name, value)

    @property
    def end_offset(self) -> int:
        return self.chunks_offset + self.chunk_capacity * self.chunk_size

    @property
    def data_capacity(self) -> int:
        return self.chunk_capacity * self.chunk_size

    @property
    def metadata_bytes(self) -> int:
        """Bytes spent on everything but chunk data (header, buckets, entries, chunk tables)."""
        return self.chunks_offset

    def entry_offset(self, index: int) -> int:
        return self.entries_offset + index * ENTRY_SIZE

    def descriptor_offset(self, index: int, which: int) -> int:
        return (
            self.entries_offset + index * ENTRY_SIZE + DESCRIPTOR_OFFSET + which * DESCRIPTOR.size
        )

    def chunk_offset(self, index: int) -> int:
        return self.chunks_offset + index * self.chunk_size

    def chunks_for(self, length: int) -> int:
        return -(-length // self.chunk_size)

    def is_consistent(self) -> bool:
        """True when the regions fit the segment exactly as recorded (checked on every open)."""
        return (
            self.bucket_count > 0
            and self.bucket_count & (self.bucket_count - 1) == 0
            and 0 < self.entry_capacity < NIL
            and 0 < self.chunk_capacity < NIL
            and 64 <= self.chunk_size <= 1 << 20
            and self.end_offset <= self.segment_size
        )

    @classmethod
    def plan(
        cls,
        segment_size: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        chunks_per_entry: float = DEFAULT_CHUNKS_PER_ENTRY,
    ) -> Geometry:
        """Split ``segment_size`` bytes between entries and chunks.

        Raises ValueError when the size cannot hold ``MIN_ENTRIES`` entries.
        """
        per_entry = ENTRY_SIZE + 3 * U32 + chunks_per_entry * (chunk_size + 2 * U32)
        entries = int((segment_size - FIXED_SIZE - 5 * 64) // per_entry)
        while entries >= MIN_ENTRIES:
            buckets = 1 << max(entries - 1, 1).bit_length()
            geometry = cls(
                segment_size=segment_size,
                bucket_count=buckets,
                entry_capacity=entries,
                chunk_size=chunk_size,
                chunk_capacity=max(int(entries * chunks_per_entry), 1),
            )
            if geometry.end_offset <= segment_size:
                return geometry
            entries -= max(entries // 64, 1)
        raise ValueError(
            f"a segment of {segment_size} bytes is too small for {MIN_ENTRIES} sessions; "
            "use at least 1 MiB"
        )
