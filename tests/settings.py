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
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
SHMSESSION = {
    "NAME": f"/shmsession-tests-{os.getpid()}",
    "SIZE": "8M",
}
