"""Settings of the test project.

Environment variables (all optional):
- SHMSESSION_NAME: the table's POSIX name (default: derived from this project).
- SHMSESSION_SIZE: the segment size, e.g. "64M" (default "64M").
- SHMSESSION_LOCK_TIMEOUT: seconds, SHMSESSION["LOCK_TIMEOUT"] (default: the engine's).
- SHMSESSION_MAX_SESSION_SIZE, SHMSESSION_FULL_POLICY: those SHMSESSION keys (default: the
  engine's).
- SHMSESSION_SNAPSHOT_PATH, SHMSESSION_SNAPSHOT_INTERVAL: warm restart (SHMSESSION["SNAPSHOT"]).
- SESSION_ENGINE: another session engine, for benchmarks against peers
  (default "django_shmsession.backend").
- DJANGO_DEBUG: "1" for DEBUG = True.
- SHMSESSION_L2: JSON of SHMSESSION["L2"] for the tiered engine, e.g.
  '{"BACKEND": "redis", "LOCATION": "redis://127.0.0.1:6379/0"}'.
- SHMSESSION_MAX_STALENESS: SHMSESSION["MAX_STALENESS"] in seconds.
- TESTPROJECT_DATABASE: JSON of DATABASES["default"] (the db L2 on PostgreSQL, cached_db).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-shmsession-testproject-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.sessions",
    "django_shmsession",
]
MIDDLEWARE = ["django.contrib.sessions.middleware.SessionMiddleware"]
ROOT_URLCONF = "testproject.urls"
WSGI_APPLICATION = "testproject.wsgi.application"

# Only the db session engine (benchmarks) uses it.
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}}
if os.environ.get("TESTPROJECT_DATABASE"):
    DATABASES["default"] = json.loads(os.environ["TESTPROJECT_DATABASE"])

SESSION_ENGINE = os.environ.get("SESSION_ENGINE", "django_shmsession.backend")
SHMSESSION: dict[str, object] = {"SIZE": os.environ.get("SHMSESSION_SIZE", "64M")}
if os.environ.get("SHMSESSION_NAME"):
    SHMSESSION["NAME"] = os.environ["SHMSESSION_NAME"]
if os.environ.get("SHMSESSION_LOCK_TIMEOUT"):
    SHMSESSION["LOCK_TIMEOUT"] = float(os.environ["SHMSESSION_LOCK_TIMEOUT"])
for _key in ("MAX_SESSION_SIZE", "FULL_POLICY"):
    if os.environ.get(f"SHMSESSION_{_key}"):
        SHMSESSION[_key] = os.environ[f"SHMSESSION_{_key}"]
if os.environ.get("SHMSESSION_SNAPSHOT_PATH"):
    SHMSESSION["SNAPSHOT"] = {
        "PATH": os.environ["SHMSESSION_SNAPSHOT_PATH"],
        "INTERVAL": float(os.environ.get("SHMSESSION_SNAPSHOT_INTERVAL", "60")),
    }
if os.environ.get("SHMSESSION_L2"):
    SHMSESSION["L2"] = json.loads(os.environ["SHMSESSION_L2"])
if os.environ.get("SHMSESSION_MAX_STALENESS"):
    SHMSESSION["MAX_STALENESS"] = float(os.environ["SHMSESSION_MAX_STALENESS"])

USE_TZ = True
# Django exports TIME_ZONE as TZ when settings load (gunicorn's master loads them in on_starting);
# UTC keeps the server log's timestamps in one zone.
TIME_ZONE = "UTC"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
