"""A full table: policy "raise" raises TableFull and damages nothing; "evict" drops the entries
that expire soonest and counts them."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from django_shmsession import layout
from django_shmsession.exceptions import TableFull
from django_shmsession.layout import FIXED_SIZE
from django_shmsession.table import SessionTable

from .conftest import TableFactory
from .helpers import FakeClock, value_for

#: 64 KiB of buckets, entries and chunks after the fixed header, registry and intent areas.
SMALL = FIXED_SIZE + 64 * 1024


def fill_until_full(
    table: SessionTable,
    clock: FakeClock,
    size: int,
    lifetime: Callable[[int], float] = lambda i: 1000.0 + i,
    limit: int = 10_000,
) -> dict[str, bytes]:
    """Insert values of ``size`` bytes until TableFull; return what fits.

    Value ``i`` lives ``lifetime(i)`` seconds (by default: later values live longer). The adds
    never evict (``evict=False``), so this fills a table of either policy.
    """
    data: dict[str, bytes] = {}
    for i in range(limit):
        key = f"k{i}"
        value = value_for(key, size)
        try:
            assert table.add(key, value, clock.now + lifetime(i), evict=False)
        except TableFull:
            return data
        data[key] = value
    raise AssertionError(f"{limit} values of {size} B fit in a {table.size} B table")


def assert_intact(table: SessionTable, data: dict[str, bytes]) -> None:
    assert {k: table.get(k) for k in data} == data
    report = table.check()
    assert report.ok, report.problems


@pytest.mark.parametrize("value_size", [1, 200, 3000])
def test_raise_policy_raises_table_full_and_keeps_everything(
    make_table: TableFactory, clock: FakeClock, value_size: int
) -> None:
    table = make_table(SMALL, full_policy="raise", max_value_size=4096)
    data = fill_until_full(table, clock, value_size)
    assert data, "not even one value fitted"
    assert table.get(f"k{len(data)}") is None
    stats = table.stats()
    assert stats.table_full_errors == 1
    assert stats.evictions == 0
    assert stats.entries == len(data)
    assert_intact(table, data)


def test_raise_policy_table_is_limited_by_entry_slots_or_chunks(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """One-byte values fill the table exactly to whichever capacity is smaller (the chunks
    minus the reserve kept for updates: one value of max_value_size)."""
    table = make_table(SMALL, full_policy="raise", max_value_size=4096)
    stats = table.stats()
    data = fill_until_full(table, clock, 1)
    assert len(data) == min(stats.entry_capacity, stats.chunk_capacity - 4096 // stats.chunk_size)


@pytest.mark.parametrize("policy", ["raise", "evict"])
@pytest.mark.parametrize("new_size", [3000, 2561, 1, 0])
def test_an_update_that_does_not_grow_never_evicts_or_raises(
    make_table: TableFactory, clock: FakeClock, policy: str, new_size: int
) -> None:
    """A full table (entries or chunks): rewriting a session with a value of no more chunks
    than before touches nobody else, whatever the policy (the update reserve)."""
    table = make_table(SMALL, full_policy=policy, max_value_size=4096)
    data = fill_until_full(table, clock, 3000)
    before = table.stats()
    for version, key in enumerate(list(data), start=1):
        data[key] = value_for(key, new_size, version)
        table.set(key, data[key], clock.now + 5000)
        assert table.replace(key, data[key], clock.now + 5000)
    after = table.stats()
    assert (after.evictions, after.table_full_errors) == (
        before.evictions,
        before.table_full_errors,
    )
    assert_intact(table, data)


@pytest.mark.parametrize("operation", ["set", "replace"])
def test_a_growing_overwrite_of_a_full_table_keeps_the_old_value(
    make_table: TableFactory, clock: FakeClock, operation: str
) -> None:
    table = make_table(SMALL, full_policy="raise", max_value_size=4096)
    data = fill_until_full(table, clock, 200)
    bigger = value_for("k0", 4096, version=1)
    try:
        getattr(table, operation)("k0", bigger, clock.now + 5000)
    except TableFull:
        pass
    else:
        data["k0"] = bigger
    assert_intact(table, data)


def test_add_to_a_full_table_raises_and_does_not_create(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table(SMALL, full_policy="raise", max_value_size=4096)
    data = fill_until_full(table, clock, 200)
    with pytest.raises(TableFull):
        table.add("extra", b"x" * 200, clock.now + 1000)
    assert not table.exists("extra")
    assert_intact(table, data)


def test_after_a_delete_a_full_table_accepts_a_write_again(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table(SMALL, full_policy="raise", max_value_size=4096)
    data = fill_until_full(table, clock, 200)
    table.delete("k3")
    del data["k3"]
    table.set("again", b"y" * 200, clock.now + 1000)
    data["again"] = b"y" * 200
    assert_intact(table, data)


def test_a_table_full_of_expired_entries_is_not_full(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """Expired sessions are garbage: even the "raise" policy must reuse their space."""
    table = make_table(SMALL, full_policy="raise", max_value_size=4096)
    fill_until_full(table, clock, 200)
    clock.advance(100_000)
    data = {f"new{i}": value_for(f"new{i}", 200) for i in range(20)}
    for key, value in data.items():
        table.set(key, value, clock.now + 1000)
    assert_intact(table, data)


def test_evict_policy_makes_room_and_counts_evictions(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table(SMALL, full_policy="evict", max_value_size=4096)
    data = fill_until_full(table, clock, 200)
    probe_errors = table.stats().table_full_errors
    extra = {f"x{i}": value_for(f"x{i}", 200) for i in range(10)}
    for key, value in extra.items():
        clock.advance(1)  # each new entry is more recently used than everything before it
        table.set(key, value, clock.now + 50_000)
    assert {k: table.get(k) for k in extra} == extra
    missing = [k for k in data if table.get(k) != data[k]]
    stats = table.stats()
    assert missing, "nothing was evicted from a full table"
    assert all(table.get(k) is None for k in missing), "an entry was damaged, not evicted"
    assert stats.evictions == len(missing)
    assert stats.table_full_errors == probe_errors
    assert table.check().ok


@pytest.mark.usefixtures("seeded_random")
def test_evict_policy_drops_the_least_recently_used_entries(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """Sampled LRU within a class: nearly every victim comes from the half not read lately,
    although that half expires *later* (the read half expires in one hour)."""
    table = make_table(SMALL, full_policy="evict", max_value_size=4096)
    data = fill_until_full(table, clock, 200, lambda i: 3600.0 if i % 2 else 864_000.0)
    keys = list(data)
    clock.advance(10)
    for key in keys[1::2]:  # the odd half is read: used 10 s after the even half was written
        assert table.get(key) == data[key]
    clock.advance(10)
    to_evict = max(4, len(keys) // 6)
    for i in range(to_evict):
        table.set(f"x{i}", value_for(f"x{i}", 200), clock.now + 864_000)
    evicted = [k for k in keys if table.get(k) is None]
    evicted_new = [f"x{i}" for i in range(to_evict) if table.get(f"x{i}") is None]
    unread = [k for k in evicted if int(k[1:]) % 2 == 0]
    assert len(evicted) + len(evicted_new) == table.stats().evictions >= to_evict
    assert len(unread) >= 0.9 * len(evicted), (len(unread), len(evicted))


def test_max_value_size_above_half_the_data_space_is_refused(shm_name: str) -> None:
    """So that a value of the maximum size can always be made room for."""
    with pytest.raises(ValueError, match="max_value_size"):
        SessionTable(shm_name, SMALL, max_value_size=SMALL)


def test_evict_makes_room_for_a_value_of_the_maximum_size(
    make_table: TableFactory, clock: FakeClock
) -> None:
    largest = layout.Geometry.plan(SMALL).data_capacity // 2
    table = make_table(SMALL, full_policy="evict", max_value_size=largest)
    data = fill_until_full(table, clock, 200)
    table.set("huge", b"z" * largest, clock.now + 1000)
    assert table.get("huge") == b"z" * largest
    survivors = {k: v for k, v in data.items() if table.get(k) is not None}
    assert_intact(table, survivors)
    assert 0 < len(data) - len(survivors) == table.stats().evictions
