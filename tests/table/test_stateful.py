"""Hypothesis drives random operation sequences against a dict model of the table.

A fake clock moves forward as a rule, so expiry is part of every run. The table is small, so
values up to the maximum size fill it: with policy "evict" the model learns about evictions from
``stats().evictions`` (sampled eviction is not predictable, but every vanished key must be
accounted for by the counter, and no entry of a class may go while one of a lower class stays);
with policy "raise" a TableFull must leave the model unchanged. Each write carries a priority
class, and ``scan()`` must return exactly the model's live entries with their classes.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from django_shmsession.exceptions import TableFull, ValueTooLarge
from django_shmsession.layout import FIXED_SIZE
from django_shmsession.table import SessionTable

from .helpers import FakeClock, unique_name, value_for

SIZE = FIXED_SIZE + 64 * 1024
MAX_VALUE = 8192

KEYS = st.sampled_from([f"k{i}" for i in range(20)] + ["é" * 32, "x" * 64])
SIZES = st.one_of(st.integers(0, 600), st.integers(2048, MAX_VALUE), st.just(MAX_VALUE))
LIFETIMES = st.sampled_from([0.5, 1.0, 5.0, 60.0, 3600.0, 86400.0, 864000.0])
STEPS = st.sampled_from([0.25, 0.5, 1.0, 3.0, 30.0])
CLASSES = st.integers(0, 2)


class TableModel(RuleBasedStateMachine):
    """The table under test next to ``model``: key -> (value, expires_at, priority)."""

    full_policy = "evict"

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.name = unique_name()
        self.table = SessionTable(
            self.name,
            SIZE,
            max_value_size=MAX_VALUE,
            full_policy=self.full_policy,
            clock=self.clock,
        )
        self.model: dict[str, tuple[bytes, float, int]] = {}
        self.version = 0
        self.evictions = 0

    def teardown(self) -> None:
        self.table.close()
        SessionTable.unlink_name(self.name)

    # -- helpers --------------------------------------------------------------------------------

    def live(self, key: str) -> bytes | None:
        entry = self.model.get(key)
        if entry is None or entry[1] <= self.clock.now:
            return None
        return entry[0]

    def value(self, key: str, size: int) -> bytes:
        self.version += 1
        return value_for(key, size, self.version)

    def write(
        self, operation: str, key: str, size: int, lifetime: float, priority: int = 0
    ) -> bool | None:
        """Run a write; None when the table was full (policy "raise")."""
        value = self.value(key, size)
        expires_at = self.clock.now + lifetime
        try:
            result = getattr(self.table, operation)(key, value, expires_at, priority)
        except TableFull:
            assert self.full_policy == "raise"
            event("table full")
            return None
        if result is not False:
            self.model[key] = (value, expires_at, priority)
        self.account_for_evictions(key)
        return bool(result) if operation != "set" else True

    def account_for_evictions(self, written: str) -> None:
        """Drop the keys an eviction removed; each must be counted in stats().evictions."""
        evictions = self.table.stats().evictions
        if evictions == self.evictions:
            return
        assert self.full_policy == "evict"
        event("eviction")
        gone = [
            key
            for key in self.model
            if key != written and self.live(key) is not None and self.table.get(key) is None
        ]
        assert 0 < len(gone) <= evictions - self.evictions
        highest = max(self.model[key][2] for key in gone)
        stayed_lower = [
            key
            for key, (_v, _e, klass) in self.model.items()
            if key not in gone and key != written and klass < highest and self.live(key)
        ]
        assert not stayed_lower, f"class {highest} evicted while {stayed_lower} stayed"
        for key in gone:
            del self.model[key]
        self.evictions = evictions

    # -- rules ----------------------------------------------------------------------------------

    @initialize(count=st.integers(0, 11), lifetime=LIFETIMES)
    def nearly_fill(self, count: int, lifetime: float) -> None:
        """Start most runs close to full, so that evictions and TableFull are common."""
        for i in range(count):
            self.write("set", f"base-{i}", 4000, lifetime)

    @rule(key=KEYS, size=SIZES, lifetime=LIFETIMES, priority=CLASSES)
    def set(self, key: str, size: int, lifetime: float, priority: int) -> None:
        self.write("set", key, size, lifetime, priority)

    @rule(key=KEYS, size=SIZES, lifetime=LIFETIMES, priority=CLASSES)
    def add(self, key: str, size: int, lifetime: float, priority: int) -> None:
        was_live = self.live(key) is not None
        result = self.write("add", key, size, lifetime, priority)
        assert result is None or result == (not was_live)

    @rule(key=KEYS, size=SIZES, lifetime=LIFETIMES, priority=CLASSES)
    def replace(self, key: str, size: int, lifetime: float, priority: int) -> None:
        was_live = self.live(key) is not None
        result = self.write("replace", key, size, lifetime, priority)
        assert result is None or result == was_live

    @rule(key=KEYS, size=SIZES, lifetime=LIFETIMES, priority=CLASSES, stale=st.booleans())
    def replace_if(self, key: str, size: int, lifetime: float, priority: int, stale: bool) -> None:
        """A compare-and-set against the live value, or (``stale``) against an older one."""
        current = self.live(key)
        expected = (current or b"") + b"~" if stale or current is None else current
        value = self.value(key, size)
        expires_at = self.clock.now + lifetime
        try:
            result = self.table.replace_if(key, expected, value, expires_at, priority)
        except TableFull:
            assert self.full_policy == "raise"
            event("table full")
            return
        assert result == (current is not None and not stale)
        if result:
            self.model[key] = (value, expires_at, priority)
        self.account_for_evictions(key)

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        assert self.table.delete(key) == (self.live(key) is not None)
        self.model.pop(key, None)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        assert self.table.get(key) == self.live(key)

    @rule(key=KEYS)
    def exists(self, key: str) -> None:
        assert self.table.exists(key) == (self.live(key) is not None)

    @rule(key=KEYS, extra=st.integers(1, 10_000))
    def oversize(self, key: str, extra: int) -> None:
        with pytest.raises(ValueTooLarge) as info:
            self.table.set(key, b"o" * (MAX_VALUE + extra), self.clock.now + 60)
        assert (info.value.size, info.value.max_size) == (MAX_VALUE + extra, MAX_VALUE)

    @rule(seconds=STEPS)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(batch=st.sampled_from([1, 3, 256]))
    def clear_expired(self, batch: int) -> None:
        expired = [k for k in self.model if self.live(k) is None]
        removed = self.table.clear_expired(batch_size=batch)
        assert removed <= len(expired)
        for key in expired:
            del self.model[key]
        assert self.table.stats().entries == len(self.model)

    @precondition(lambda self: len(self.model) > 3)
    @rule()
    def clear(self) -> None:
        assert self.table.clear() >= sum(1 for k in self.model if self.live(k) is not None)
        self.model.clear()

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def every_live_key_holds_its_value(self) -> None:
        for key in list(self.model):
            assert self.table.get(key) == self.live(key), key

    @invariant()
    def a_scan_returns_the_live_entries_with_their_classes(self) -> None:
        items, cursor = [], 0
        while True:
            batch, cursor = self.table.scan(cursor, batch_size=7)
            items.extend(batch)
            if cursor == 0:
                break
        scanned = {item.key: (item.value, item.expires_at, item.priority) for item in items}
        assert len(scanned) == len(items), "a key appeared twice in one quiet scan"
        live = {k: entry for k, entry in self.model.items() if self.live(k) is not None}
        assert scanned == live

    @invariant()
    def the_class_counts_add_up(self) -> None:
        stats = self.table.stats()
        assert sum(stats.class_entries) == stats.entries

    @invariant()
    def the_table_is_consistent(self) -> None:
        report = self.table.check()
        assert report.ok, report.problems


class RaisingTableModel(TableModel):
    full_policy = "raise"


SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestEvictingTable = pytest.mark.slow(TableModel.TestCase)
TestEvictingTable.settings = SETTINGS
TestRaisingTable = pytest.mark.slow(RaisingTableModel.TestCase)
TestRaisingTable.settings = SETTINGS
