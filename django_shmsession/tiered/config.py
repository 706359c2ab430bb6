"""The tiered engine's settings: ``SHMSESSION["L2"]`` and ``SHMSESSION["MAX_STALENESS"]``.

Read lazily and validated once per process like the rest of ``SHMSESSION`` (see
:mod:`django_shmsession.conf`), with messages that say what to write::

    SHMSESSION = {
        "NAME": "/mysite-sessions",            # the host's L1, as for the plain engine
        "L2": {
            "BACKEND": "redis",                # or "db"
            "LOCATION": "redis://127.0.0.1:6379/0",
            "KEY_PREFIX": "shmsession:",       # keys are KEY_PREFIX + session key
            "OPTIONS": {"socket_timeout": 1.0},  # passed to redis.Redis.from_url
        },
        "MAX_STALENESS": 2.0,                  # seconds an L1 copy may go unconfirmed by L2
    }

    "L2": {"BACKEND": "db", "DATABASE": "default", "CHANNEL": "django_shmsession"}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from django_shmsession.conf import SETTING
from django_shmsession.conf import TIERED_ENGINE as ENGINE

BACKENDS = ("redis", "db")
DEFAULT_MAX_STALENESS = 2.0
DEFAULT_KEY_PREFIX = "shmsession:"
DEFAULT_CHANNEL = "django_shmsession"
#: Seconds a Redis call may take before it counts as L2 being down (connect and each reply);
#: short, so a dead server fails a request quickly with a clear error instead of hanging it.
DEFAULT_REDIS_TIMEOUT = 1.0
REDIS_KEYS = ("BACKEND", "LOCATION", "KEY_PREFIX", "OPTIONS")
DB_KEYS = ("BACKEND", "DATABASE", "CHANNEL")
# A PostgreSQL identifier we can put in LISTEN unquoted: letters, digits, underscores.
CHANNEL_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
PREFIX_RE = re.compile(r"^[\x21-\x7e]{0,64}$")


@dataclass(frozen=True)
class L2Config:
    """Validated ``SHMSESSION["L2"]``."""

    backend: str
    location: str = ""
    key_prefix: str = DEFAULT_KEY_PREFIX
    options: Mapping[str, Any] = field(default_factory=dict)
    database: str = "default"
    channel: str = DEFAULT_CHANNEL

    def describe(self) -> str:
        """Backend and location as error messages name them (no password)."""
        if self.backend == "redis":
            return f"Redis at {redact(self.location)}"
        return f"the database {self.database!r} (Django's Session model)"


@dataclass(frozen=True)
class TieredConfig:
    l2: L2Config
    max_staleness: float


_config: TieredConfig | None = None


def get_tiered_config() -> TieredConfig:
    """The validated tiered settings, computed once per process (and after each reset)."""
    global _config
    if _config is None:
        _config = load_tiered_config(getattr(settings, SETTING, {}))
    return _config


def reset() -> None:
    global _config
    _config = None


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in (SETTING, "DATABASES"):
        reset()


setting_changed.connect(_on_setting_changed, dispatch_uid="django_shmsession.tiered.config")


def load_tiered_config(raw: object) -> TieredConfig:
    """Validate the tiered keys of the raw ``SHMSESSION``; raise ImproperlyConfigured."""
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(f"{SETTING} must be a dict; got {raw!r}.")
    if "L2" not in raw:
        raise ImproperlyConfigured(
            f"SESSION_ENGINE = {ENGINE!r} needs {SETTING}['L2'], the store that holds the "
            f"sessions for every host. Write e.g. {SETTING}['L2'] = {{'BACKEND': 'redis', "
            f"'LOCATION': 'redis://127.0.0.1:6379/0'}} or {{'BACKEND': 'db'}}."
        )
    return TieredConfig(
        l2=_parse_l2(raw["L2"]),
        max_staleness=_parse_staleness(raw.get("MAX_STALENESS", DEFAULT_MAX_STALENESS)),
    )


def _parse_staleness(value: object) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 <= float(value) <= 3600:  # type: ignore[arg-type]
        raise ImproperlyConfigured(
            f"{SETTING}['MAX_STALENESS'] = {value!r} is not a number of seconds. Write a number "
            f"from 0 (always ask L2) to 3600, e.g. 2.0 (the default)."
        )
    return float(value)  # type: ignore[arg-type]


def _parse_l2(raw: object) -> L2Config:
    if not isinstance(raw, Mapping) or raw.get("BACKEND") not in BACKENDS:
        backend = raw.get("BACKEND") if isinstance(raw, Mapping) else raw
        raise ImproperlyConfigured(
            f"{SETTING}['L2']['BACKEND'] = {backend!r} is not an L2 backend. Write 'redis' "
            f"(with 'LOCATION': 'redis://host:6379/0') or 'db' (Django's Session model)."
        )
    if raw["BACKEND"] == "redis":
        return _parse_redis(raw)
    return _parse_db(raw)


def _check_keys(raw: Mapping[Any, Any], valid: tuple[str, ...]) -> None:
    unknown = sorted(str(k) for k in raw if k not in valid)
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown {SETTING}['L2'] key(s) for BACKEND {raw['BACKEND']!r}: "
            f"{', '.join(unknown)}. Valid keys are {', '.join(valid)}."
        )


def _parse_redis(raw: Mapping[Any, Any]) -> L2Config:
    _check_keys(raw, REDIS_KEYS)
    location = raw.get("LOCATION")
    if not isinstance(location, str) or not location.startswith(
        ("redis://", "rediss://", "unix://")
    ):
        raise ImproperlyConfigured(
            f"{SETTING}['L2']['LOCATION'] = {location!r} is not a Redis URL. Write e.g. "
            f"'redis://127.0.0.1:6379/0' (rediss:// for TLS, unix:///path/redis.sock)."
        )
    prefix = raw.get("KEY_PREFIX", DEFAULT_KEY_PREFIX)
    if not isinstance(prefix, str) or not PREFIX_RE.match(prefix):
        raise ImproperlyConfigured(
            f"{SETTING}['L2']['KEY_PREFIX'] = {prefix!r} is not a key prefix. Write up to 64 "
            f"printable ASCII characters without spaces, e.g. 'mysite:sessions:'."
        )
    options = raw.get("OPTIONS", {})
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ImproperlyConfigured(
            f"{SETTING}['L2']['OPTIONS'] = {options!r} must be a dict of redis.Redis "
            f"arguments, e.g. {{'socket_timeout': 1.0}}."
        )
    return L2Config(backend="redis", location=location, key_prefix=prefix, options=options)


def _parse_db(raw: Mapping[Any, Any]) -> L2Config:
    _check_keys(raw, DB_KEYS)
    database = raw.get("DATABASE", "default")
    if not isinstance(database, str) or database not in settings.DATABASES:
        raise ImproperlyConfigured(
            f"{SETTING}['L2']['DATABASE'] = {database!r} is not in DATABASES. Write one of "
            f"{', '.join(map(repr, settings.DATABASES))} or leave it out for 'default'."
        )
    channel = raw.get("CHANNEL", DEFAULT_CHANNEL)
    if not isinstance(channel, str) or not CHANNEL_RE.match(channel):
        raise ImproperlyConfigured(
            f"{SETTING}['L2']['CHANNEL'] = {channel!r} is not a NOTIFY channel name. Write up "
            f"to 63 lowercase letters, digits and underscores, e.g. 'mysite_sessions'."
        )
    return L2Config(backend="db", database=database, channel=channel)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)
