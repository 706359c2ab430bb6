"""Typed, bounds-checked access to the regions of a mapped segment.

:class:`TableMemory` turns the raw mapping into the views the table algorithms need (control
words, buckets, chunk links and owners as ``memoryview`` casts; entries and descriptors through
the ``layout`` structs) and does every check that keeps a damaged segment from crashing the
process or returning one key's data for another: indices in range, chains no longer than their
value, chunks owned by the entry that points at them, checksums. A failed check raises
:class:`~django_shmsession.exceptions.CorruptTable`; the table repairs and retries.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterator
from typing import Any

from .exceptions import CorruptTable
from .layout import (
    CONTROL_OFFSET,
    CONTROL_WORDS,
    CTL_CHUNK_HWM,
    CTL_CHUNKS_USED,
    CTL_ENTRIES,
    CTL_ENTRY_HWM,
    CTL_FREE_CHUNK,
    CTL_FREE_ENTRY,
    CTL_VALUE_BYTES,
    DESCRIPTOR,
    DESCRIPTOR_OFFSET,
    DESCRIPTOR_PRIORITY_OFFSET,
    DESCRIPTOR_WRITE,
    ENTRY,
    ENTRY_ACTIVE_OFFSET,
    ENTRY_HEAD,
    ENTRY_KEY_OFFSET,
    ENTRY_NEXT,
    ENTRY_NEXT_OFFSET,
    ENTRY_SIZE,
    ENTRY_STATE_OFFSET,
    KEY_MAX,
    NIL,
    PRIORITY_CLASSES,
    U32,
)
from .segment import Segment


class CorruptEntry(CorruptTable):
    """One entry failed a check that leaves every other structure intact (its checksum).

    The recovery drops just that entry (a normal, logged delete) instead of rebuilding.
    """

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


#: The words a write reads before planning, in control-word order (one slice reads them all).
WRITE_WORDS = (
    CTL_FREE_ENTRY,
    CTL_FREE_CHUNK,
    CTL_ENTRY_HWM,
    CTL_CHUNK_HWM,
    CTL_ENTRIES,
    CTL_CHUNKS_USED,
    CTL_VALUE_BYTES,
)
if tuple(range(CTL_FREE_ENTRY, CTL_FREE_ENTRY + len(WRITE_WORDS))) != WRITE_WORDS:
    raise ImportError("layout: the write words must be consecutive")  # pragma: no cover

#: What :meth:`TableMemory.words` returns.
Words = tuple[int, int, int, int, int, int, int]

_WORDS_SLICE = slice(WRITE_WORDS[0], WRITE_WORDS[-1] + 1)

#: Offset of descriptor 0 and 1 within an entry (``Geometry.descriptor_offset`` without a call:
#: every entry access here computes its offset inline, one call less per store).
_DESCRIPTORS = (DESCRIPTOR_OFFSET, DESCRIPTOR_OFFSET + DESCRIPTOR.size)

#: An entry's head and zero-padded key in one store (``struct`` pads the ``s`` field with zeros).
_HEAD_AND_KEY = struct.Struct(f"{ENTRY_HEAD.format}{KEY_MAX}s")

#: Keys whose hash a process remembers (cleared when full: bounded memory, no eviction cost).
HASH_MEMO_SIZE = 4096


def pad_key(key: bytes) -> bytes:
    """The key as stored in an entry's fixed-size key field."""
    return key.ljust(KEY_MAX, b"\0")


class TableMemory:
    """The mapped regions of one segment, with checked readers and small writers."""

    def __init__(self, segment: Segment) -> None:
        geometry = segment.geometry
        self.segment = segment
        self.geometry = geometry
        self.mm = segment.memory
        whole = memoryview(segment.memory)
        self._whole = whole
        self.control = whole[CONTROL_OFFSET : CONTROL_OFFSET + CONTROL_WORDS * 8].cast("Q")
        self.buckets = self.u32_array(geometry.buckets_offset, geometry.bucket_count)
        self.links = self.u32_array(geometry.chunk_links_offset, geometry.chunk_capacity)
        self.owners = self.u32_array(geometry.chunk_owners_offset, geometry.chunk_capacity)
        #: Coarse last-access second of each entry (a hint for LRU eviction: any value is safe).
        self.access = self.u32_array(geometry.access_offset, geometry.entry_capacity)
        self.mask = geometry.bucket_count - 1
        self._write_words = self.control[_WORDS_SLICE]  # a view: no slice per write
        self._capacities = geometry.entry_capacity, geometry.chunk_capacity
        self.entries_offset = geometry.entries_offset
        self.chunks_offset = geometry.chunks_offset
        self.chunk_size = geometry.chunk_size
        #: ``Geometry.data_capacity`` is computed; writes check against it several times each.
        self.data_capacity = geometry.data_capacity
        self._hasher = hashlib.blake2b(digest_size=8, key=segment.secret)
        self._hash_memo: dict[bytes, int] = {}

    def u32_array(self, offset: int, count: int) -> memoryview:
        """``count`` u32 words at ``offset`` as an ``"I"`` view (the caller releases its own)."""
        return self._whole[offset : offset + count * U32].cast("I")

    def view(self, offset: int, length: int) -> memoryview:
        """``length`` bytes at ``offset`` as a view, without a copy (the caller releases it)."""
        return self._whole[offset : offset + length]

    def word_view(self, offset: int) -> memoryview:
        """One aligned u64 at ``offset`` as a ``"Q"`` view (a single store; caller releases)."""
        return self._whole[offset : offset + 8].cast("Q")

    def release(self) -> None:
        """Drop the views so the mapping can be closed."""
        views = (
            self._write_words,
            self.control,
            self.buckets,
            self.access,
            self.links,
            self.owners,
        )
        for view in (*views, self._whole):
            view.release()

    # -- counters -------------------------------------------------------------------------------

    def counts(self) -> tuple[int, int, int]:
        """(entries, chunks_used, value_bytes), each checked against what the table can hold.

        A write computes new counts from these; an impossible value read from the segment
        raises CorruptTable here instead of a ValueError when the new count is stored.
        """
        control = self.control
        geometry = self.geometry
        entries: int = control[CTL_ENTRIES]
        used: int = control[CTL_CHUNKS_USED]
        value_bytes: int = control[CTL_VALUE_BYTES]
        if (
            entries > geometry.entry_capacity
            or used > geometry.chunk_capacity
            or value_bytes > self.data_capacity
        ):
            raise CorruptTable(
                f"impossible counts: {entries} entries, {used} chunks, {value_bytes} value bytes"
            )
        return entries, used, value_bytes

    def words(self) -> Words:
        """(free entry, free chunk, entry hwm, chunk hwm, entries, chunks used, value bytes).

        Every word a write may change, read with one slice and checked together (the same
        checks as :meth:`free_entry_head`, :meth:`free_chunk_head`, the hwm readers and
        :meth:`counts`): a write reads them once, plans from them and records their old values.
        """
        words = self._write_words.tolist()
        free_entry, free_chunk, entry_hwm, chunk_hwm, entries, used, value_bytes = words
        entry_capacity, chunk_capacity = self._capacities
        if not (
            entry_hwm <= entry_capacity
            and chunk_hwm <= chunk_capacity
            and (free_entry < entry_hwm or free_entry == NIL)
            and (free_chunk < chunk_hwm or free_chunk == NIL)
            and entries <= entry_capacity
            and used <= chunk_capacity
            and value_bytes <= self.data_capacity
        ):
            self._raise_bad_words()
        return free_entry, free_chunk, entry_hwm, chunk_hwm, entries, used, value_bytes

    def _raise_bad_words(self) -> None:
        """Raise the specific CorruptTable of whichever checked reader rejects a word."""
        self.free_entry_head()
        self.free_chunk_head()
        self.counts()
        raise CorruptTable("a free-stack, high-water or count word is impossible")  # unreachable

    # -- hashing and checksums ------------------------------------------------------------------

    def key_hash(self, key: bytes) -> int:
        """Keyed blake2b of ``key``: equal in every process, unpredictable to clients.

        A request hashes its session key two or three times (load, then save); a small
        per-process memo makes the repeats a dict lookup (~0.05 µs instead of ~0.6 µs).
        """
        cached = self._hash_memo.get(key)
        if cached is not None:
            return cached
        hasher = self._hasher.copy()
        hasher.update(key)
        key_hash = int.from_bytes(hasher.digest(), "little")
        if len(self._hash_memo) >= HASH_MEMO_SIZE:
            self._hash_memo.clear()
        self._hash_memo[key] = key_hash
        return key_hash

    @staticmethod
    def checksum(key_hash: int, expires_at: float, value: bytes | memoryview) -> int:
        """CRC-32 of the value, seeded with the key's hash, the length and the expiry (in ms).

        Seeding ties the value to its key and descriptor in one C call. A corrupt expiry that is
        not a finite number yields -1, which never equals a stored (unsigned) CRC.
        """
        try:
            millis = int(expires_at * 1000)
        except (ValueError, OverflowError):
            return -1
        seed = (key_hash ^ (key_hash >> 32) ^ len(value) ^ millis) & 0xFFFFFFFF
        return zlib.crc32(value, seed)

    # -- entries --------------------------------------------------------------------------------

    def entry_hwm(self) -> int:
        """Entries below this index have been used; checked against the capacity."""
        hwm: int = self.control[CTL_ENTRY_HWM]
        if hwm > self.geometry.entry_capacity:
            raise CorruptTable(f"entry high-water mark {hwm} exceeds the capacity")
        return hwm

    def chunk_hwm(self) -> int:
        """Chunks below this index have been used; checked against the capacity."""
        hwm: int = self.control[CTL_CHUNK_HWM]
        if hwm > self.geometry.chunk_capacity:
            raise CorruptTable(f"chunk high-water mark {hwm} exceeds the capacity")
        return hwm

    def free_entry_head(self) -> int:
        """Top of the free-entry stack: NIL or a used-before entry index (checked)."""
        head: int = self.control[CTL_FREE_ENTRY]
        if head != NIL and head >= self.entry_hwm():
            raise CorruptTable(f"free-entry stack head {head} is out of range")
        return head

    def free_chunk_head(self) -> int:
        """Top of the free-chunk stack: NIL or a used-before chunk index (checked)."""
        head: int = self.control[CTL_FREE_CHUNK]
        if head != NIL and head >= self.chunk_hwm():
            raise CorruptTable(f"free-chunk stack head {head} is out of range")
        return head

    def check_entry_index(self, index: int) -> None:
        if index >= self.entry_hwm():
            raise CorruptTable(f"entry index {index} is out of range")

    def head(self, index: int) -> tuple[int, int, int, int, int]:
        """(state, active, key_len, next, key_hash) of entry ``index``."""
        fields: tuple[int, int, int, int, int] = ENTRY_HEAD.unpack_from(
            self.mm, self.entries_offset + index * ENTRY_SIZE
        )
        return fields

    def entry(self, index: int) -> tuple[Any, ...]:
        """Every field of entry ``index`` in one unpack (see ``layout.ENTRY`` and ``F_*``)."""
        return ENTRY.unpack_from(self.mm, self.entries_offset + index * ENTRY_SIZE)

    def key(self, index: int, key_len: int) -> bytes:
        if key_len > KEY_MAX:
            raise CorruptTable(f"entry {index} has a key length of {key_len}")
        start = self.entries_offset + index * ENTRY_SIZE + ENTRY_KEY_OFFSET
        return self.mm[start : start + key_len]

    def state(self, index: int) -> int:
        return self.mm[self.entries_offset + index * ENTRY_SIZE + ENTRY_STATE_OFFSET]

    def set_state(self, index: int, state: int) -> None:
        self.mm[self.entries_offset + index * ENTRY_SIZE + ENTRY_STATE_OFFSET] = state

    def active(self, index: int) -> int:
        active = self.mm[self.entries_offset + index * ENTRY_SIZE + ENTRY_ACTIVE_OFFSET]
        if active > 1:
            raise CorruptTable(f"entry {index} has an invalid active descriptor {active}")
        return active

    def set_active(self, index: int, which: int) -> None:
        self.mm[self.entries_offset + index * ENTRY_SIZE + ENTRY_ACTIVE_OFFSET] = which

    def set_next(self, index: int, next_index: int) -> None:
        ENTRY_NEXT.pack_into(
            self.mm, self.entries_offset + index * ENTRY_SIZE + ENTRY_NEXT_OFFSET, next_index
        )

    def write_head(self, index: int, key: bytes, key_hash: int, next_index: int) -> None:
        """Write a not-yet-committed entry (state FREE, descriptor 0 active).

        The key is zero-padded (by ``struct``) so lookups compare the whole fixed-size field in
        one step; head and key are one store.
        """
        _HEAD_AND_KEY.pack_into(
            self.mm,
            self.entries_offset + index * ENTRY_SIZE,
            0,
            0,
            len(key),
            next_index,
            key_hash,
            key,
        )

    def descriptor(self, index: int, which: int) -> tuple[float, int, int, int]:
        """(expires_at, value_len, first_chunk, crc), with the length checked against capacity."""
        fields: tuple[float, int, int, int] = DESCRIPTOR.unpack_from(
            self.mm, self.entries_offset + index * ENTRY_SIZE + _DESCRIPTORS[which]
        )
        if fields[1] > self.data_capacity:
            raise CorruptTable(f"entry {index} claims a {fields[1]}-byte value")
        return fields

    def write_descriptor(
        self,
        index: int,
        which: int,
        expires_at: float,
        length: int,
        first: int,
        crc: int,
        priority: int,
    ) -> None:
        DESCRIPTOR_WRITE.pack_into(
            self.mm,
            self.entries_offset + index * ENTRY_SIZE + _DESCRIPTORS[which],
            expires_at,
            length,
            first,
            crc,
            priority,
        )

    def priority(self, index: int, which: int) -> int:
        """The priority class of descriptor ``which`` (a hint: clamped into range)."""
        offset = self.entries_offset + index * ENTRY_SIZE + _DESCRIPTORS[which]
        return min(self.mm[offset + DESCRIPTOR_PRIORITY_OFFSET], PRIORITY_CLASSES - 1)

    def live_priority(self, index: int) -> int:
        """The priority class of entry ``index``'s live value."""
        return self.priority(index, self.active(index))

    # -- chunks ---------------------------------------------------------------------------------

    def chain(self, index: int, first: int, length: int) -> Iterator[int]:
        """The chunks of entry ``index``'s value, each checked to be in range and owned by it."""
        owners = self.owners
        links = self.links
        tag = index + 1
        hwm = self.chunk_hwm()
        chunk = first
        for _ in range(self.geometry.chunks_for(length)):
            if chunk >= hwm or owners[chunk] != tag:
                raise CorruptTable(f"entry {index} has a broken chunk chain at chunk {chunk}")
            yield chunk
            chunk = links[chunk]

    def chain_span(self, index: int, first: int, length: int, chunk_hwm: int) -> tuple[int, bool]:
        """(chunk count, whether the chain is a run) of entry ``index``'s value, checked.

        A writer that frees the chain later in the same lock hold passes the answer on, so the
        chain is not checked for being a run twice (nothing else touches it in between).
        """
        if length > self.data_capacity:
            raise CorruptTable(f"entry {index} claims a {length}-byte value")
        if length <= self.chunk_size:
            if length == 0:
                return 0, False
            if first >= chunk_hwm or self.owners[first] != index + 1:
                raise CorruptTable(f"entry {index} has a broken chunk chain at chunk {first}")
            return 1, False
        count = -(-length // self.chunk_size)
        if self.owns_run(index, first, count, chunk_hwm):
            return count, True
        return sum(1 for _chunk in self.chain(index, first, length)), False

    def links_run(self, first: int, count: int) -> bool:
        """Whether chunks ``first`` .. ``first + count - 1`` (all below the capacity) link each
        to the next, in order: the usual shape of a chain, checked with two slice copies
        instead of a Python step per chunk (~0.6 µs instead of ~2 µs for a 4 KB value)."""
        end = first + count
        if end > self.geometry.chunk_capacity:
            return False
        return count < 2 or self.links[first : end - 1].tolist() == [*range(first + 1, end)]

    def owns_run(self, index: int, first: int, count: int, chunk_hwm: int) -> bool:
        """Whether entry ``index``'s chain is the run ``first`` .. ``first + count - 1``: every
        chunk below ``chunk_hwm``, owned by the entry, and linked in order. False says only
        "not a run": the caller then walks (and checks) the chain chunk by chunk."""
        end = first + count
        return (
            end <= chunk_hwm
            and self.owners[first:end].tolist().count(index + 1) == count
            and self.links_run(first, count)
        )

    def read_value(self, index: int, first: int, length: int) -> bytes:
        """Copy a value out of its chunks (the chain is checked as it is walked)."""
        geometry = self.geometry
        size = geometry.chunk_size
        if length <= size:
            if length == 0:
                return b""
            if first >= self.chunk_hwm() or self.owners[first] != index + 1:
                raise CorruptTable(f"entry {index} has a broken chunk chain at chunk {first}")
            start = geometry.chunk_offset(first)
            return self.mm[start : start + length]
        if self.owns_run(index, first, -(-length // size), self.chunk_hwm()):
            # Chains are usually runs (fresh chunks come in order; a freed chain goes back on
            # the stack in order, and the next value of that size takes it): one copy instead of
            # a slice per chunk plus a join.
            start = geometry.chunk_offset(first)
            return self.mm[start : start + length]
        # Walk, check and copy in one loop (what :meth:`chain` checks, without its generator).
        owners, links, mm = self.owners, self.links, self.mm
        hwm, tag, base = self.chunk_hwm(), index + 1, self.chunks_offset
        parts = []
        chunk = first
        for position in range(0, length, size):
            if chunk >= hwm or owners[chunk] != tag:
                raise CorruptTable(f"entry {index} has a broken chunk chain at chunk {chunk}")
            start = base + chunk * size
            parts.append(mm[start : start + min(size, length - position)])
            chunk = links[chunk]
        return b"".join(parts)

    def write_value(self, first: int, value: bytes, run: bool = False) -> None:
        """Copy ``value`` into a chain that was just allocated (so it is trusted).

        ``run`` says the chain is a run (``apply_chunks`` knows): one copy instead of a
        copy per chunk.
        """
        size = self.chunk_size
        length = len(value)
        if length <= size or run:
            if length:
                start = self.chunks_offset + first * size  # Geometry.chunk_offset, inline
                self.mm[start : start + length] = value
            return
        if self.links_run(first, -(-length // size)):
            start = self.chunks_offset + first * size
            self.mm[start : start + length] = value
            return
        view = memoryview(value)
        chunk = first
        for position in range(0, length, size):
            start = self.chunks_offset + chunk * size
            piece = view[position : position + size]
            self.mm[start : start + len(piece)] = piece
            chunk = self.links[chunk]
        view.release()
