"""Priority classes, LRU and expired-first eviction, and the table API the layers above use
(scan, add without eviction, batch, inline, app words, recorded settings, table log lines)."""

from __future__ import annotations

import logging
import struct
import threading

import pytest

from django_shmsession import layout
from django_shmsession.exceptions import SettingsMismatch, TableFull, WouldBlock
from django_shmsession.table import SessionTable

from .conftest import TableFactory
from .helpers import FakeClock, raw_mapping, value_for

SMALL = layout.FIXED_SIZE + 256 * 1024
WEEK = 7 * 86400.0
WORD = struct.Struct("<Q")


def fill(table: SessionTable, clock: FakeClock, prefix: str, priority: int, count: int) -> None:
    for i in range(count):
        assert table.add(f"{prefix}{i}", value_for(f"{prefix}{i}", 300), clock.now + WEEK, priority)


def capacity_of(table: SessionTable, size: int = 300) -> int:
    """How many ``size``-byte values fit (entries or chunks, whichever runs out first)."""
    stats = table.stats()
    per_value = -(-size // stats.chunk_size)
    reserve = -(-table.max_value_size // stats.chunk_size)
    return min(stats.entry_capacity, (stats.chunk_capacity - reserve) // per_value)


# -- priority classes ---------------------------------------------------------------------------


def test_a_flood_of_class_0_never_evicts_class_1(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """The issue's flood, in small: valued entries first, then many times the table's capacity
    of low-class inserts; every valued entry survives and the table stays usable."""
    table = make_table(SMALL, max_value_size=4096)
    valued = capacity_of(table) // 4
    fill(table, clock, "user", 1, valued)
    flood = 5 * capacity_of(table)
    for i in range(flood):
        table.set(f"anon{i}", value_for(f"anon{i}", 300), clock.now + WEEK, 0)
        if i % 97 == 0:
            clock.advance(1)
    assert all(table.get(f"user{i}") is not None for i in range(valued))
    assert table.get(f"anon{flood - 1}") is not None  # new low-class entries keep being created
    stats = table.stats()
    assert stats.class_evictions[1] == 0
    assert stats.class_evictions[0] == stats.evictions > flood // 2
    assert stats.class_entries[1] == valued
    assert table.check().ok


@pytest.mark.usefixtures("seeded_random")
def test_with_only_valued_entries_the_least_recently_used_goes(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table(SMALL, max_value_size=4096)
    count = capacity_of(table)
    fill(table, clock, "user", 1, count)
    clock.advance(5)
    recent = [f"user{i}" for i in range(0, count, 2)]
    for key in recent:
        assert table.get(key) is not None  # read: used 5 s after the odd half
    clock.advance(5)
    for i in range(count // 8):
        table.set(f"new{i}", value_for(f"new{i}", 300), clock.now + WEEK, 1)
    evicted = [f"user{i}" for i in range(count) if table.get(f"user{i}") is None]
    assert evicted, "nothing was evicted from a full table"
    stale = [key for key in evicted if int(key[4:]) % 2]
    assert len(stale) >= 0.9 * len(evicted), (len(stale), len(evicted))


def test_a_lower_class_is_found_even_when_samples_miss_it(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """One low-class entry among hundreds of valued ones is still the first to go."""
    table = make_table(SMALL, max_value_size=4096)
    count = capacity_of(table)
    fill(table, clock, "user", 1, count - 1)
    assert table.add("lonely", value_for("lonely", 300), clock.now + WEEK, 0)
    clock.advance(1)
    table.set("new", value_for("new", 300), clock.now + WEEK, 1)
    assert table.get("lonely") is None
    assert all(table.get(f"user{i}") is not None for i in range(count - 1))
    assert table.stats().class_evictions[:2] == (1, 0)


def test_stale_class_counts_are_recounted_before_they_are_trusted(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """After a crash the counts may be off: recovery marks them stale and eviction recounts."""
    table = make_table(SMALL, max_value_size=4096)
    count = capacity_of(table)
    fill(table, clock, "user", 1, count - 1)
    assert table.add("lonely", value_for("lonely", 300), clock.now + WEEK, 0)
    with raw_mapping(table.name) as mapping:  # counts that say "no class 0 entry"
        base = layout.CONTROL_OFFSET
        WORD.pack_into(mapping, base + 8 * layout.CTL_CLASS_ENTRIES, 0)
        WORD.pack_into(mapping, base + 8 * layout.CTL_HINTS_STALE, 1)
    clock.advance(1)
    table.set("new", value_for("new", 300), clock.now + WEEK, 1)
    assert table.get("lonely") is None
    assert table.stats().class_entries[:2] == (0, count)


def test_an_update_moves_an_entry_between_classes(table: SessionTable, clock: FakeClock) -> None:
    table.set("k", b"anonymous", clock.now + 60, 0)
    table.set("k", b"signed in", clock.now + 60, 1)
    assert table.stats().class_entries[:2] == (0, 1)
    assert table.replace("k", b"logged out", clock.now + 60, 0)
    assert table.stats().class_entries[:2] == (1, 0)
    table.delete("k")
    assert table.stats().class_entries == (0,) * layout.PRIORITY_CLASSES


@pytest.mark.parametrize("priority", [-1, layout.PRIORITY_CLASSES, True, 1.0, "1"])
def test_a_priority_out_of_range_is_refused(table: SessionTable, priority: object) -> None:
    with pytest.raises(ValueError, match="priority"):
        table.set("k", b"v", 2e9, priority)  # type: ignore[arg-type]
    assert not table.exists("k")


# -- expired first ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["raise", "evict"])
def test_expired_entries_are_reclaimed_before_any_live_one_goes(
    make_table: TableFactory, clock: FakeClock, policy: str
) -> None:
    """A few expired entries anywhere in a full table: they go first, under both policies, and
    a "raise" table accepts the write instead of raising although no sample would find them."""
    table = make_table(SMALL, max_value_size=4096, full_policy=policy)
    count = capacity_of(table)
    for i in range(count):
        lifetime = 10.0 if i in (7, count // 2, count - 3) else WEEK
        assert table.add(f"k{i}", value_for(f"k{i}", 300), clock.now + lifetime, 0, evict=False)
    clock.advance(60)
    for i in range(3):
        table.set(f"new{i}", value_for(f"new{i}", 300), clock.now + WEEK, 0)
    stats = table.stats()
    assert stats.evictions == 0
    assert stats.expired == 3
    assert all(table.get(f"new{i}") is not None for i in range(3))
    if policy == "raise":
        with pytest.raises(TableFull):
            table.set("one-too-many", value_for("x", 300), clock.now + WEEK)


def test_add_without_eviction_raises_table_full_and_keeps_everyone(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table(SMALL, max_value_size=4096, full_policy="evict")
    count = capacity_of(table)
    fill(table, clock, "k", 0, count)
    with pytest.raises(TableFull, match="full"):
        table.add("extra", value_for("extra", 300), clock.now + WEEK, 0, evict=False)
    assert table.stats().evictions == 0
    assert all(table.get(f"k{i}") is not None for i in range(count))
    assert not table.add("k0", b"other", clock.now + WEEK, evict=False)  # never overwrites
    assert table.get("k0") == value_for("k0", 300)


# -- scan, batch, inline, app words -------------------------------------------------------------


def test_scan_returns_every_live_entry_once_in_batches(
    table: SessionTable, clock: FakeClock
) -> None:
    expected = {}
    for i in range(50):
        expected[f"k{i}"] = (value_for(f"k{i}", 10 * i), clock.now + 100 + i, i % 3)
        table.set(f"k{i}", *expected[f"k{i}"])
    table.set("dead", b"x", clock.now + 1)
    clock.advance(2)
    seen, cursor, batches = {}, 0, 0
    while True:
        items, cursor = table.scan(cursor, batch_size=8)
        batches += 1
        assert len(items) <= 8
        for item in items:
            assert item.key not in seen
            seen[item.key] = (item.value, item.expires_at, item.priority)
        if cursor == 0:
            break
    assert seen == expected
    assert batches >= 7
    assert table.scan(10**9) == ([], 0)
    with pytest.raises(ValueError, match="cursor"):
        table.scan(-1)
    with pytest.raises(ValueError, match="batch_size"):
        table.scan(0, 0)


def test_batch_holds_the_lock_once_for_many_calls(table: SessionTable, clock: FakeClock) -> None:
    def epoch() -> int:
        with raw_mapping(table.name) as mapping:
            return int(WORD.unpack_from(mapping, layout.CONTROL_OFFSET + 8 * 3)[0])

    def write_many() -> int:
        for i in range(20):
            table.set(f"k{i}", b"v", clock.now + 60)
        return len([i for i in range(20) if table.get(f"k{i}") == b"v"])

    before = epoch()
    assert table.batch(write_many) == 20
    assert epoch() - before == 2  # one acquire, one release for 40 calls
    assert layout.CTL_LOCK_EPOCH == 3


def test_inline_raises_would_block_while_another_thread_holds_the_lock(
    table: SessionTable, clock: FakeClock
) -> None:
    table.set("k", b"v", clock.now + 60)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(10)

    holder = threading.Thread(target=table.batch, args=(hold,))
    holder.start()
    try:
        assert holding.wait(10)
        with pytest.raises(WouldBlock):
            table.inline(table.get, "k")
        with pytest.raises(WouldBlock):
            table.inline(table.set, "k", b"w", clock.now + 60)
    finally:
        release.set()
        holder.join(10)
    assert table.inline(table.get, "k") == b"v"  # nothing was written by the refused set
    assert table.get("k") == b"v"


def test_app_words_are_shared_and_checked(make_table: TableFactory) -> None:
    first = make_table()
    second = make_table(None)
    assert [first.read_app_word(i) for i in range(layout.APP_WORDS)] == [0] * layout.APP_WORDS
    first.write_app_word(3, 2**64 - 1)
    assert second.read_app_word(3) == 2**64 - 1
    for bad in (-1, layout.APP_WORDS):
        with pytest.raises(ValueError, match="app word"):
            first.read_app_word(bad)
    with pytest.raises(ValueError, match="64-bit"):
        first.write_app_word(0, 2**64)


# -- settings every process must share ----------------------------------------------------------


def test_settings_recorded_by_the_creator_are_enforced(make_table: TableFactory) -> None:
    make_table(max_value_size=4096, full_policy="raise")
    with pytest.raises(SettingsMismatch, match=r"max_value_size=4096.*max_value_size=8192") as info:
        make_table(None, max_value_size=8192)
    assert (info.value.setting, info.value.recorded, info.value.requested) == (
        "max_value_size",
        4096,
        8192,
    )
    with pytest.raises(SettingsMismatch, match=r"full_policy='raise'.*full_policy='evict'"):
        make_table(None, full_policy="evict")
    adopting = make_table(None)
    assert adopting.max_value_size == 4096
    agreeing = make_table(None, max_value_size=4096, full_policy="raise")
    agreeing.set("k", b"v", 2e9)


def test_a_damaged_settings_word_is_not_trusted(make_table: TableFactory) -> None:
    make_table(max_value_size=4096)
    with raw_mapping(make_table(None).name) as mapping:
        WORD.pack_into(mapping, layout.CONTROL_OFFSET + 8 * layout.CTL_SETTING_FULL_POLICY, 77)
    assert make_table(None, full_policy="raise") is not None  # re-recorded by this opener
    with pytest.raises(SettingsMismatch):
        make_table(None, full_policy="evict")


# -- log lines, emitted after the lock is released ----------------------------------------------


def test_table_full_under_raise_is_logged_as_an_error(
    make_table: TableFactory, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    table = make_table(SMALL, max_value_size=4096, full_policy="raise")
    fill(table, clock, "k", 0, capacity_of(table))
    caplog.set_level(logging.INFO, logger="django_shmsession")
    with pytest.raises(TableFull):
        table.set("extra", value_for("extra", 300), clock.now + WEEK)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "is full" in errors[0].getMessage()


def test_evictions_are_logged_once_per_interval_with_counts(
    make_table: TableFactory, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    table = make_table(SMALL, max_value_size=4096)
    table.class_names = ("anonymous", "signed-in", "c2", "c3")
    table.resize_hint = "raise SHMSESSION['SIZE']"
    count = capacity_of(table)
    fill(table, clock, "user", 1, count)
    caplog.set_level(logging.INFO, logger="django_shmsession")
    for i in range(20):
        table.set(f"new{i}", value_for(f"new{i}", 300), clock.now + WEEK, 1)
    lines = [r for r in caplog.records if "evicted" in r.getMessage()]
    assert len(lines) == 1  # rate-limited: the first eviction reports, the rest wait a minute
    assert lines[0].levelno == logging.WARNING
    assert "1 signed-in" in lines[0].getMessage()
    assert "raise SHMSESSION['SIZE']" in lines[0].getMessage()
