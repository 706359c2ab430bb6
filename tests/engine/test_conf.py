"""SHMSESSION settings: parsing, defaults, and one test per bad setting (ImproperlyConfigured)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_shmsession import conf
from django_shmsession.conf import load_config, parse_size

REPO = Path(__file__).resolve().parents[2]


def test_defaults(settings: Any) -> None:
    config = load_config({"NAME": "/x-sessions"})
    assert config == conf.ShmSessionConfig(
        name="/x-sessions",
        size=48 * 1024 * 1024,  # fits Docker's 64 MiB /dev/shm (see test_default_size_fits_docker)
        max_session_size=64 * 1024,
        full_policy="evict",
        lock_timeout=10.0,
    )


def test_all_keys(settings: Any) -> None:
    config = load_config(
        {
            "NAME": "/a.b_c-1",
            "SIZE": "1G",
            "MAX_SESSION_SIZE": "128K",
            "FULL_POLICY": "raise",
            "LOCK_TIMEOUT": 2,
        }
    )
    assert config.size == 1024**3
    assert config.max_session_size == 128 * 1024
    assert config.full_policy == "raise"
    assert config.lock_timeout == 2.0
    assert isinstance(config.lock_timeout, float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64M", 64 * 1024**2),
        ("64m", 64 * 1024**2),
        ("1G", 1024**3),
        ("512K", 512 * 1024),
        ("2MiB", 2 * 1024**2),
        ("1048576", 1048576),
        (" 8M ", 8 * 1024**2),
        (3 * 1024**2, 3 * 1024**2),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text, "SIZE") == expected


def test_get_config_is_cached_and_reset_by_setting_change(settings: Any) -> None:
    settings.SHMSESSION = {"NAME": "/one-sessions"}
    first = conf.get_config()
    assert conf.get_config() is first
    settings.SHMSESSION = {"NAME": "/two-sessions"}  # fires setting_changed
    assert conf.get_config().name == "/two-sessions"


def test_missing_setting_uses_defaults(settings: Any) -> None:
    del settings.SHMSESSION
    config = conf.get_config()
    assert config.size == conf.DEFAULT_SIZE
    assert config.name.startswith("/djshm-tests-")


# --- default NAME --------------------------------------------------------------------------


def test_default_name_is_stable_across_release_directories(settings: Any) -> None:
    """A deploy into a new release directory (or virtualenv) must keep the table."""
    settings.BASE_DIR = "/srv/mysite/releases/2026-11-25"
    a = conf.default_name()
    settings.BASE_DIR = "/srv/mysite/releases/2026-12-01"
    b = conf.default_name()
    del settings.BASE_DIR
    assert a == b == conf.default_name()
    assert a.startswith("/djshm-tests-")
    assert conf.NAME_RE.match(a)


def test_default_name_differs_between_sites(settings: Any) -> None:
    """Two sites whose settings modules share a name (``config.settings``) differ by key."""
    settings.SECRET_KEY = "site-a-secret"
    a = conf.default_name()
    settings.SECRET_KEY = "site-b-secret"
    b = conf.default_name()
    assert a != b
    assert "site" not in a.split("-")[-1]  # the secret itself never shows in the name
    assert conf.NAME_RE.match(b)


def test_default_name_differs_by_settings_module(settings: Any) -> None:
    a = conf.default_name()
    settings.SETTINGS_MODULE = "othersite.settings"
    b = conf.default_name()
    assert a != b
    assert b.startswith("/djshm-othersite-")


def test_default_name_is_stable(settings: Any) -> None:
    assert conf.default_name() == conf.default_name()


def test_default_name_is_the_same_in_another_process() -> None:
    """Every process of the site (and each worker) must derive the same name."""
    code = "from django_shmsession import conf; print(conf.default_name())"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    setup = "import django; django.setup(); "
    out = subprocess.run(
        [sys.executable, "-c", setup + code],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == conf.default_name()


def test_name_is_explicit(settings: Any) -> None:
    assert conf.name_is_explicit()
    settings.SHMSESSION = {"SIZE": "1M"}
    assert not conf.name_is_explicit()
    del settings.SHMSESSION
    assert not conf.name_is_explicit()


def test_default_name_needs_a_settings_module(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.SETTINGS_MODULE = None
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    with pytest.raises(ImproperlyConfigured, match=r"Write SHMSESSION = \{'NAME'"):
        conf.default_name()


def test_settings_are_not_read_at_import() -> None:
    """Importing the engine with no settings configured must not fail (read lazily)."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    code = (
        "import django_shmsession.backend, django_shmsession.gunicorn, django_shmsession.checks, "
        "django_shmsession.conf; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "ok"


# --- one test per bad setting --------------------------------------------------------------


def test_bad_not_a_dict() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"SHMSESSION must be a dict"):
        load_config("64M")


def test_bad_unknown_key() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"Unknown SHMSESSION key\(s\): MAX_SIZE"):
        load_config({"MAX_SIZE": "1M"})


def test_bad_size_string() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"SHMSESSION\['SIZE'\] = '64 megs' is not"):
        load_config({"SIZE": "64 megs"})


def test_bad_size_negative() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"Write a positive number of bytes"):
        load_config({"SIZE": -5})


def test_bad_size_bool() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"SHMSESSION\['SIZE'\] = True is not a size"):
        load_config({"SIZE": True})


def test_bad_size_too_small() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"needs at least 1048576 bytes"):
        load_config({"SIZE": "64K"})


def test_bad_max_session_size_not_a_size() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"SHMSESSION\['MAX_SESSION_SIZE'\] = 'big'"):
        load_config({"MAX_SESSION_SIZE": "big"})


def test_bad_max_session_size_too_small() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"too small for a session"):
        load_config({"MAX_SESSION_SIZE": 100})


def test_bad_max_session_size_above_quarter_of_size() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"raise SIZE to at least 4194304"):
        load_config({"SIZE": "2M", "MAX_SESSION_SIZE": "1M"})


def test_bad_full_policy() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"Write 'evict' .* or 'raise'"):
        load_config({"FULL_POLICY": "lru"})


def test_bad_lock_timeout_type() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"LOCK_TIMEOUT'\] = '10' is not a timeout"):
        load_config({"LOCK_TIMEOUT": "10"})


def test_bad_lock_timeout_zero() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"greater than 0 and at most 3600"):
        load_config({"LOCK_TIMEOUT": 0})


def test_bad_name_without_slash() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"'mysite' is not a valid shared-memory name"):
        load_config({"NAME": "mysite"})


def test_bad_name_with_inner_slash() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"e\.g\. '/mysite-sessions'"):
        load_config({"NAME": "/my/site"})


def test_bad_name_too_long() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"up to 200 letters"):
        load_config({"NAME": "/" + "x" * 201})


def test_bad_setting_reaches_the_engine(settings: Any) -> None:
    """A bad setting surfaces on first use of the engine, not as a silent default."""
    from django_shmsession.backend import SessionStore

    settings.SHMSESSION = {"SIZE": "lots"}
    s = SessionStore()
    s["a"] = 1
    with pytest.raises(ImproperlyConfigured, match=r"SHMSESSION\['SIZE'\] = 'lots'"):
        s.save()
