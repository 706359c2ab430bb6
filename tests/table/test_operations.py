"""Unit tests of each table operation, in one process, with a fake clock."""

from __future__ import annotations

import pytest

from django_shmsession import integrity, layout
from django_shmsession.exceptions import ShmSessionError, ValueTooLarge
from django_shmsession.table import CheckReport, SessionTable, TableStats, set_fault_hook

from .conftest import TableFactory
from .helpers import FakeClock, leftover_files, value_for

HOUR = 3600.0
#: The lock's fault point passed once per acquisition.
ACQUIRED = "lock.record:epoch:after"


def later(clock: FakeClock, seconds: float = HOUR) -> float:
    return clock.now + seconds


# -- get / set ---------------------------------------------------------------------------------


def test_get_of_a_missing_key_is_none(table: SessionTable) -> None:
    assert table.get("nope") is None


def test_set_then_get_returns_the_same_bytes(table: SessionTable, clock: FakeClock) -> None:
    table.set("a", b"hello", later(clock))
    assert table.get("a") == b"hello"


def test_set_overwrites_an_existing_value(table: SessionTable, clock: FakeClock) -> None:
    table.set("a", b"old value that is longer", later(clock))
    table.set("a", b"new", later(clock))
    assert table.get("a") == b"new"
    assert table.stats().entries == 1


def test_keys_do_not_share_values(table: SessionTable, clock: FakeClock) -> None:
    keys = [f"key-{i}" for i in range(200)]
    for key in keys:
        table.set(key, value_for(key, 100), later(clock))
    assert all(table.get(key) == value_for(key, 100) for key in keys)


def test_a_set_with_an_expiry_in_the_past_is_never_returned(
    table: SessionTable, clock: FakeClock
) -> None:
    table.set("a", b"x", clock.now - 1)
    assert table.get("a") is None
    assert not table.exists("a")


# -- add ---------------------------------------------------------------------------------------


def test_add_creates_a_missing_key(table: SessionTable, clock: FakeClock) -> None:
    assert table.add("a", b"1", later(clock)) is True
    assert table.get("a") == b"1"


def test_add_refuses_a_live_key_and_keeps_its_value(table: SessionTable, clock: FakeClock) -> None:
    table.set("a", b"first", later(clock))
    assert table.add("a", b"second", later(clock)) is False
    assert table.get("a") == b"first"


def test_add_takes_the_place_of_an_expired_entry(table: SessionTable, clock: FakeClock) -> None:
    table.set("a", b"old", later(clock, 10))
    clock.advance(11)
    assert table.add("a", b"new", later(clock)) is True
    assert table.get("a") == b"new"


# -- replace -----------------------------------------------------------------------------------


def test_replace_updates_a_live_key(table: SessionTable, clock: FakeClock) -> None:
    table.set("a", b"old", later(clock))
    assert table.replace("a", b"new", later(clock)) is True
    assert table.get("a") == b"new"


def test_replace_never_creates_a_key(table: SessionTable, clock: FakeClock) -> None:
    assert table.replace("a", b"new", later(clock)) is False
    assert table.get("a") is None
    assert table.stats().entries == 0


def test_replace_never_resurrects_a_deleted_key(table: SessionTable, clock: FakeClock) -> None:
    table.set("a", b"old", later(clock))
    table.delete("a")
    assert table.replace("a", b"new", later(clock)) is False
    assert table.get("a") is None


def test_replace_never_resurrects_an_expired_key(table: SessionTable, clock: FakeClock) -> None:
    table.set("a", b"old", later(clock, 10))
    clock.advance(11)
    assert table.replace("a", b"new", later(clock)) is False
    assert table.get("a") is None


def test_replace_can_extend_the_expiry(table: SessionTable, clock: FakeClock) -> None:
    table.set("a", b"v", later(clock, 10))
    assert table.replace("a", b"v2", later(clock, 100))
    clock.advance(50)
    assert table.get("a") == b"v2"


def test_replace_if_writes_only_over_the_expected_value(
    table: SessionTable, clock: FakeClock
) -> None:
    table.set("a", b"v1", later(clock))
    assert table.replace_if("a", b"v0", b"v2", later(clock)) is False
    assert table.get("a") == b"v1"
    assert table.replace_if("a", b"v1", b"v2", later(clock)) is True
    assert table.get("a") == b"v2"


def test_replace_if_never_creates_or_resurrects(table: SessionTable, clock: FakeClock) -> None:
    assert table.replace_if("a", b"", b"new", later(clock)) is False
    table.set("b", b"old", later(clock, 10))
    clock.advance(11)
    assert table.replace_if("b", b"old", b"new", later(clock)) is False
    assert table.get("a") is None
    assert table.get("b") is None


def test_replace_if_checks_its_arguments(table: SessionTable, clock: FakeClock) -> None:
    table.set("a", b"v1", later(clock))
    with pytest.raises(TypeError):
        table.replace_if("a", "v1", b"v2", later(clock))  # type: ignore[arg-type]
    with pytest.raises(ValueTooLarge):
        table.replace_if("a", b"v1", b"x" * (table.max_value_size + 1), later(clock))
    assert table.get("a") == b"v1"


# -- delete / exists ---------------------------------------------------------------------------


def test_delete_removes_and_reports_it(table: SessionTable, clock: FakeClock) -> None:
    table.set("a", b"v", later(clock))
    assert table.delete("a") is True
    assert table.get("a") is None
    assert table.delete("a") is False


def test_delete_of_a_missing_key_is_false(table: SessionTable) -> None:
    assert table.delete("never-there") is False


def test_delete_leaves_other_keys_in_the_same_table(table: SessionTable, clock: FakeClock) -> None:
    keys = [f"k{i}" for i in range(100)]
    for key in keys:
        table.set(key, value_for(key, 50), later(clock))
    for key in keys[::2]:
        assert table.delete(key)
    assert all(table.get(k) is None for k in keys[::2])
    assert all(table.get(k) == value_for(k, 50) for k in keys[1::2])
    assert table.check().ok


def test_exists_follows_set_delete_and_expiry(table: SessionTable, clock: FakeClock) -> None:
    assert not table.exists("a")
    table.set("a", b"v", later(clock, 10))
    assert table.exists("a")
    clock.advance(11)
    assert not table.exists("a")
    table.set("a", b"v", later(clock, 10))
    table.delete("a")
    assert not table.exists("a")


# -- expiry ------------------------------------------------------------------------------------


def test_an_entry_lives_until_its_expiry(table: SessionTable, clock: FakeClock) -> None:
    table.set("a", b"v", later(clock, 10))
    clock.advance(9.5)
    assert table.get("a") == b"v"
    clock.advance(1)
    assert table.get("a") is None


def test_all_operations_agree_at_the_exact_expiry_instant(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """Whatever the table decides at now == expires_at, get/exists/add/replace must agree."""
    table = make_table()
    table.set("a", b"v", clock.now)
    live = table.get("a") is not None
    assert table.exists("a") == live
    assert table.add("a", b"w", later(clock)) == (not live)


def test_lazy_reclaim_frees_the_space_of_an_expired_entry(
    table: SessionTable, clock: FakeClock
) -> None:
    table.set("a", value_for("a", 5000), later(clock, 10))
    used = table.stats().chunks_used
    assert used > 0
    clock.advance(11)
    assert table.get("a") is None
    table.set("b", b"x", later(clock))
    table.clear_expired()
    stats = table.stats()
    assert stats.entries == 1
    assert stats.chunks_used < used


# -- clear / clear_expired ---------------------------------------------------------------------


def test_clear_removes_everything_and_counts_it(table: SessionTable, clock: FakeClock) -> None:
    for i in range(5):
        table.set(f"k{i}", value_for(f"k{i}", 700), later(clock))
    assert table.clear() == 5
    stats = table.stats()
    assert stats.entries == 0
    assert stats.chunks_used == 0
    assert stats.value_bytes == 0
    assert all(table.get(f"k{i}") is None for i in range(5))
    assert table.clear() == 0


@pytest.mark.parametrize("batch_size", [1, 7, 256, 10_000])
def test_clear_expired_removes_only_expired_entries(
    table: SessionTable, clock: FakeClock, batch_size: int
) -> None:
    for i in range(300):
        lifetime = 10 if i % 3 else 1000  # 200 short-lived, 100 long-lived
        table.set(f"k{i}", value_for(f"k{i}", 40), later(clock, lifetime))
    clock.advance(20)
    assert table.clear_expired(batch_size=batch_size) == 200
    assert table.stats().entries == 100
    assert table.stats().expired == 200
    assert all(table.get(f"k{i}") == value_for(f"k{i}", 40) for i in range(0, 300, 3))
    assert table.clear_expired(batch_size=batch_size) == 0
    assert table.check().ok


# -- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["k" * 64, "é" * 32, "€" * 21 + "a", "x", "ключ", "a b\x00c"])
def test_keys_up_to_64_utf8_bytes_work(table: SessionTable, clock: FakeClock, key: str) -> None:
    table.set(key, b"v", later(clock))
    assert table.get(key) == b"v"
    assert table.exists(key)
    assert table.delete(key)


@pytest.mark.parametrize("key", ["k" * 65, "é" * 33, "€" * 22])
@pytest.mark.parametrize("operation", ["get", "set", "add", "replace", "delete", "exists"])
def test_keys_over_64_utf8_bytes_raise_value_error(
    table: SessionTable, clock: FakeClock, key: str, operation: str
) -> None:
    call = getattr(table, operation)
    args = (key,) if operation in ("get", "delete", "exists") else (key, b"v", later(clock))
    with pytest.raises(ValueError, match="64"):
        call(*args)
    assert table.stats().entries == 0


def test_keys_differing_only_in_case_or_last_byte_are_distinct(
    table: SessionTable, clock: FakeClock
) -> None:
    keys = ["a" * 63 + "b", "a" * 63 + "c", "A" * 63 + "b", "a" * 63]
    for key in keys:
        table.set(key, value_for(key, 10), later(clock))
    assert [table.get(k) for k in keys] == [value_for(k, 10) for k in keys]


# -- value sizes -------------------------------------------------------------------------------


def value_sizes(table: SessionTable, max_value_size: int) -> list[int]:
    """0 B, chunk boundaries (single and multi-chunk), and the maximum itself."""
    chunk = table.stats().chunk_size
    sizes = [0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 3 * chunk + 7, 300, 4096]
    return sorted({s for s in sizes if s <= max_value_size} | {max_value_size})


def test_every_value_size_up_to_the_maximum_round_trips(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table(max_value_size=65536)
    sizes = value_sizes(table, 65536)
    for size in sizes:
        table.set(f"v{size}", value_for(f"v{size}", size), later(clock))
    for size in sizes:
        assert table.get(f"v{size}") == value_for(f"v{size}", size), size
    assert table.stats().value_bytes == sum(sizes)
    assert table.check().ok


def test_an_empty_value_is_stored_not_missing(table: SessionTable, clock: FakeClock) -> None:
    table.set("empty", b"", later(clock))
    assert table.get("empty") == b""
    assert table.exists("empty")


def test_rewriting_with_growing_and_shrinking_values_does_not_leak_chunks(
    make_table: TableFactory, clock: FakeClock
) -> None:
    """A full_policy="raise" table would raise TableFull if overwrites leaked chunks."""
    table = make_table(256 * 1024, full_policy="raise", max_value_size=16384)
    baseline = table.stats().chunks_used
    for i in range(300):
        size = (i * 7919) % 16384
        table.set("k", value_for("k", size, i), later(clock))
        assert table.get("k") == value_for("k", size, i)
    table.delete("k")
    assert table.stats().chunks_used == baseline
    assert table.check().ok


# -- oversize ----------------------------------------------------------------------------------


def fill_some(table: SessionTable, clock: FakeClock, count: int = 20) -> dict[str, bytes]:
    data = {f"keep{i}": value_for(f"keep{i}", 100 + 97 * i) for i in range(count)}
    for key, value in data.items():
        table.set(key, value, later(clock))
    return data


def assert_intact(table: SessionTable, data: dict[str, bytes]) -> None:
    """Every key holds exactly its value and the table passes its own consistency check."""
    assert {k: table.get(k) for k in data} == data
    report = table.check()
    assert report.ok, report.problems


@pytest.mark.parametrize("operation", ["set", "add", "replace"])
def test_oversize_raises_value_too_large_naming_both_sizes(
    make_table: TableFactory, clock: FakeClock, operation: str
) -> None:
    table = make_table(max_value_size=1000)
    data = fill_some(table, clock, 5)
    target = "keep0" if operation == "replace" else "new"
    with pytest.raises(ValueTooLarge) as info:
        getattr(table, operation)(target, b"x" * 1001, later(clock))
    assert info.value.size == 1001
    assert info.value.max_size == 1000
    assert "1001" in str(info.value)
    assert "1000" in str(info.value)
    assert_intact(table, data)
    assert table.get("new") is None
    assert table.stats().oversize_errors == 1


def test_oversize_overwrite_keeps_the_old_value(table: SessionTable, clock: FakeClock) -> None:
    table.set("a", b"old", later(clock))
    with pytest.raises(ValueTooLarge):
        table.set("a", b"x" * 65537, later(clock))
    assert table.get("a") == b"old"


def test_value_too_large_is_a_value_error(table: SessionTable, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="65536"):
        table.set("a", b"x" * 70000, later(clock))


# -- stats / check -----------------------------------------------------------------------------


STAT_FIELDS = {
    *("name", "segment_size", "entry_capacity", "entries", "chunk_size", "chunk_capacity"),
    *("chunks_used", "value_bytes", "overhead_bytes", "hits", "misses", "sets", "deletes"),
    *("evictions", "expired", "lock_waits", "lock_recoveries", "repairs", "table_full_errors"),
    "oversize_errors",
}


def test_stats_of_a_new_table(table: SessionTable, shm_name: str) -> None:
    stats = table.stats()
    assert isinstance(stats, TableStats)
    as_dict = stats.as_dict()
    assert set(as_dict) >= STAT_FIELDS
    per_class = {"class_entries", "class_evictions"}
    assert all(isinstance(v, int | float | str) for k, v in as_dict.items() if k not in per_class)
    assert all(as_dict[k] == [0] * layout.PRIORITY_CLASSES for k in per_class)
    assert stats.name == shm_name
    assert stats.segment_size == table.size == 1024 * 1024
    assert stats.entries == stats.chunks_used == stats.value_bytes == 0
    assert stats.entry_capacity > 0
    assert stats.chunk_size > 0
    assert 0 < stats.chunk_capacity * stats.chunk_size < stats.segment_size
    # nothing stored yet: no slack in chunks; the fixed cost is the metadata
    assert stats.overhead_bytes == 0
    assert 0 < stats.metadata_bytes < stats.segment_size


def test_stats_count_operations(table: SessionTable, clock: FakeClock) -> None:
    table.set("a", b"x" * 300, later(clock))
    table.set("b", b"y" * 5000, later(clock))
    table.get("a")
    table.get("a")
    table.get("missing")
    table.delete("b")
    table.delete("missing")
    stats = table.stats()
    assert (stats.sets, stats.hits, stats.misses, stats.deletes) == (2, 2, 1, 1)
    assert stats.entries == 1
    assert stats.value_bytes == 300
    assert stats.chunks_used * stats.chunk_size >= 300


def test_stats_are_shared_between_handles(make_table: TableFactory, clock: FakeClock) -> None:
    first = make_table()
    second = make_table(None)
    first.set("a", b"v", later(clock))
    assert second.get("a") == b"v"
    assert first.stats().hits == 1
    assert first.stats().as_dict() == second.stats().as_dict()


def test_overhead_is_reported_and_bounded(table: SessionTable, clock: FakeClock) -> None:
    """Memory overhead is visible in stats and accounts for the segment."""
    for i in range(50):
        table.set(f"k{i}", value_for(f"k{i}", 300), later(clock))
    stats = table.stats()
    assert stats.value_bytes == 50 * 300
    assert stats.overhead_bytes > 0
    assert stats.value_bytes + stats.overhead_bytes <= stats.segment_size


def test_check_of_a_healthy_table(table: SessionTable, clock: FakeClock) -> None:
    for i in range(30):
        table.set(f"k{i}", value_for(f"k{i}", 50 * i), later(clock))
    report = table.check()
    assert isinstance(report, CheckReport)
    assert report.ok
    assert report.problems == []
    assert report.repaired is False
    assert report.entries == 30
    assert report.as_dict()["ok"] is True


def test_check_with_repair_on_a_healthy_table_changes_nothing(
    table: SessionTable, clock: FakeClock
) -> None:
    data = fill_some(table, clock)
    report = table.check(repair=True)
    assert report.ok
    assert report.repaired is False
    assert_intact(table, data)


# -- handles -----------------------------------------------------------------------------------


def test_name_and_size_properties(table: SessionTable, shm_name: str) -> None:
    assert table.name == shm_name
    assert table.size == 1024 * 1024


def test_a_second_handle_without_size_sees_the_data(
    make_table: TableFactory, clock: FakeClock
) -> None:
    make_table().set("a", b"v", later(clock))
    other = make_table(None)
    assert other.size == 1024 * 1024
    assert other.get("a") == b"v"


def test_close_keeps_the_data_for_the_next_handle(
    make_table: TableFactory, clock: FakeClock
) -> None:
    first = make_table()
    first.set("a", b"v", later(clock))
    first.close()
    assert make_table(None).get("a") == b"v"


def test_close_twice_is_harmless(make_table: TableFactory) -> None:
    table = make_table()
    table.close()
    table.close()
    assert make_table(None).stats().entries == 0


# -- argument types, closed handles, batching --------------------------------------------------


def test_keys_must_be_str_and_values_bytes(table: SessionTable, clock: FakeClock) -> None:
    with pytest.raises(TypeError):
        table.set(b"bytes-key", b"v", later(clock))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        table.set("k", "a str value", later(clock))  # type: ignore[arg-type]
    assert table.stats().entries == 0


def test_a_closed_handle_refuses_work_with_a_clear_error(
    make_table: TableFactory, clock: FakeClock
) -> None:
    table = make_table()
    table.close()
    with pytest.raises(ShmSessionError, match="closed"):
        table.get("a")
    with pytest.raises(ShmSessionError, match="closed"):
        table.set("a", b"v", later(clock))


def test_clear_expired_releases_the_lock_between_batches(
    make_table: TableFactory, table: SessionTable, clock: FakeClock
) -> None:
    """Counted with the lock's fault hook: one acquisition per batch, not one for the sweep."""
    for i in range(100):
        table.set(f"k{i}", b"v", later(clock, 10))
    clock.advance(20)
    acquisitions: list[str] = []
    set_fault_hook(lambda point: acquisitions.append(point) if point == ACQUIRED else None)
    try:
        hooked = make_table(None)  # the lock wraps its stores when a hook is set at open
        assert hooked.clear_expired(batch_size=10) == 100
    finally:
        set_fault_hook(None)
    assert len(acquisitions) >= 10


def test_check_releases_the_lock_between_batches(
    make_table: TableFactory, table: SessionTable, clock: FakeClock
) -> None:
    for i in range(300):
        table.set(f"k{i}", b"v" * (i % 700), later(clock, 10))
    acquisitions: list[str] = []
    set_fault_hook(lambda point: acquisitions.append(point) if point == ACQUIRED else None)
    try:
        hooked = make_table(None)
        report = hooked.check(batch_size=16)
    finally:
        set_fault_hook(None)
    assert report.ok, report.problems
    assert report.counts_checked
    assert report.entries == 300
    assert len(acquisitions) >= 300 // 16


def test_a_check_racing_writes_reports_no_false_problems(
    table: SessionTable, clock: FakeClock
) -> None:
    """Writes between the batches of a check: no problem reported, counts flagged unchecked."""
    for i in range(200):
        table.set(f"k{i}", b"v" * 600, later(clock, 10))
    checker = table._locked(integrity.BatchCheck, table._memory, 8)
    rounds = 0
    while not table._locked(checker.step, table._memory):
        rounds += 1
        table.set(f"k{rounds % 250}", b"w" * (rounds % 1500), later(clock, 10))
        table.delete(f"k{(rounds * 7) % 250}")
        if rounds % 40 == 0:
            table.clear()
    assert checker.problems == []
    assert not checker.counts_checked


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"full_policy": "drop"}, "full_policy"),
        ({"lock_timeout": 0}, "lock_timeout"),
        ({"lock_timeout": -1.0}, "lock_timeout"),
        ({"max_value_size": 0}, "max_value_size"),
    ],
)
def test_bad_constructor_arguments_raise_value_error(
    shm_name: str, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        SessionTable(shm_name, 1024 * 1024, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, -4096, 1.5])
def test_a_bad_size_raises_value_error_and_creates_nothing(shm_name: str, size: object) -> None:
    with pytest.raises(ValueError, match="size"):
        SessionTable(shm_name, size)  # type: ignore[arg-type]
    assert leftover_files(shm_name) == []


@pytest.mark.parametrize("expires_at", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_expiry_is_refused(
    table: SessionTable, clock: FakeClock, expires_at: float
) -> None:
    with pytest.raises(ValueError, match="finite"):
        table.set("k", b"v", expires_at)
    assert table.stats().entries == 0


def test_clear_expired_needs_a_positive_batch(table: SessionTable) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        table.clear_expired(batch_size=0)
