"""Settings for benchmarks/tiered.py: the test project, plus a Redis cache for Django's cache and
cached_db engines (TIERED_BENCH_CACHE = a redis:// URL). Everything else comes from the test
project's environment variables (SESSION_ENGINE, SHMSESSION_*, TESTPROJECT_DATABASE)."""

from __future__ import annotations

import os

from testproject.settings import *  # noqa: F403

if os.environ.get("TIERED_BENCH_CACHE"):
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": os.environ["TIERED_BENCH_CACHE"],
        }
    }
DATABASES["default"]["CONN_MAX_AGE"] = None  # noqa: F405 - persistent, as a production site
