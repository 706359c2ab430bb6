"""The guard words: what the listener records about the last invalidation of a stripe, and when
a worker may keep a copy it stored while the stripe moved without asking L2.

Pure tests of :mod:`django_shmsession.tiered.words` on a word store, a property test against a
model of the window, and the engine's use of it on the real Redis and PostgreSQL (the
invalidation is applied by a real, not running, listener at the exact point of the window)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import django
import pytest
from hypothesis import given
from hypothesis import strategies as st

from django_shmsession import store
from django_shmsession.tiered import codec, counters, words
from django_shmsession.tiered.engine import SessionStore
from django_shmsession.tiered.l2 import DELETED, Invalidation
from django_shmsession.tiered.listener import Listener
from django_shmsession.tiered.runtime import get_l2

from .conftest import held_version, saved


class Words:
    """The application words alone (what the listener and workers touch here)."""

    def __init__(self, start: int = 0) -> None:
        self.values = [start] * 8

    def read_app_word(self, index: int) -> int:
        return self.values[index]

    def write_app_word(self, index: int, value: int) -> None:
        assert 0 <= value < 1 << 64
        self.values[index] = value


def _tag(key: str) -> int:
    import zlib

    return (zlib.crc32(key.encode()) >> 8) & 0xFF


def keys_on_one_stripe() -> tuple[str, str, str]:
    """A key, another key on its stripe with another tag, and one with the same tag."""
    first = "k" * 31 + "0"
    other = same_tag = None
    for n in itertools.count(1):
        key = f"k{n:031d}"
        if words.stripe(key) != words.stripe(first):
            continue
        if _tag(key) != _tag(first) and other is None:
            other = key
        elif _tag(key) == _tag(first) and key != first and same_tag is None:
            same_tag = key
        if other and same_tag:
            return first, other, same_tag
    raise AssertionError("unreachable")


KEY, OTHER, SAME_TAG = keys_on_one_stripe()


def window(*bumps: tuple[str | None, int], start: int = 0) -> tuple[int, int]:
    """The guard word of KEY's stripe before and after the listener applied ``bumps`` (a key,
    or None for a flush, and a version)."""
    table = Words(start)
    before = words.guard(table, KEY)
    for key, version in bumps:
        if key is None:
            words.bump_all_guards(table)
        else:
            words.bump_guard(table, key, version)
    return before, words.guard(table, KEY)


def test_an_unmoved_stripe_keeps_the_copy() -> None:
    assert words.copy_survives(*window(), KEY, 5)


@pytest.mark.parametrize("notified", [5, 4, 1])
def test_one_invalidation_no_newer_than_the_copy_keeps_it(notified: int) -> None:
    assert words.copy_survives(*window((KEY, notified)), KEY, 5)


def test_one_newer_invalidation_asks_l2() -> None:
    assert not words.copy_survives(*window((KEY, 6)), KEY, 5)


def test_one_newer_invalidation_of_the_key_is_known_stale() -> None:
    assert words.copy_is_stale(*window((KEY, 6)), KEY, 5)
    assert not words.copy_is_stale(*window((KEY, 5)), KEY, 5)
    assert not words.copy_is_stale(*window((OTHER, 6)), KEY, 5)
    assert not words.copy_is_stale(*window((KEY, 6), (KEY, 7)), KEY, 5)  # two: ask L2
    assert not words.copy_is_stale(*window((KEY, DELETED)), KEY, 5)
    assert not words.copy_is_stale(*window(), KEY, 5)


def test_a_delete_or_a_flush_asks_l2() -> None:
    assert not words.copy_survives(*window((KEY, DELETED)), KEY, 5)
    assert not words.copy_survives(*window((None, 0)), KEY, 5)


def test_another_keys_invalidation_keeps_the_copy_whatever_its_version() -> None:
    assert words.stripe(OTHER) == words.stripe(KEY)
    assert words.copy_survives(*window((OTHER, 10**9)), KEY, 5)
    assert not words.copy_survives(*window((OTHER, DELETED)), KEY, 5)


def test_a_tag_collision_only_compares_versions() -> None:
    assert words.copy_survives(*window((SAME_TAG, 3)), KEY, 5)
    assert not words.copy_survives(*window((SAME_TAG, 9)), KEY, 5)


def test_two_invalidations_ask_l2_even_if_each_is_harmless() -> None:
    assert not words.copy_survives(*window((KEY, 4), (KEY, 5)), KEY, 5)
    assert not words.copy_survives(*window((OTHER, 1), (OTHER, 2)), KEY, 5)


def test_the_count_wraps() -> None:
    last = ((1 << 24) - 1) << 40
    before, after = window((KEY, 5), start=last)
    assert words.guard_count(before) == (1 << 24) - 1
    assert words.guard_count(after) == 0
    assert words.copy_survives(before, after, KEY, 5)


def test_versions_compare_across_the_low_bits_wrap() -> None:
    base = 7 << 31  # the copy's low 31 bits are small, the invalidation's large
    assert words.copy_survives(*window((KEY, base - 3)), KEY, base + 2)
    assert not words.copy_survives(*window((KEY, base + 3)), KEY, base - 2)


def test_bumping_moves_the_word_and_its_count() -> None:
    before, after = window((KEY, 5))
    assert after != before
    assert words.guard_count(after) == words.guard_count(before) + 1


_VERSIONS = st.integers(min_value=1 << 30, max_value=(1 << 62) - 1)
_EVENT = st.tuples(st.sampled_from(["key", "other", "same_tag", "flush"]), st.integers(-5, 5))


@given(copy=_VERSIONS, events=st.lists(_EVENT, max_size=4), start=st.integers(0, (1 << 64) - 1))
def test_a_kept_copy_is_never_older_than_an_invalidation_of_its_key(
    copy: int, events: list[tuple[str, int]], start: int
) -> None:
    """Model: the copy may be kept only if every invalidation of ITS key in the window was at a
    version no newer than the copy (a flush or a delete counts as newer). Whenever
    copy_survives says keep, the model must agree; with no invalidation of the key or only
    one, no newer, it must say keep. (Versions of one key within 2**29 of each other: L2
    numbers one session's writes in order, and a window holds few of them.)"""
    table = Words()
    table.write_app_word(words.stripe(KEY), start)
    before = words.guard(table, KEY)
    safe = True
    for kind, offset in events:
        version = max(copy + offset, 1)
        if kind == "flush":
            words.bump_all_guards(table)
            safe = False
        elif kind == "key":
            deleted = offset == -5
            words.bump_guard(table, KEY, DELETED if deleted else version)
            safe = safe and not deleted and version <= copy
        else:
            words.bump_guard(table, OTHER if kind == "other" else SAME_TAG, version)
    kept = words.copy_survives(before, words.guard(table, KEY), KEY, copy)
    stale = words.copy_is_stale(before, words.guard(table, KEY), KEY, copy)
    if kept:
        assert safe, (events, copy)
    assert not (kept and stale)
    if stale:  # only ever for a later version of this key, or a key that shares its tag
        assert any(
            (kind == "key" and offset != -5 and copy + offset > copy) or kind == "same_tag"
            for kind, offset in events
        ), (events, copy)
    if not events or (len(events) == 1 and events[0][0] == "other"):
        assert kept
    if len(events) == 1 and events[0][0] == "key" and safe:
        assert kept


# -- the engine on real L2s ---------------------------------------------------------------------


class VersionCalls:
    """Counts the engine's ``version`` round trips to L2 (the recheck this change avoids)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        l2 = get_l2()
        real = l2.version

        def counted(key: str) -> int | None:
            self.count += 1
            return real(key)

        monkeypatch.setattr(l2, "version", counted)


def during_update(monkeypatch: pytest.MonkeyPatch, then: Callable[[str, int], None]) -> None:
    """Run ``then(key, version)`` right after L2 took the update, before L1 gets its copy: where
    the listener applies the save's own invalidation when it runs ahead of the worker."""
    l2 = get_l2()
    real = l2.update

    def update(key: str, payload: bytes, expires_at: float, priority: int = 0) -> int | None:
        version = real(key, payload, expires_at, priority)
        if version is not None:
            then(key, version)
        return version

    monkeypatch.setattr(l2, "update", update)


def test_a_save_overtaken_by_its_own_invalidation_keeps_its_copy_without_asking_l2(
    bare_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = saved(n=1).session_key or ""
    table = store.get_table()
    during_update(monkeypatch, lambda k, v: bare_listener._apply(table, Invalidation(k, v)))
    drops = counters.snapshot()["guard_drops"]
    s = SessionStore(key)
    s["n"] = 2  # loads (with no listener beating, a revalidation: counted before the save)
    calls = VersionCalls(monkeypatch)
    s.save()
    assert calls.count == 0
    assert held_version(key) == get_l2().version(key)
    assert counters.snapshot()["guard_drops"] == drops


def test_a_save_overtaken_by_a_later_write_drops_its_copy(
    bare_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another host wrote the session right after this save and its invalidation was applied
    before this worker stored its copy: the copy is older than L2 and must not stay."""
    key = saved(n=1).session_key or ""
    table = store.get_table()
    l2 = get_l2()
    real_update = l2.update

    def other_host_writes(k: str, mine: int) -> None:
        record = l2.fetch(k)
        assert record is not None
        theirs = real_update(k, record.payload, record.expires_at)
        assert theirs is not None
        assert theirs > mine
        bare_listener._apply(table, Invalidation(k, theirs))

    during_update(monkeypatch, other_host_writes)
    s = SessionStore(key)
    s["n"] = 2
    calls = VersionCalls(monkeypatch)
    s.save()
    assert table.get(key) is None
    assert calls.count == 0  # the guard word alone showed L2 newer


def test_a_slow_save_of_an_older_version_does_not_stay_over_a_newer_copy(
    bare_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two saves of one session on this host: W1's L2 write (v1) returns, W2 writes v2 and
    stores its copy, the listener applies v1 (keeps v2: newer) and v2 (keeps it: that very
    version), and only then does the slow W1 store v1 over v2. Both invalidations are in W1's
    window, so W1 must ask L2 and drop its copy, or v1 would stay with nothing to remove it."""
    key = saved(n=1).session_key or ""
    table = store.get_table()
    l2 = get_l2()
    real_update = l2.update

    def second_worker(k: str, v1: int) -> None:
        record = l2.fetch(k)
        assert record is not None
        v2 = real_update(k, record.payload, record.expires_at)
        assert v2 is not None
        table.set(k, codec.encode(v2, 0.0, record.expires_at, record.payload), record.expires_at)
        bare_listener._apply(table, Invalidation(k, v1))
        bare_listener._apply(table, Invalidation(k, v2))
        assert held_version(k) == v2

    during_update(monkeypatch, second_worker)
    s = SessionStore(key)
    s["n"] = 2
    calls = VersionCalls(monkeypatch)
    s.save()
    assert calls.count == 1
    assert table.get(key) is None


def test_the_listener_records_an_invalidation_before_it_looks_at_the_copy(
    bare_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener reads the copy (v2, kept) and a slow worker then stores v1 over it: the v2
    invalidation must already be in the worker's window when the worker reads its guard."""
    key = saved(n=1).session_key or ""
    table = store.get_table()
    record = get_l2().fetch(key)
    assert record is not None
    v1 = record.version
    table.set(key, codec.encode(v1 + 1, 0.0, record.expires_at, record.payload), 2e9)
    before = words.guard(table, key)
    real_get = table.get

    def get(k: str) -> bytes | None:
        found = real_get(k)
        # The worker stores its older copy right after the listener looked.
        table.set(k, codec.encode(v1, 0.0, record.expires_at, record.payload), 2e9)
        return found

    monkeypatch.setattr(table, "get", get)
    bare_listener._apply(table, Invalidation(key, v1 + 1))
    monkeypatch.undo()
    assert not words.copy_survives(before, words.guard(table, key), key, v1)


def test_a_fill_beside_another_keys_invalidation_keeps_its_copy(
    bare_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = saved(n=1).session_key or ""
    table = store.get_table()
    other = next(
        f"{key[:-6]}{n:06d}"
        for n in itertools.count()
        if words.stripe(f"{key[:-6]}{n:06d}") == words.stripe(key)
        and _tag(f"{key[:-6]}{n:06d}") != _tag(key)
    )
    table.delete(key)
    l2 = get_l2()
    real_fetch = l2.fetch

    def fetch(k: str) -> Any:
        record = real_fetch(k)
        bare_listener._apply(table, Invalidation(other, 12345))
        return record

    monkeypatch.setattr(l2, "fetch", fetch)
    calls = VersionCalls(monkeypatch)
    assert SessionStore(key).load() == {"n": 1}
    assert held_version(key) is not None
    assert calls.count == 0


@pytest.mark.skipif(
    django.VERSION < (5, 1), reason="SessionBase async methods exist from Django 5.1"
)
def test_an_async_save_overtaken_by_its_own_invalidation_keeps_its_copy(
    bare_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = saved(n=1).session_key or ""
    table = store.get_table()
    l2 = get_l2()
    real = l2.aupdate

    async def aupdate(k: str, payload: bytes, expires_at: float, priority: int = 0) -> int | None:
        version = await real(k, payload, expires_at, priority)
        assert version is not None
        bare_listener._apply(table, Invalidation(k, version))
        return version

    monkeypatch.setattr(l2, "aupdate", aupdate)

    async def save() -> None:
        s = SessionStore(key)
        await s.aset("n", 2)
        await s.asave()

    asyncio.run(save())
    assert held_version(key) == get_l2().version(key)


def test_a_fill_run_again_after_its_add_still_checks_the_guard(bare_listener: Listener) -> None:
    """An async fill's L1 step that stored its copy and then hit WouldBlock runs again whole in
    a thread: its add now finds its own copy, and the guard check must still drop it when a
    later write was invalidated in the window (found by a stress run with real processes)."""
    key = saved(n=1).session_key or ""
    table = store.get_table()
    record = get_l2().fetch(key)
    assert record is not None
    table.delete(key)
    before = words.guard(table, key)
    bare_listener._apply(table, Invalidation(key, record.version + 1))  # another host wrote
    now = time.time()
    first_run = codec.encode(record.version, now, record.expires_at, record.payload)
    assert table.add(key, first_run, record.expires_at)
    SessionStore(key)._filled(table, key, record, now, before, recheck=False, absent=True)
    assert table.get(key) is None


def test_a_fill_that_finds_another_copy_leaves_it_alone(bare_listener: Listener) -> None:
    key = saved(n=1).session_key or ""
    table = store.get_table()
    record = get_l2().fetch(key)
    assert record is not None
    before = words.guard(table, key)
    bare_listener._apply(table, Invalidation(key, record.version + 1))
    newer = codec.encode(record.version + 1, time.time(), record.expires_at, b'{"n": 2}')
    table.set(key, newer, record.expires_at)  # a save on this host, after the invalidation
    SessionStore(key)._filled(table, key, record, time.time(), before, recheck=False, absent=True)
    assert table.get(key) == newer
