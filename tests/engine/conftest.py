"""Fixtures for the engine tests: every test gets its own table name, unlinked afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import pytest

from django_shmsession import store
from django_shmsession.table import SessionTable

TEST_SIZE = "1M"


def unique_name() -> str:
    return f"/shmtest-{uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def shm_name(settings: Any) -> Iterator[str]:
    """Point SHMSESSION at a fresh, unique table; remove the segment when the test ends."""
    name = unique_name()
    settings.SHMSESSION = {"NAME": name, "SIZE": TEST_SIZE}
    yield name
    store.reset()
    SessionTable.unlink_name(name)
