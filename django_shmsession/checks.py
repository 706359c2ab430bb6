"""System checks (``manage.py check``): catch at deploy time what would otherwise fail per request.

Ids:
E001 posix_ipc is not importable.
E002 the platform has no timed semaphore waits (dead-lock-holder recovery needs them).
E003 SHMSESSION is invalid (the ImproperlyConfigured message).
E004 SIZE does not fit in /dev/shm's free space (creation would fail).
E005 an existing segment has another size than SIZE (opening would fail).
E006 SESSION_SERIALIZER is not importable or not JSON-compatible.
E007 SESSION_ENGINE points into django_shmsession but not at the engine module.
E008 /dev/shm is missing.
E009 the segment or its semaphore is another user's, not private, or a planted symbolic link.
E010 the segment was made by another layout version, or is not a session table at all.
E011 the segment's header is corrupt.
E012 MAX_SESSION_SIZE or FULL_POLICY differ from the values the segment's creator recorded.
W001 SHMSESSION is set but SESSION_ENGINE is another engine, so it has no effect.
W002 the segment exists but is unusable (semaphore removed, file truncated): the site's next
     request replaces it with an empty table.
W003 (``--deploy``) NAME is not set explicitly.

Only E007 and W001 look at a site whose SESSION_ENGINE is another engine: a site that merely
has the app installed gets no errors about a table it does not use. None of them creates or
modifies a segment: checking must be free of side effects (an existing segment is opened and
closed again, never created, replaced or resized).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, register
from django.core.checks import Warning as CheckWarning
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from django_shmsession import conf, platform
from django_shmsession.exceptions import (
    CorruptTable,
    ForeignSegment,
    LayoutMismatch,
    SegmentNotFound,
    SettingsMismatch,
)
from django_shmsession.platform import SHM_DIR, segment_path

__all__ = ["SHM_DIR", "segment_path"]  # tests and tools use them from here
PREFIX = "django_shmsession"
_SAMPLE = {"_auth_user_id": "1", "list": [1, 2.5, None, True], "text": "é\u2603"}


def uses_our_engine() -> bool:
    """True when SESSION_ENGINE is this package's engine (the other checks apply only then)."""
    return bool(getattr(settings, "SESSION_ENGINE", "") == conf.ENGINE)


@register()
def check_posix_ipc(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    """E001/E002: the table needs posix_ipc and timed semaphore waits."""
    if not uses_our_engine():
        return []
    reason = platform.unsupported_reason()
    if reason is None:
        return []
    check_id, message = reason
    hint = {
        "E001": "Install it: `pip install posix-ipc` (it needs a C compiler on Linux).",
        "E002": "Run on Linux (macOS lacks sem_timedwait), or use another SESSION_ENGINE.",
    }[check_id]
    return [Error(f"{message[0].upper()}{message[1:]}.", hint=hint, id=f"{PREFIX}.{check_id}")]


@register()
def check_settings(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    """E003..E005, E008..E012, W002: settings valid and the segment creatable or usable."""
    if not uses_our_engine():
        return []
    try:
        config = conf.load_config(getattr(settings, conf.SETTING, {}))
    except ImproperlyConfigured as err:
        return [
            Error(
                str(err),
                hint=f"Fix {conf.SETTING} in your settings; every key is optional.",
                id="django_shmsession.E003",
            )
        ]
    if not os.path.isdir(SHM_DIR):
        return [
            Error(
                f"{SHM_DIR} does not exist, so POSIX shared memory is unavailable.",
                hint="Mount a tmpfs on /dev/shm (Linux does this by default).",
                id="django_shmsession.E008",
            )
        ]
    return _check_segment(config)


def _check_segment(config: conf.ShmSessionConfig) -> list[CheckMessage]:
    path = segment_path(config.name)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return _check_free_space(config)
    if stat.S_ISREG(info.st_mode) and info.st_size != config.size:
        return [_size_mismatch(config, info.st_size)]
    return _check_opens(config)


def _size_mismatch(config: conf.ShmSessionConfig, existing: int) -> CheckMessage:
    """E005, whose hint proposes the existing size only when SIZE may take it (a truncated or
    tiny segment cannot be matched: it must be replaced)."""
    recreate = (
        "drop every session and let it be recreated: `python manage.py shmsession unlink "
        "--noinput`, then restart"
    )
    if existing >= conf.MIN_SIZE and existing >= 4 * config.max_session_size:
        hint = f"Set {conf.SETTING}['SIZE'] back to {existing}, or {recreate}."
    else:
        hint = (
            f"{existing} bytes is below what {conf.SETTING} allows (at least {conf.MIN_SIZE} "
            f"bytes and 4 x MAX_SESSION_SIZE), so SIZE cannot match it: {recreate}."
        )
    return Error(
        f"The segment {config.name!r} exists with {existing} bytes but "
        f"{conf.SETTING}['SIZE'] is {config.size} bytes; workers will fail to open it.",
        hint=hint,
        id="django_shmsession.E005",
    )


def _check_opens(config: conf.ShmSessionConfig) -> list[CheckMessage]:
    """Open the existing segment as a worker would (never creating one), then close it: what
    stops every worker must stop ``manage.py check`` too."""
    from django_shmsession import store  # imports the table (posix_ipc): only when needed

    recreate = "`python manage.py shmsession unlink --noinput` (drops every session), then restart"
    try:
        store.open_table(config, create=False).close()
    except ForeignSegment as err:
        return [Error(str(err), hint=_FOREIGN_HINT, id="django_shmsession.E009")]
    except LayoutMismatch as err:
        hint = f"Remove it and let the site create a table of this version: {recreate}."
        return [Error(str(err), hint=hint, id="django_shmsession.E010")]
    except CorruptTable as err:
        return [Error(str(err), hint=f"Replace it: {recreate}.", id="django_shmsession.E011")]
    except SettingsMismatch as err:
        hint = (
            f"Write {err.setting} = {err.recorded!r} (what the running site uses), or, to change "
            f"it, stop every process of the site, then {recreate} with the new value."
        )
        return [Error(str(err), hint=hint, id="django_shmsession.E012")]
    except SegmentNotFound as err:
        return [
            CheckWarning(
                str(err),
                hint="Nothing to do: the next request replaces it (its sessions are lost).",
                id="django_shmsession.W002",
            )
        ]
    return []


_FOREIGN_HINT = (
    "Every process of the site must run as one user, and the table's name must be the site's "
    "own: the message says who can remove the file; or set SHMSESSION['NAME'] to another name."
)


#: /dev/shm room the semaphore takes besides the segment (one page, rounded up generously).
SEMAPHORE_ROOM = 64 * 1024


def _check_free_space(config: conf.ShmSessionConfig) -> list[CheckMessage]:
    stat = os.statvfs(SHM_DIR)
    free = stat.f_bavail * stat.f_frsize
    if config.size + SEMAPHORE_ROOM <= free:
        return []
    return [
        Error(
            f"{conf.SETTING}['SIZE'] is {config.size} bytes but {SHM_DIR} has only {free} bytes "
            f"free, so the session table cannot be created.",
            hint=f"Lower {conf.SETTING}['SIZE'], or give {SHM_DIR} more room (Docker: "
            f"`--shm-size=256m`; its default is 64 MiB).",
            id="django_shmsession.E004",
        )
    ]


@register()
def check_engine(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    """E007/W001: SESSION_ENGINE and SHMSESSION agree."""
    engine = getattr(settings, "SESSION_ENGINE", "")
    if engine in (conf.ENGINE, conf.TIERED_ENGINE):
        return []
    if str(engine).startswith("django_shmsession"):
        return [
            Error(
                f"SESSION_ENGINE = {engine!r} is not the django-shmsession engine.",
                hint=f"Write SESSION_ENGINE = {conf.ENGINE!r} (a module, not a class).",
                id="django_shmsession.E007",
            )
        ]
    if hasattr(settings, conf.SETTING):
        return [
            CheckWarning(
                f"{conf.SETTING} is set but SESSION_ENGINE is {engine!r}, so sessions are not "
                f"stored in shared memory.",
                hint=f"Write SESSION_ENGINE = {conf.ENGINE!r}, or remove {conf.SETTING}.",
                id="django_shmsession.W001",
            )
        ]
    return []


@register(deploy=True)
def check_explicit_name(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[CheckMessage]:
    """W003 (``check --deploy``): production should name its table."""
    if not uses_our_engine() or conf.name_is_explicit():
        return []
    try:
        derived = conf.default_name()
    except ImproperlyConfigured:
        return []  # E003 reports it
    return [
        CheckWarning(
            f"{conf.SETTING}['NAME'] is not set, so the table's name is derived ({derived!r}, "
            f"from the settings module and SECRET_KEY): rotating SECRET_KEY, or renaming the "
            f"settings module, gives the site a new, empty table (everyone is logged out).",
            hint=f"Set {conf.SETTING}['NAME'] explicitly, e.g. {{'NAME': '/mysite-sessions'}}, "
            f"distinct for each site on the machine; to keep today's sessions, use {derived!r}.",
            id="django_shmsession.W003",
        )
    ]


@register()
def check_serializer(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    """E006: the engine stores the serializer's bytes, which must be JSON that round-trips."""
    if not uses_our_engine():
        return []
    path = settings.SESSION_SERIALIZER
    try:
        serializer = import_string(path)()
        blob = serializer.dumps(_SAMPLE)
        json.loads(blob)
        ok = isinstance(blob, bytes) and serializer.loads(blob) == _SAMPLE
    except Exception as err:  # any failure means the serializer is unusable
        ok, path = False, f"{path} ({type(err).__name__}: {err})"
    if ok:
        return []
    return [
        Error(
            f"SESSION_SERIALIZER {path} is not JSON-compatible: it must turn a dict into JSON "
            f"bytes and back.",
            hint="Use 'django.contrib.sessions.serializers.JSONSerializer' (the default) or a "
            "subclass of it.",
            id="django_shmsession.E006",
        )
    ]
