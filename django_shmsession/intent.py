"""The intent log: one record that makes every write recoverable in O(1).

Before a write stores anything shared, it packs an :class:`Intent` (which operation, the entry,
bucket and chains it touches, and the *old* value of every word it will change) into the intent
area and arms it with one store of the record's sequence number; after its last store it
disarms with one store of 0. A process that dies in between leaves the record armed, and
whoever takes the lock next applies it (:mod:`django_shmsession.recovery`): before the write's
commit byte the old values are put back, after it the remaining stores are redone from the
record. Both are sequences of "set this word to that value", so a recoverer killed half-way
leaves a record the next one applies again with the same result.

The record carries a CRC and every field is bounds-checked before use (:meth:`IntentLog.read`):
a damaged record is never applied; it asks for a full rebuild instead.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

from .layout import (
    INTENT_ARMED_OFFSET,
    INTENT_BODY,
    INTENT_BODY_OFFSET,
    INTENT_CRC,
    INTENT_CRC_OFFSET,
    INTENT_OP_CLEAR,
    INTENT_OP_DELETE,
    INTENT_OP_INSERT,
    INTENT_OP_UPDATE,
    NIL,
    Geometry,
)
from .memory import TableMemory

__all__ = ["Intent", "IntentLog"]

OPS = (INTENT_OP_INSERT, INTENT_OP_UPDATE, INTENT_OP_DELETE, INTENT_OP_CLEAR)


class Intent(NamedTuple):
    """One write's plan; field order is ``layout.INTENT_BODY``'s. Counts are pre-write values."""

    seq: int
    op: int
    old_active: int  # update: the descriptor live before the write (the commit flips it)
    from_hwm: int  # insert: 1 when the entry came from above the entry high-water mark
    entry: int
    bucket: int
    pred: int  # delete: the chain predecessor (NIL: the entry is the bucket head)
    succ: int  # delete: the entry's chain successor; insert: the free-entry stack's next
    free_entry: int  # CTL_FREE_ENTRY before
    entry_hwm: int  # CTL_ENTRY_HWM before
    chunks: int  # chunks allocated for the new value
    stack_taken: int  # how many of them came from the free-chunk stack (the rest from the hwm)
    last_stack: int  # the last chunk taken from the stack (its link is overwritten), or NIL
    last_link: int  # that link's old value
    free_chunk: int  # CTL_FREE_CHUNK before
    free_chunk_mid: int  # CTL_FREE_CHUNK after the allocation (before any chain is freed)
    chunk_hwm: int  # CTL_CHUNK_HWM before
    first: int  # first chunk of the new value (NIL when empty)
    freed_first: int  # first chunk of the chain this write frees (NIL when none)
    freed_count: int
    length: int  # new value length (insert, update)
    old_length: int  # length of the value removed (update, delete)
    entries: int  # CTL_ENTRIES before
    chunks_used: int  # CTL_CHUNKS_USED before
    value_bytes: int  # CTL_VALUE_BYTES before
    deletes: int  # clear: CTL_DELETES before
    generation: int  # clear: CTL_GENERATION before

    @property
    def chunk_hwm_after(self) -> int:
        return self.chunk_hwm + self.chunks - self.stack_taken

    @property
    def chunks_used_after(self) -> int:
        return self.chunks_used + self.chunks - self.freed_count

    @property
    def value_bytes_after(self) -> int:
        return self.value_bytes + self.length - self.old_length


def is_valid(intent: Intent, geometry: Geometry) -> bool:
    """True when every index and count of ``intent`` fits the table (so applying it is safe)."""
    entries, chunks = geometry.entry_capacity, geometry.chunk_capacity

    def chunk_ok(index: int) -> bool:
        return index == NIL or index < chunks

    return (
        intent.op in OPS
        and intent.old_active <= 1
        and intent.from_hwm <= 1
        and (intent.op == INTENT_OP_CLEAR or intent.entry < entries)
        and intent.bucket < geometry.bucket_count
        and (intent.pred == NIL or intent.pred < entries)
        and (intent.succ == NIL or intent.succ < entries)
        and (intent.free_entry == NIL or intent.free_entry < entries)
        and intent.entry_hwm <= entries
        and intent.stack_taken <= intent.chunks <= chunks
        and intent.freed_count <= chunks
        and all(
            map(
                chunk_ok,
                (
                    intent.last_stack,
                    intent.last_link,
                    intent.free_chunk,
                    intent.free_chunk_mid,
                    intent.first,
                    intent.freed_first,
                ),
            )
        )
        and intent.chunk_hwm <= intent.chunk_hwm_after <= chunks
        and intent.length <= geometry.data_capacity
        and intent.old_length <= geometry.data_capacity
        and intent.entries <= entries
        and 0 <= intent.chunks_used_after <= chunks
        and intent.chunks_used <= chunks
        and 0 <= intent.value_bytes_after <= geometry.data_capacity
        and intent.value_bytes <= geometry.data_capacity
    )


class IntentLog:
    """The intent area of one mapped segment: arm, disarm, read back."""

    def __init__(self, memory: TableMemory) -> None:
        self._mm = memory.mm
        self._geometry = memory.geometry
        # One aligned u64 view over the arm word: arming and disarming are single stores.
        self._armed = memory.word_view(INTENT_ARMED_OFFSET)
        self._crc = memory.u32_array(INTENT_CRC_OFFSET, 1)
        # The body's first word is its ``seq``: read alone, without unpacking the whole body.
        self._seq = memory.word_view(INTENT_BODY_OFFSET)

    def release(self) -> None:
        self._seq.release()
        self._crc.release()
        self._armed.release()

    @property
    def armed(self) -> bool:
        return self._armed[0] != 0

    @property
    def armed_word(self) -> memoryview:
        """The arm word itself (nonzero while armed), for the lock's inline test."""
        return self._armed

    def last_seq(self) -> int:
        """Sequence number of the last armed write: it changes whenever the table changes."""
        seq: int = self._seq[0]
        return seq

    def next_seq(self) -> int:
        """A fresh, nonzero sequence number (wraps long after any table is gone)."""
        seq: int = (self._seq[0] + 1) & 0xFFFFFFFFFFFFFFFF
        return seq or 1

    def arm(self, record: tuple[int, ...]) -> None:
        """Write the record (an :class:`Intent` or a plain tuple of its fields), then arm it
        with one store: a half-written record is never armed.

        (``pack`` of a plain tuple then one slice store is the fastest way to write it:
        ``pack_into`` with 27 unpacked fields, or unpacking a tuple subclass, costs more.)
        """
        body = INTENT_BODY.pack(*record)
        self._mm[INTENT_BODY_OFFSET : INTENT_BODY_OFFSET + INTENT_BODY.size] = body
        self._crc[0] = zlib.crc32(body)
        self._armed[0] = record[0]

    def disarm(self) -> None:
        self._armed[0] = 0

    def read(self) -> Intent | None:
        """The armed record, or None when it is damaged (wrong CRC, sequence or bounds)."""
        mm = self._mm
        raw = mm[INTENT_BODY_OFFSET : INTENT_BODY_OFFSET + INTENT_BODY.size]
        (crc,) = INTENT_CRC.unpack_from(mm, INTENT_CRC_OFFSET)
        if zlib.crc32(raw) != crc:
            return None
        intent = Intent._make(INTENT_BODY.unpack(raw))
        if intent.seq != self._armed[0] or not is_valid(intent, self._geometry):
            return None
        return intent
