"""The process's L2 client: built lazily from the settings, rebuilt after a fork or a change.

A client holds sockets (a Redis connection pool); a gunicorn worker must not use connections it
inherited from the master, so the client remembers the pid that made it.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from django.core.signals import setting_changed

from django_shmsession.conf import SETTING

from .config import L2Config, get_tiered_config
from .l2 import L2

_l2: L2 | None = None
_pid = 0
_lock = threading.Lock()


def get_l2() -> L2:
    """This process's L2 client for the configured backend."""
    l2 = _l2
    if l2 is not None and _pid == os.getpid():
        return l2
    return _build()


def _build() -> L2:
    global _l2, _pid
    with _lock:
        if _l2 is None or _pid != os.getpid():
            _l2, _pid = make_l2(get_tiered_config().l2), os.getpid()
        return _l2


def make_l2(config: L2Config) -> L2:
    """A new client for ``config`` (the listener makes its own)."""
    if config.backend == "redis":
        from .redis_l2 import RedisL2

        return RedisL2(config)
    from .db_l2 import DatabaseL2

    return DatabaseL2(config)


def reset() -> None:
    """Drop the client (tests, changed settings); the next use builds a new one."""
    global _l2
    with _lock:
        l2, _l2 = _l2, None
    if l2 is not None and _pid == os.getpid():
        l2.close()


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in (SETTING, "DATABASES"):
        reset()


setting_changed.connect(_on_setting_changed, dispatch_uid="django_shmsession.tiered.runtime")
