"""Bucket-chain lookups: finding an entry by key and finding its predecessor in its chain.

Chains hang off the bucket array and are linked through the entries' ``next`` words. Every walk
is bounded by the entry high-water mark and every index is checked, so a damaged chain raises
CorruptTable instead of looping or reading outside the table. Nothing here writes: linking and
unlinking are stores of a write's intent (:mod:`django_shmsession.writes`).
"""

from __future__ import annotations

from typing import Any

from .exceptions import CorruptTable
from .layout import (
    ENTRY,
    ENTRY_SIZE,
    ENTRY_USED,
    F_ACTIVE,
    F_DESCRIPTOR_FIELDS,
    F_DESCRIPTORS,
    F_HASH,
    F_KEY,
    F_KEY_LEN,
    F_NEXT,
    F_PRIORITY,
    F_STATE,
    NIL,
    PRIORITY_CLASSES,
)
from .memory import TableMemory, pad_key

__all__ = ["descriptor_of", "find", "predecessor"]


def find(memory: TableMemory, key: bytes, key_hash: int) -> tuple[int, tuple[Any, ...]]:
    """(index, fields) of the used entry holding ``key``, or (NIL, ())."""
    mask = memory.mask
    bucket = key_hash & mask
    index = memory.buckets[bucket]
    if index == NIL:  # an empty bucket: no hwm read, no key padding
        return NIL, ()
    key_len = len(key)
    padded = pad_key(key)
    hwm = memory.entry_hwm()
    # memory.entry(index) without the call: this loop is every operation's hot path.
    unpack, mm, base = ENTRY.unpack_from, memory.mm, memory.entries_offset
    steps = 0  # a chain longer than the hwm has a cycle (counted: no range() per lookup)
    while index != NIL and steps <= hwm:
        if index >= hwm:
            raise CorruptTable(f"bucket {bucket} links to entry {index} beyond {hwm}")
        fields = unpack(mm, base + index * ENTRY_SIZE)
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
        steps += 1
    if index == NIL:
        return NIL, ()
    raise CorruptTable(f"bucket {bucket} has a cycle")


def descriptor_of(index: int, fields: tuple[Any, ...]) -> tuple[float, int, int, int]:
    """The live (expires_at, value_len, first_chunk, crc) of an unpacked entry."""
    active = fields[F_ACTIVE]
    if active > 1:
        raise CorruptTable(f"entry {index} has an invalid active descriptor {active}")
    start = F_DESCRIPTORS + active * F_DESCRIPTOR_FIELDS
    found: tuple[float, int, int, int] = fields[start : start + 4]
    return found


def priority_of(fields: tuple[Any, ...]) -> int:
    """The priority class of an unpacked entry's live value (a hint, clamped into range)."""
    klass: int = fields[F_DESCRIPTORS + (fields[F_ACTIVE] & 1) * F_DESCRIPTOR_FIELDS + F_PRIORITY]
    return klass if klass < PRIORITY_CLASSES else PRIORITY_CLASSES - 1


def predecessor(memory: TableMemory, bucket: int, index: int) -> int:
    """The entry before ``index`` in ``bucket``'s chain; NIL when ``index`` is the head.

    Raises CorruptTable when ``index`` is not in the chain (a delete must know what it unlinks
    before it arms its intent).
    """
    current = memory.buckets[bucket]
    if current == index:  # the usual case (chains are short): no walk
        return NIL
    previous = NIL
    hwm = memory.entry_hwm()
    for _ in range(hwm + 1):
        if current == index:
            return previous
        if current == NIL:
            break
        if current >= hwm:
            raise CorruptTable(f"bucket {bucket} links to entry {current} beyond {hwm}")
        previous = current
        current = memory.head(current)[3]
    raise CorruptTable(f"entry {index} is missing from its bucket chain")
