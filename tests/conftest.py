"""Suite-wide fixtures.

The table named in tests/settings.py is a fallback for code that reaches the engine without a
per-test name; it is removed at the end of the session so runs leave nothing in /dev/shm.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _unlink_settings_table() -> Iterator[None]:
    yield
    from django.conf import settings

    from django_shmsession import store
    from django_shmsession.table import SessionTable

    store.reset()
    SessionTable.unlink_name(settings.SHMSESSION["NAME"])
