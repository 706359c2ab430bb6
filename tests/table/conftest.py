"""Fixtures for the table tests.

Every segment a test creates gets a unique name and is unlinked afterwards, even when the test
fails, so a broken run never leaves pages pinned in /dev/shm for the next one. The teardown also
checks that ``unlink_name`` really removed every file carrying the name: a leaked semaphore or
segment is a bug of its own.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from django_shmsession.table import SessionTable

from .helpers import FakeClock, leftover_files, unique_name

# Big enough for a few hundred multi-chunk values, small enough to create in a few milliseconds.
DEFAULT_SIZE = 1024 * 1024

TableFactory = Callable[..., SessionTable]

#: Seed for tests whose assertion is statistical (sampled eviction draws from ``random``).
SAMPLING_SEED = 20261206


@pytest.fixture
def seeded_random() -> Iterator[None]:
    """Seed the ``random`` module (which sampled eviction draws from), then restore its state.

    "Nearly every victim is least recently used" holds for a sample, not for every draw: with
    the 90 % bound, test_full's LRU test failed by chance for 1 seed in 300 (test_priority's for
    none; measured 2026-12-06), and CI runs it four times (suite and three tox envs), so unseeded
    it failed about one CI run in 75, as it did on 46e53e4. A policy that is not LRU still fails
    them under any seed: a random victim is from the read half about half the time.
    """
    state = random.getstate()
    random.seed(SAMPLING_SEED)
    yield
    random.setstate(state)


@pytest.fixture
def clock() -> FakeClock:
    """A clock the test moves by hand, so expiry is tested without sleeping."""
    return FakeClock()


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A unique segment name, unlinked (segment and semaphores) when the test ends."""
    name = unique_name()
    yield name
    SessionTable.unlink_name(name)
    assert leftover_files(name) == [], f"unlink_name({name!r}) left files behind"


@pytest.fixture
def name_factory() -> Iterator[Callable[[], str]]:
    """For tests that need several tables: each call gives a new name, all unlinked at the end."""
    names: list[str] = []

    def make() -> str:
        names.append(unique_name())
        return names[-1]

    yield make
    for name in names:
        SessionTable.unlink_name(name)
    assert [f for name in names for f in leftover_files(name)] == []


@pytest.fixture
def make_table(shm_name: str, clock: FakeClock) -> Iterator[TableFactory]:
    """Create (or open) handles on ``shm_name``; every handle is closed at teardown.

    The fake clock is the default so that no test depends on the wall clock by accident.
    """
    handles: list[SessionTable] = []

    def make(size: int | None = DEFAULT_SIZE, **kwargs: Any) -> SessionTable:
        kwargs.setdefault("clock", clock)
        handle = SessionTable(shm_name, size, **kwargs)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.close()


@pytest.fixture
def table(make_table: TableFactory) -> SessionTable:
    """A fresh 1 MiB table with default settings and the fake clock."""
    return make_table()
