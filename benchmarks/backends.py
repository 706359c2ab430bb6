"""The session backends we compare against, as Django settings overrides.

Why one table of backends shared by micro.py and e2e.py: both must measure exactly the same
configurations (same cache servers, same SQLite journal mode, same shm size), otherwise the
micro and end-to-end ratios could not be read together.

Every backend is real: servers are the ones setup.sh started on 127.0.0.1. A backend whose server
or client library is absent is *reported* as missing (see `unavailable`), never dropped.
"""

from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Backend:
    """One session configuration a Django user could pick instead of ours."""

    key: str
    label: str
    shared: bool  # are sessions shared between worker processes?
    needs_server: str = ""  # "REDIS" / "MEMCACHED" / "PG": setup.sh's <NAME>_OK and _PORT
    needs_module: str = ""
    uses_db: bool = False  # needs `migrate sessions`


OURS = "shm"

BACKENDS: tuple[Backend, ...] = (
    Backend(OURS, "ours (shm)", shared=True, needs_module="django_shmsession.backend"),
    Backend("db-sqlite", "db · SQLite", shared=True, uses_db=True),
    Backend("db-sqlite-wal", "db · SQLite WAL", shared=True, uses_db=True),
    Backend(
        "db-postgres",
        "db · PostgreSQL",
        shared=True,
        needs_server="PG",
        needs_module="psycopg",
        uses_db=True,
    ),
    Backend("cache-locmem", "cache · LocMem", shared=False),
    Backend(
        "cache-redis", "cache · Redis", shared=True, needs_server="REDIS", needs_module="redis"
    ),
    Backend(
        "cache-memcached",
        "cache · Memcached",
        shared=True,
        needs_server="MEMCACHED",
        needs_module="pymemcache",
    ),
    Backend(
        "cached_db-redis",
        "cached_db · Redis+SQLite",
        shared=True,
        needs_server="REDIS",
        needs_module="redis",
        uses_db=True,
    ),
    Backend("file", "file", shared=True),
    Backend("signed_cookies", "signed_cookies", shared=True),
    Backend("diskcache", "diskcache DjangoCache", shared=True, needs_module="diskcache"),
)

BY_KEY = {backend.key: backend for backend in BACKENDS}


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def unavailable(backend: Backend, env: dict[str, str]) -> str | None:
    """Why this backend cannot run here (None if it can): shown as 'missing' in the results."""
    if backend.needs_module:
        try:
            found = importlib.util.find_spec(backend.needs_module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"module {backend.needs_module} not importable"
    if backend.needs_server:
        name = backend.needs_server
        port = env.get(f"{name}_PORT", "")
        if env.get(f"{name}_OK") != "1" or not port:
            return f"{name.lower()} server not set up (run benchmarks/setup.sh)"
        if not _port_open(int(port)):
            return f"{name.lower()} server not listening on 127.0.0.1:{port}"
    return None


# Persistent DB connections, as a tuned production site has them: Django's default (0) would make
# every e2e request open a new PostgreSQL connection (~3 ms) and measure that instead of sessions.
PERSISTENT = 600


def _sqlite(path: Path) -> dict[str, Any]:
    # A generous timeout: with 4 processes writing, SQLite's default 5 s can raise "locked",
    # which would measure our harness rather than the backend.
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(path),
        "OPTIONS": {"timeout": 60},
        "CONN_MAX_AGE": PERSISTENT,
    }


def _redis_cache(env: dict[str, str]) -> dict[str, Any]:
    return {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": f"redis://127.0.0.1:{env.get('REDIS_PORT', '6379')}/0",
    }


def settings_for(key: str, env: dict[str, str], workdir: Path, shm_name: str) -> dict[str, Any]:
    """Settings overrides (SESSION_ENGINE, CACHES, DATABASES, ...) for backend `key`.

    workdir holds this run's SQLite files, session files and diskcache; shm_name names our
    segment. Both are chosen by the caller so that processes that must share a store (gunicorn
    workers, the 2/4-process hammer) get the same one.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    dbs: dict[str, Any] = {"default": _sqlite(workdir / "default.sqlite3")}
    caches: dict[str, Any] = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            # Django's default of 300 entries would cull sessions mid-benchmark.
            "OPTIONS": {"MAX_ENTRIES": 10_000_000},
        }
    }
    out: dict[str, Any] = {}
    if key == OURS:
        engine = "django_shmsession.backend"
        out["SHMSESSION"] = {"NAME": shm_name, "SIZE": "256M"}
    elif key == "db-sqlite":
        engine = "django.contrib.sessions.backends.db"
        dbs["default"] = _sqlite(workdir / "sessions-journal.sqlite3")
    elif key == "db-sqlite-wal":
        engine = "django.contrib.sessions.backends.db"
        dbs["default"] = _sqlite(workdir / "sessions-wal.sqlite3")
    elif key == "db-postgres":
        engine = "django.contrib.sessions.backends.db"
        dbs["default"] = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "bench",
            "USER": "postgres",
            "HOST": "127.0.0.1",
            "PORT": env.get("PG_PORT", "5432"),
            "CONN_MAX_AGE": PERSISTENT,
        }
    elif key == "cache-locmem":
        engine = "django.contrib.sessions.backends.cache"
    elif key == "cache-redis":
        engine = "django.contrib.sessions.backends.cache"
        caches["default"] = _redis_cache(env)
    elif key == "cache-memcached":
        engine = "django.contrib.sessions.backends.cache"
        caches["default"] = {
            "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
            "LOCATION": f"127.0.0.1:{env.get('MEMCACHED_PORT', '11211')}",
        }
    elif key == "cached_db-redis":
        engine = "django.contrib.sessions.backends.cached_db"
        caches["default"] = _redis_cache(env)
        dbs["default"] = _sqlite(workdir / "sessions-cached_db.sqlite3")
    elif key == "file":
        engine = "django.contrib.sessions.backends.file"
        files = workdir / "session-files"
        files.mkdir(parents=True, exist_ok=True)
        out["SESSION_FILE_PATH"] = str(files)
    elif key == "signed_cookies":
        engine = "django.contrib.sessions.backends.signed_cookies"
    elif key == "diskcache":
        engine = "django.contrib.sessions.backends.cache"
        caches["default"] = {
            "BACKEND": "diskcache.DjangoCache",
            "LOCATION": str(workdir / "diskcache"),
        }
    else:
        raise KeyError(f"unknown backend {key!r}; known: {', '.join(BY_KEY)}")
    out.update(SESSION_ENGINE=engine, DATABASES=dbs, CACHES=caches)
    return out


def prepare_store(key: str) -> None:
    """Create the sessions table (db backends) and empty every store, in a configured Django.

    Emptying matters: a table left over from a previous run would make create/exists costs
    depend on history.
    """
    from django.core.cache import cache
    from django.core.management import call_command
    from django.db import connection

    backend = BY_KEY[key]
    if backend.uses_db:
        call_command("migrate", "sessions", verbosity=0, interactive=False)
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM django_session")
            if key == "db-sqlite-wal":
                # journal_mode is persistent in the file, so every later connection uses WAL.
                cursor.execute("PRAGMA journal_mode=WAL")
    if key in ("cache-redis", "cache-memcached", "cached_db-redis", "diskcache"):
        cache.clear()
