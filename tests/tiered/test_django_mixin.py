"""Django's own SessionTestsMixin (vendored verbatim from the running Django's source, see
tests/django_sessions_tests/) against the tiered engine, on real Redis and on real PostgreSQL
(the db L2), with the host listener up. Every test method of the mixin runs; none is excluded.
"""

from __future__ import annotations

import pytest
from django.test import SimpleTestCase

from django_shmsession.tiered.engine import SessionStore
from tests.django_sessions_tests import session_tests_mixin

SessionTestsMixin = session_tests_mixin()


@pytest.mark.usefixtures("redis_tiered", "listener")
class TestDjangoMixinTieredRedis(SessionTestsMixin, SimpleTestCase):
    backend = SessionStore


@pytest.mark.usefixtures("db_tiered", "listener")
class TestDjangoMixinTieredPostgres(SessionTestsMixin, SimpleTestCase):
    backend = SessionStore


@pytest.mark.usefixtures("redis_tiered")
class TestDjangoMixinTieredRedisNoListener(SessionTestsMixin, SimpleTestCase):
    """Without a listener every read revalidates with L2: the same contract must hold."""

    backend = SessionStore
