"""The ``SHMSESSION`` settings dict: read lazily, validated once, messages say what to write.

Settings (every key optional)::

    SHMSESSION = {
        # POSIX name of the shared-memory segment (a semaphore "<NAME>.lock" goes with it).
        # Default: derived from the settings module, SECRET_KEY and the user, so it stays the
        # same across release directories and virtualenvs of one site while two sites on a
        # machine never share a table by accident; every process of one site must agree on it.
        "NAME": "/mysite-sessions",
        # Segment size, fixed when the segment is created: int bytes or "512K" / "64M" / "1G".
        # The default (48M) fits Docker's default 64 MiB /dev/shm with room to spare.
        "SIZE": "48M",
        # Largest serialized session accepted; larger ones raise ValueTooLarge on save.
        "MAX_SESSION_SIZE": "64K",
        # When the table is full: "evict" the sessions that expire soonest, or "raise" TableFull.
        "FULL_POLICY": "evict",
        # Seconds to wait for the table lock held by a live process before LockTimeout.
        "LOCK_TIMEOUT": 10.0,
        # Warm restart (docs/snapshot.md): the gunicorn hooks restore this snapshot into a new
        # segment, dump on a clean shutdown and every INTERVAL seconds (0: only at shutdown).
        "SNAPSHOT": {"PATH": "/var/lib/mysite/sessions.snap", "INTERVAL": 60},
    }

Nothing is read at import time: :func:`get_config` reads and validates on first use and caches the
result, and :func:`reset` (called on Django's ``setting_changed``) drops the cache so tests can
override settings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import ENVIRONMENT_VARIABLE, settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.crypto import salted_hmac

SETTING = "SHMSESSION"
ENGINE = "django_shmsession.backend"
#: The two-level engine (the table as a host-wide L1 in front of Redis or the database).
TIERED_ENGINE = "django_shmsession.tiered"

#: 48 MiB: the segment (whose SIZE includes the header, the lock's process registry and the
#: intent area, ``layout.FIXED_SIZE``), its semaphore (one 4 KiB page) and the temporary semaphore
#: made while creating it fit Docker's default 64 MiB /dev/shm with 16 MiB left for the other
#: users of /dev/shm in the container (multiprocessing, a second table while one is replaced).
DEFAULT_SIZE = 48 * 1024 * 1024
DEFAULT_MAX_SESSION_SIZE = 64 * 1024
DEFAULT_LOCK_TIMEOUT = 10.0
MIN_SIZE = 1024 * 1024
MIN_MAX_SESSION_SIZE = 1024
FULL_POLICIES = ("evict", "raise")
KNOWN_KEYS = ("NAME", "SIZE", "MAX_SESSION_SIZE", "FULL_POLICY", "LOCK_TIMEOUT", "SNAPSHOT")
SNAPSHOT_KEYS = ("PATH", "INTERVAL")
DEFAULT_SNAPSHOT_INTERVAL = 60.0
MAX_SNAPSHOT_INTERVAL = 86400.0
#: Keys of the tiered engine (``django_shmsession.tiered``), validated by its own config module.
TIERED_KEYS = ("L2", "MAX_STALENESS")

# POSIX names: one leading slash, then a portable file name. 200 leaves room for the ".lock"
# suffix and the "sem." prefix Linux adds under /dev/shm (NAME_MAX is 255).
NAME_RE = re.compile(r"^/[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)
UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
#: Salt of the HMAC that derives the default NAME from SECRET_KEY (never change it: every site
#: relying on the default would get a new, empty table).
NAME_SALT = "django_shmsession.conf.default_name"


@dataclass(frozen=True)
class SnapshotConfig:
    """Validated ``SHMSESSION["SNAPSHOT"]``: where the snapshot lives, how often to dump it."""

    path: str
    #: Seconds between periodic dumps by the gunicorn master; 0 dumps only at shutdown.
    interval: float


@dataclass(frozen=True)
class ShmSessionConfig:
    """Validated ``SHMSESSION`` settings, with sizes in bytes."""

    name: str
    size: int
    max_session_size: int
    full_policy: str
    lock_timeout: float
    snapshot: SnapshotConfig | None = None


_config: ShmSessionConfig | None = None


def get_config() -> ShmSessionConfig:
    """The validated settings, computed once per process (and after each ``reset``)."""
    global _config
    if _config is None:
        _config = load_config(getattr(settings, SETTING, {}))
    return _config


def reset() -> None:
    """Forget the cached settings, so the next :func:`get_config` reads them again."""
    global _config
    _config = None


def load_config(raw: object) -> ShmSessionConfig:
    """Validate the raw ``SHMSESSION`` value; raise ImproperlyConfigured saying what to write."""
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(
            f"{SETTING} must be a dict, e.g. {SETTING} = {{'SIZE': '64M'}}; got {raw!r}."
        )
    _check_unknown_keys(raw)
    size = parse_size(raw.get("SIZE", DEFAULT_SIZE), "SIZE")
    if size < MIN_SIZE:
        raise ImproperlyConfigured(
            f"{SETTING}['SIZE'] is {size} bytes; the table needs at least {MIN_SIZE} bytes. "
            f"Write e.g. {SETTING}['SIZE'] = '64M'."
        )
    max_session = parse_size(
        raw.get("MAX_SESSION_SIZE", DEFAULT_MAX_SESSION_SIZE), "MAX_SESSION_SIZE"
    )
    _check_max_session_size(max_session, size)
    return ShmSessionConfig(
        name=_parse_name(raw.get("NAME")),
        size=size,
        max_session_size=max_session,
        full_policy=_parse_policy(raw.get("FULL_POLICY", "evict")),
        lock_timeout=_parse_timeout(raw.get("LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT)),
        snapshot=_parse_snapshot(raw.get("SNAPSHOT")),
    )


def _check_unknown_keys(raw: Mapping[Any, Any]) -> None:
    """A typo such as "MAX_SIZE" must not be ignored silently: the user believes it applies."""
    unknown = sorted(str(k) for k in raw if k not in KNOWN_KEYS + TIERED_KEYS)
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown {SETTING} key(s): {', '.join(unknown)}. "
            f"Valid keys are {', '.join(KNOWN_KEYS + TIERED_KEYS)}."
        )


def parse_size(value: object, key: str) -> int:
    """Bytes from an int or a string such as "512K", "64M", "1G" (binary units)."""
    # True is an int to Python, never a size to a user.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (match := SIZE_RE.match(value)):
        number = int(match.group(1)) * UNITS[match.group(2).upper()]
        if number > 0:
            return number
    raise ImproperlyConfigured(
        f"{SETTING}['{key}'] = {value!r} is not a size. Write a positive number of bytes "
        f"(e.g. 67108864) or a string such as '512K', '64M' or '1G'."
    )


def _check_max_session_size(max_session: int, size: int) -> None:
    """A session bigger than a quarter of the table would evict most others on every save."""
    if max_session < MIN_MAX_SESSION_SIZE:
        raise ImproperlyConfigured(
            f"{SETTING}['MAX_SESSION_SIZE'] is {max_session} bytes, too small for a session; "
            f"write at least {MIN_MAX_SESSION_SIZE} (the default is '64K')."
        )
    if max_session > size // 4:
        raise ImproperlyConfigured(
            f"{SETTING}['MAX_SESSION_SIZE'] ({max_session} bytes) must be at most a quarter of "
            f"{SETTING}['SIZE'] ({size} bytes). Lower MAX_SESSION_SIZE or raise SIZE to at least "
            f"{max_session * 4}."
        )


def _parse_policy(value: object) -> str:
    if value not in FULL_POLICIES:
        raise ImproperlyConfigured(
            f"{SETTING}['FULL_POLICY'] = {value!r} is not a policy. Write 'evict' (drop the "
            f"sessions that expire soonest when the table is full) or 'raise' (TableFull)."
        )
    return str(value)


def _parse_timeout(value: object) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 < float(value) <= 3600:  # type: ignore[arg-type]
        raise ImproperlyConfigured(
            f"{SETTING}['LOCK_TIMEOUT'] = {value!r} is not a timeout. Write a number of seconds "
            f"greater than 0 and at most 3600, e.g. 10."
        )
    return float(value)  # type: ignore[arg-type]


def _parse_snapshot(value: object) -> SnapshotConfig | None:
    """``{"PATH": "/abs/file", "INTERVAL": 60}``; None (or absent) turns warm restart off."""
    example = f"{SETTING}['SNAPSHOT'] = {{'PATH': '/var/lib/mysite/sessions.snap', 'INTERVAL': 60}}"
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured(f"{SETTING}['SNAPSHOT'] must be a dict, e.g. {example}.")
    unknown = sorted(str(k) for k in value if k not in SNAPSHOT_KEYS)
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown {SETTING}['SNAPSHOT'] key(s): {', '.join(unknown)}. Valid keys are "
            f"{', '.join(SNAPSHOT_KEYS)}."
        )
    path = value.get("PATH")
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not os.path.isabs(path) or path.endswith("/"):
        raise ImproperlyConfigured(
            f"{SETTING}['SNAPSHOT']['PATH'] = {path!r} is not the absolute path of a file. "
            f"Write e.g. {example} (the directory must exist and be writable by the site)."
        )
    interval = value.get("INTERVAL", DEFAULT_SNAPSHOT_INTERVAL)
    number = isinstance(interval, (int, float)) and not isinstance(interval, bool)
    seconds = float(interval) if number else -1.0
    if not (seconds == 0 or 1 <= seconds <= MAX_SNAPSHOT_INTERVAL):
        raise ImproperlyConfigured(
            f"{SETTING}['SNAPSHOT']['INTERVAL'] = {interval!r} is not an interval. Write a number "
            f"of seconds from 1 to {MAX_SNAPSHOT_INTERVAL:.0f} (at most that much of session "
            "writes is lost if the machine crashes), or 0 to dump only at shutdown."
        )
    return SnapshotConfig(path=os.path.normpath(path), interval=seconds)


def _parse_name(value: object) -> str:
    if value is None:
        return default_name()
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ImproperlyConfigured(
            f"{SETTING}['NAME'] = {value!r} is not a valid shared-memory name. Write a slash "
            f"followed by up to 200 letters, digits, '.', '_' or '-', e.g. '/mysite-sessions', "
            f"or leave NAME out to derive one from the project."
        )
    return value


def default_name() -> str:
    """A name stable across releases of one site and distinct between sites on one machine.

    Derived from the settings module, the ``SECRET_KEY`` (through an HMAC, so the name reveals
    nothing of it) and the user id. None of these changes when a deploy moves the code to a new
    release directory or virtualenv (hashing ``BASE_DIR`` logged everyone out on every such
    deploy and left the old segment's RAM behind); two sites differ in their secret key even
    when their settings modules share a name (``config.settings``), and two users never collide.
    Rotating ``SECRET_KEY`` gives a new table, as it invalidates the sessions of Django's own
    backends: set ``NAME`` explicitly (the ``--deploy`` check says so) to decouple them.
    """
    # Under override_settings SETTINGS_MODULE reads None; the environment still names it.
    module = getattr(settings, "SETTINGS_MODULE", None) or os.environ.get(ENVIRONMENT_VARIABLE)
    if not module:
        raise ImproperlyConfigured(
            f"Cannot derive {SETTING}['NAME'] without a settings module (settings.configure() "
            f"was used). Write {SETTING} = {{'NAME': '/mysite-sessions'}}."
        )
    identity = f"{module}\0{os.geteuid()}"
    digest = salted_hmac(NAME_SALT, identity, algorithm="sha256").hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_-]", "-", module.split(".")[0])[:40]
    return f"/djshm-{slug}-{digest}"


def name_is_explicit() -> bool:
    """True when ``SHMSESSION['NAME']`` is set (the ``--deploy`` check warns otherwise)."""
    raw = getattr(settings, SETTING, {})
    return isinstance(raw, Mapping) and raw.get("NAME") is not None
