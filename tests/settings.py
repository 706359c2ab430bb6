"""Django settings for the test suite (see pyproject's DJANGO_SETTINGS_MODULE)."""

from __future__ import annotations

import os

SECRET_KEY = "django-shmsession-tests-not-secret"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django_shmsession",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
SESSION_ENGINE = "django_shmsession.backend"
# Tests that touch the table override NAME with a unique name (tests/engine/conftest.py); this one
# is a per-run fallback that tests/conftest.py unlinks at the end of the session.
SHMSESSION = {
    "NAME": f"/shmsession-tests-{os.getpid()}",
    "SIZE": "8M",
}
