"""Gunicorn config for the test project: `gunicorn -c gunicorn.conf.py testproject.wsgi`.

GUNICORN_BIND (default 127.0.0.1:8000) and GUNICORN_WORKERS (default 4) override the defaults;
command-line options such as `--workers 2` or `--bind` override both.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

# The master creates the table before forking; it recovers the lock when a worker dies; with
# SHMSESSION_SNAPSHOT_PATH set it restores, periodically dumps and dumps at exit (on_exit).
from django_shmsession.gunicorn import child_exit, on_exit, on_starting  # noqa: F401

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "4"))
worker_class = "sync"
accesslog = None
