"""System checks of the tiered engine (``manage.py check``; ``--deploy`` adds the L2 probe).

Ids (``django_shmsession.tiered.*``, apart from the plain engine's):
E001 SHMSESSION["L2"] or ["MAX_STALENESS"] is invalid (the ImproperlyConfigured message).
E002 L2 is unreachable (``--deploy`` only: it opens a connection).
E003 db backend: ``django.contrib.sessions`` is not in INSTALLED_APPS.
W001 Redis may evict session keys under memory pressure (maxmemory-policy is not noeviction).
W002 db backend on a database without LISTEN/NOTIFY: no listener can run.
W003 the host's listener is not running (the segment exists but its heartbeat is stale).
W004 db backend: the session table does not exist in the database (not migrated); a warning,
     not an error, so that ``migrate`` itself (which runs the checks) is not blocked.
W005 db backend on PostgreSQL: the functions of ``migrate django_shmsession`` are not
     installed (saves work, but each costs the server a parse and plan: see pg_functions).

All run only when SESSION_ENGINE is the tiered engine; none writes anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.conf import settings
from django.core.checks import CheckMessage, Error, register
from django.core.checks import Warning as CheckWarning
from django.core.exceptions import ImproperlyConfigured

from django_shmsession import conf
from django_shmsession.platform import segment_path

from .config import L2Config, TieredConfig, load_tiered_config

PREFIX = "django_shmsession.tiered"


def _tiered() -> bool:
    return getattr(settings, "SESSION_ENGINE", "") == conf.TIERED_ENGINE


def _config() -> TieredConfig | list[CheckMessage]:
    try:
        return load_tiered_config(getattr(settings, conf.SETTING, {}))
    except ImproperlyConfigured as err:
        return [Error(str(err), hint="Fix SHMSESSION in your settings.", id=f"{PREFIX}.E001")]


@register()
def check_tiered_settings(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[CheckMessage]:
    """E001, E003, W002, W003, W004."""
    if not _tiered():
        return []
    config = _config()
    if isinstance(config, list):
        return config
    messages: list[CheckMessage] = []
    if config.l2.backend == "db":
        messages += _check_db(config.l2, kwargs.get("databases"))
    messages += _check_listener()
    return messages


@register(deploy=True)
def check_l2_reachable(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[CheckMessage]:
    """E002 and, for Redis, W001: a real round trip to L2 (only with ``--deploy``)."""
    if not _tiered():
        return []
    config = _config()
    if isinstance(config, list):
        return []  # E001 already reports it
    from .l2 import L2Error
    from .runtime import make_l2

    l2 = make_l2(config.l2)
    try:
        l2.ping()
        return _check_redis_policy(l2) if config.l2.backend == "redis" else []
    except L2Error as err:
        return [
            Error(
                str(err),
                hint="Start the server or fix SHMSESSION['L2']; every save fails until then.",
                id=f"{PREFIX}.E002",
            )
        ]
    finally:
        l2.close()


def _check_redis_policy(l2: Any) -> list[CheckMessage]:
    try:
        policy = l2.client.config_get("maxmemory-policy").get("maxmemory-policy")
    except Exception:  # CONFIG may be disabled (managed Redis): nothing to say then
        return []
    if policy in (None, "noeviction"):
        return []
    return [
        CheckWarning(
            f"{l2.describe()} has maxmemory-policy {policy!r}: under memory pressure it "
            f"evicts keys, and every session key has an expiry, so signed-in users would be "
            f"logged out silently.",
            hint="Set `maxmemory-policy noeviction` on a Redis that holds sessions (saves then "
            "fail loudly when it is full), or give it enough memory.",
            id=f"{PREFIX}.W001",
        )
    ]


def _check_db(l2: L2Config, databases: Any) -> list[CheckMessage]:
    if not apps.is_installed("django.contrib.sessions"):
        return [
            Error(
                "SHMSESSION['L2'] = {'BACKEND': 'db'} stores sessions with Django's Session "
                "model, but django.contrib.sessions is not installed.",
                hint="Add 'django.contrib.sessions' to INSTALLED_APPS and run migrate.",
                id=f"{PREFIX}.E003",
            )
        ]
    from django.db import connections

    connection = connections[l2.database]
    messages: list[CheckMessage] = []
    if connection.vendor != "postgresql":
        messages.append(
            CheckWarning(
                f"The db L2 is on {connection.vendor}, which has no LISTEN/NOTIFY: no listener "
                f"can run, so every read of a copy older than MAX_STALENESS asks the database.",
                hint="Use PostgreSQL for the db L2 (or Redis), or accept the revalidations.",
                id=f"{PREFIX}.W002",
            )
        )
    # Only when the check framework was asked to look at databases (migrate, check --database).
    if databases is not None and l2.database in databases:
        from django.contrib.sessions.models import Session

        if Session._meta.db_table not in connection.introspection.table_names():
            messages.append(
                CheckWarning(
                    f"The table {Session._meta.db_table!r} does not exist in the database "
                    f"{l2.database!r}: every session save and load will fail.",
                    hint=f"Run `python manage.py migrate sessions --database {l2.database}`.",
                    id=f"{PREFIX}.W004",
                )
            )
        messages.extend(_check_functions(l2.database, connection))
    return messages


def _check_functions(alias: str, connection: Any) -> list[CheckMessage]:
    """W005: ask PostgreSQL whether the db L2's functions exist (only reads the catalog)."""
    from .pg_functions import PRESENT_QUERY

    if connection.vendor != "postgresql":
        return []
    with connection.cursor() as cursor:
        cursor.execute(PRESENT_QUERY)
        row = cursor.fetchone()
    if row and row[0]:
        return []
    return [
        CheckWarning(
            f"The tiered engine's PostgreSQL functions are not installed in the database "
            f"{alias!r}: sessions work, but every save is parsed and planned anew (about 100 µs "
            f"of database CPU more per save).",
            hint=f"Add 'django_shmsession' to INSTALLED_APPS and run `python manage.py "
            f"migrate django_shmsession --database {alias}` (allowed by your database routers; "
            f"if it says there is nothing to apply, the functions were dropped or made on "
            f"another search_path: migrate django_shmsession zero, then forwards, as the user "
            f"the site connects as). If EXECUTE on them is revoked, grant it to that user.",
            id=f"{PREFIX}.W005",
        )
    ]


def _check_listener() -> list[CheckMessage]:
    """W003: read the heartbeat of an existing segment (never create one)."""
    from django_shmsession import store
    from django_shmsession.exceptions import ShmSessionError

    from . import words

    try:
        name = conf.get_config().name
        if not os.path.exists(segment_path(name)):
            return []
        table = store.open_table(conf.get_config(), create=False)
    except (ShmSessionError, ImproperlyConfigured, OSError):
        return []  # the plain engine's checks report problems with the table itself
    try:
        if words.listener_up(table):
            return []
    finally:
        table.close()
    return [
        CheckWarning(
            "The tiered engine's listener is not running on this host (no heartbeat in the "
            "table): every L1 copy is revalidated with L2 (correct, slower), and logouts on "
            "other hosts are honoured here only by those revalidations.",
            hint="Use the gunicorn hooks (on_starting starts and supervises it) or run "
            "`python manage.py shmsession listen` beside your server.",
            id=f"{PREFIX}.W003",
        )
    ]
