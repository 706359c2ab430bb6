"""Corrupt bytes in the segment: every operation works, misses or raises CorruptTable.

Bytes are overwritten through a mapping of our own (as a stray write from another process or a
bad RAM cell would), in one region of the segment at a time. Afterwards no operation may crash
with another exception, hang, or return one key's data for another (values name their key), and
``check(repair=True)`` must leave a table whose ``check()`` is ok.
"""

from __future__ import annotations

import contextlib
import functools
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest

from django_shmsession import layout
from django_shmsession.exceptions import CorruptTable
from django_shmsession.table import SessionTable

from .conftest import TableFactory
from .helpers import FakeClock, raw_mapping, value_for, watchdog

SIZE = 256 * 1024
WORD = struct.Struct("<Q")
REGIONS = (
    "geometry",
    "control",
    "intent",
    "buckets",
    "entries",
    "chunk_tables",
    "chunks",
    "anywhere",
)
FAR = 4e9


def region_bounds(name: str, region: str) -> tuple[int, int]:
    """[start, end) of a region's *used* bytes, read from the segment's own header."""
    with raw_mapping(name) as mapping:
        fields = layout.GEOMETRY.unpack_from(mapping, layout.GEOMETRY_OFFSET)
        _version, _header, size, buckets, entries, chunk_size, chunks = fields[:7]

        def control(word: int) -> int:
            return int(WORD.unpack_from(mapping, layout.CONTROL_OFFSET + 8 * word)[0])

        entry_hwm, chunk_hwm = control(layout.CTL_ENTRY_HWM), control(layout.CTL_CHUNK_HWM)
    geometry = layout.Geometry(size, buckets, entries, chunk_size, chunks)
    return {
        "geometry": (0, layout.CONTROL_OFFSET),
        "control": (layout.CONTROL_OFFSET, layout.CONTROL_OFFSET + 8 * layout.CONTROL_WORDS),
        "intent": (layout.INTENT_OFFSET, layout.INTENT_BODY_OFFSET + layout.INTENT_BODY.size),
        "buckets": (geometry.buckets_offset, geometry.entries_offset),
        "entries": (geometry.entries_offset, geometry.entry_offset(entry_hwm)),
        "chunk_tables": (geometry.chunk_links_offset, geometry.chunk_owners_offset + 4 * chunk_hwm),
        "chunks": (geometry.chunks_offset, geometry.chunk_offset(chunk_hwm)),
        "anywhere": (0, size),
    }[region]


def corrupt(name: str, region: str, rng: random.Random) -> list[tuple[int, bytes]]:
    """Overwrite 1-4 random runs of 1-8 random bytes inside ``region``; returns what was done."""
    start, end = region_bounds(name, region)
    done = []
    with raw_mapping(name) as mapping:
        for _ in range(rng.randint(1, 4)):
            length = rng.randint(1, 8)
            offset = rng.randrange(start, max(end - length, start + 1))
            junk = bytes(rng.getrandbits(8) for _ in range(length))
            mapping[offset : offset + length] = junk
            done.append((offset, junk))
    return done


class Probe:
    """Runs operations on a damaged table and records any outcome the contract forbids."""

    def __init__(self, table: SessionTable) -> None:
        self.table = table
        self.violations: list[str] = []

    def run(self, what: str, call: Callable[[], Any]) -> tuple[bool, Any]:
        """(completed, result); CorruptTable is allowed, any other exception is a violation."""
        try:
            return True, call()
        except CorruptTable:
            return False, None
        except Exception as err:
            self.violations.append(f"{what}: {type(err).__name__}: {err}")
            return False, None

    def get(self, key: str, allowed: set[bytes]) -> None:
        completed, value = self.run(f"get({key})", lambda: self.table.get(key))
        if completed and value is not None and value not in allowed:
            self.violations.append(f"get({key}) returned bytes that are not its value")


def populate(table: SessionTable, clock: FakeClock) -> dict[str, set[bytes]]:
    """60 live keys of 0-3000 B and 20 that expire; returns key -> values it may return."""
    allowed: dict[str, set[bytes]] = {}
    for i in range(60):
        key = f"live-{i}"
        value = value_for(key, (i * 997) % 3000)
        table.set(key, value, FAR)
        allowed[key] = {value}
    for i in range(20):
        table.set(f"dead-{i}", value_for(f"dead-{i}", 100 * i), clock.now + 5)
        allowed[f"dead-{i}"] = set()
    clock.advance(10)
    return allowed


def exercise(probe: Probe, allowed: dict[str, set[bytes]]) -> None:
    """Every kind of operation on the damaged table, updating what each key may return."""
    table = probe.table
    for key in allowed:
        probe.get(key, allowed[key])
        probe.run(f"exists({key})", functools.partial(table.exists, key))
    new = value_for("live-0", 1234, 1)
    completed, replaced = probe.run("replace", lambda: table.replace("live-0", new, FAR))
    allowed["live-0"] = {new} if completed and replaced else allowed["live-0"] | {new}
    completed, _ = probe.run("delete", lambda: table.delete("live-1"))
    if completed:
        allowed["live-1"] = set()
    for i in range(10):
        key, value = f"new-{i}", value_for(f"new-{i}", 300 * i)
        allowed[key] = {value}
        probe.run(f"set({key})", functools.partial(table.set, key, value, FAR))
        probe.run(f"add({key})", functools.partial(table.add, key, b"no", FAR))
    probe.run("clear_expired", lambda: table.clear_expired(batch_size=16))
    probe.run("stats", table.stats)
    for key in allowed:
        probe.get(key, allowed[key])


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("region", REGIONS)
def test_corrupt_bytes_never_crash_hang_or_mix_up_keys(
    make_table: TableFactory, clock: FakeClock, region: str, seed: int
) -> None:
    table = make_table(SIZE, max_value_size=8192)
    allowed = populate(table, clock)
    damage = corrupt(table.name, region, random.Random(f"{region}-{seed}"))
    probe = Probe(table)
    with watchdog(20):
        exercise(probe, allowed)
        report = probe.run("check(repair=True)", lambda: table.check(repair=True))
        after = probe.run("check()", table.check)[1]
    assert probe.violations == [], f"damage {damage}"
    assert report[0], f"check(repair=True) raised CorruptTable; damage {damage}"
    assert after is not None
    assert after.ok, (after, damage)
    with watchdog(20):
        for key, values in allowed.items():
            assert table.get(key) in values | {None}, key
        table.set("fresh", b"works", FAR)
        assert table.get("fresh") == b"works"
        reopened = make_table(None)  # the repaired header opens cleanly
        assert reopened.get("fresh") == b"works"


def test_a_flipped_value_byte_is_a_miss_or_corrupt_table_never_wrong_data(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """The checksum covers the value: a damaged value is never returned as if it were good."""
    table = make_table(SIZE, max_value_size=8192)
    table.set("victim", value_for("victim", 3000), FAR)
    table.set("bystander", value_for("bystander", 3000), FAR)
    start, end = region_bounds(table.name, "chunks")
    with raw_mapping(table.name) as mapping:
        position = bytes(mapping[start:end]).index(value_for("victim", 3000)[1000:1016])
        mapping[start + position] ^= 0xFF
    with watchdog(20):
        with contextlib.suppress(CorruptTable):
            assert table.get("victim") is None
        assert table.get("bystander") == value_for("bystander", 3000)
        table.check(repair=True)
        assert table.check().ok
        assert table.get("victim") is None


def test_a_huge_high_water_mark_is_caught_not_followed(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """A corrupt count must not send the table reading (or writing) past its entry region."""
    table = make_table(SIZE, max_value_size=8192)
    table.set("k", b"v", FAR)
    with raw_mapping(table.name) as mapping:
        WORD.pack_into(mapping, layout.CONTROL_OFFSET + 8 * layout.CTL_ENTRY_HWM, 1 << 40)
        WORD.pack_into(mapping, layout.CONTROL_OFFSET + 8 * layout.CTL_CHUNK_HWM, 1 << 40)
    probe = Probe(table)
    with watchdog(20):
        probe.get("k", {b"v"})
        probe.run("clear_expired", table.clear_expired)
        probe.run("set", lambda: table.set("k2", b"w", FAR))
        table.check(repair=True)
    assert probe.violations == []
    assert table.check().ok


def flip_a_byte_of_the_first_value(table: SessionTable) -> None:
    """Damage entry 0's value in place (its checksum no longer matches)."""
    with raw_mapping(table.name) as mapping:
        fields = layout.GEOMETRY.unpack_from(mapping, layout.GEOMETRY_OFFSET)
        geometry = layout.Geometry(fields[2], fields[3], fields[4], fields[5], fields[6])
        mapping[geometry.chunk_offset(0) + 5] ^= 0xFF


def test_a_checksum_mismatch_drops_that_entry_only_without_a_rebuild(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table(SIZE)
    for i in range(20):
        table.set(f"k{i}", value_for(f"k{i}", 700), FAR)
    flip_a_byte_of_the_first_value(table)
    before = table.stats()
    assert table.get("k0") is None
    after = table.stats()
    assert after.entries_dropped == before.entries_dropped + 1
    assert after.corruption_detected == before.corruption_detected + 1
    assert after.repairs == before.repairs, "a single bad checksum must not rebuild the table"
    assert {f"k{i}": table.get(f"k{i}") for i in range(1, 20)} == {
        f"k{i}": value_for(f"k{i}", 700) for i in range(1, 20)
    }
    report = table.check()
    assert report.ok, report.problems
    assert report.entries == 19


def test_replace_if_over_a_damaged_entry_drops_it_and_writes_nothing(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table(SIZE)
    for i in range(3):
        table.set(f"k{i}", value_for(f"k{i}", 700), FAR)
    flip_a_byte_of_the_first_value(table)
    before = table.stats()
    assert table.replace_if("k0", value_for("k0", 700), b"new", FAR) is False
    assert table.get("k0") is None
    assert table.stats().entries_dropped == before.entries_dropped + 1
    assert table.get("k1") == value_for("k1", 700)
    assert table.check().ok


@pytest.mark.parametrize(
    "word", [layout.CTL_ENTRIES, layout.CTL_CHUNKS_USED, layout.CTL_VALUE_BYTES]
)
@pytest.mark.parametrize("value", [2**63, 2**64 - 1, 10**9])
def test_impossible_counts_raise_corrupt_table_or_are_repaired(
    make_table: TableFactory, clock: FakeClock, word: int, value: int
) -> None:
    """Never a bare ValueError/OverflowError from storing a count computed from a bad one."""
    table = make_table(SIZE)
    for i in range(10):
        table.set(f"k{i}", b"v" * 600, FAR)
    with raw_mapping(table.name) as mapping:
        WORD.pack_into(mapping, layout.CONTROL_OFFSET + 8 * word, value)
    probe = Probe(table)
    probe.run("set", lambda: table.set("new", b"n" * 900, FAR))
    probe.run("delete", lambda: table.delete("k1"))
    probe.run("update", lambda: table.set("k2", b"u" * 100, FAR))
    probe.run("stats", table.stats)
    assert probe.violations == []
    table.check(repair=True)
    report = table.check()
    assert report.ok, report.problems
