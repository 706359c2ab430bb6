"""Django's own SessionTestsMixin (vendored verbatim from the running Django's source, see
tests/django_sessions_tests/) against the plain engine, on a fresh table per test (the autouse
``shm_name`` fixture of tests/engine/conftest.py). Every test method of the mixin runs."""

from __future__ import annotations

from django.test import SimpleTestCase

from django_shmsession.backend import SessionStore
from tests.django_sessions_tests import session_tests_mixin

SessionTestsMixin = session_tests_mixin()


class TestDjangoMixinPlain(SessionTestsMixin, SimpleTestCase):
    backend = SessionStore
