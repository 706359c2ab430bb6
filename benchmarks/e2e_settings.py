"""Settings for the end-to-end benchmark: the test project's settings, one backend swapped in.

Why a module here instead of editing testproject: the test project stays what users see, and the
benchmark picks the backend from environment variables set by benchmarks/e2e.py:
BENCH_BACKEND (a key of benchmarks.backends.BY_KEY), BENCH_WORKDIR (SQLite files, session files,
diskcache) and BENCH_SHM_NAME (our segment).

SHMSESSION is set for every backend, not only ours: the test project's gunicorn hooks open the
table in the master whatever the engine, and a named segment lets e2e.py unlink it afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

from testproject.settings import *  # noqa: F403

from benchmarks.backends import settings_for
from benchmarks.common import WORK, read_env

_backend = os.environ.get("BENCH_BACKEND", "shm")
_shm_name = os.environ.get("BENCH_SHM_NAME", "/shmbench-e2e")
_workdir = Path(os.environ.get("BENCH_WORKDIR", str(WORK / "e2e" / _backend)))

globals().update(settings_for(_backend, read_env(), _workdir, _shm_name))
SHMSESSION = {"NAME": _shm_name, "SIZE": "256M"}
# The project's URLs plus two views that make the lost-session check cross workers for certain.
ROOT_URLCONF = "benchmarks.e2e_urls"
# The test project logs WARNING to the console; request errors must reach e2e.py's log file.
DEBUG = False
