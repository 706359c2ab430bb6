"""System checks: one test per check id, plus the clean case."""

from __future__ import annotations

import sys
from typing import Any

import posix_ipc
import pytest
from django.core.checks import CheckMessage
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from django_shmsession import checks
from django_shmsession.table import SessionTable


def ids(messages: list[CheckMessage]) -> list[str | None]:
    return [m.id for m in messages]


def run_all() -> list[CheckMessage]:
    return [
        *checks.check_posix_ipc(None),
        *checks.check_settings(None),
        *checks.check_engine(None),
        *checks.check_serializer(None),
    ]


def test_clean_settings_pass() -> None:
    assert run_all() == []


def test_manage_py_check_runs_our_checks(settings: Any) -> None:
    settings.SHMSESSION = {"FULL_POLICY": "never"}
    with pytest.raises(SystemCheckError, match=r"django_shmsession\.E003"):
        call_command("check")


def test_e001_posix_ipc_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "posix_ipc", None)  # makes `import posix_ipc` fail
    messages = checks.check_posix_ipc(None)
    assert ids(messages) == ["django_shmsession.E001"]
    assert "pip install posix-ipc" in (messages[0].hint or "")


def test_e002_no_timed_semaphores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(posix_ipc, "SEMAPHORE_TIMEOUT_SUPPORTED", False)
    messages = checks.check_posix_ipc(None)
    assert ids(messages) == ["django_shmsession.E002"]
    assert "Linux" in (messages[0].hint or "")


def test_e003_invalid_setting(settings: Any) -> None:
    settings.SHMSESSION = {"SIZE": "huge"}
    messages = checks.check_settings(None)
    assert ids(messages) == ["django_shmsession.E003"]
    assert "'SIZE'] = 'huge' is not a size" in messages[0].msg
    assert messages[0].hint


def test_e004_size_above_dev_shm_free_space(settings: Any, shm_name: str) -> None:
    settings.SHMSESSION = {"NAME": shm_name, "SIZE": "100000G"}
    messages = checks.check_settings(None)
    assert ids(messages) == ["django_shmsession.E004"]
    assert "--shm-size" in (messages[0].hint or "")


def test_e005_existing_segment_with_other_size(settings: Any, shm_name: str) -> None:
    SessionTable(shm_name, 1024 * 1024).close()
    settings.SHMSESSION = {"NAME": shm_name, "SIZE": "2M"}
    messages = checks.check_settings(None)
    assert ids(messages) == ["django_shmsession.E005"]
    assert "exists with 1048576 bytes" in messages[0].msg
    assert "shmsession unlink" in (messages[0].hint or "")


def test_e005_not_raised_for_matching_size(settings: Any, shm_name: str) -> None:
    SessionTable(shm_name, 1024 * 1024).close()
    settings.SHMSESSION = {"NAME": shm_name, "SIZE": "1M"}
    assert checks.check_settings(None) == []


def test_e006_serializer_not_json(settings: Any) -> None:
    settings.SESSION_SERIALIZER = "tests.engine.test_checks.ReprSerializer"
    messages = checks.check_serializer(None)
    assert ids(messages) == ["django_shmsession.E006"]
    assert "JSONSerializer" in (messages[0].hint or "")


def test_e006_serializer_not_importable(settings: Any) -> None:
    settings.SESSION_SERIALIZER = "no.such.Serializer"
    messages = checks.check_serializer(None)
    assert ids(messages) == ["django_shmsession.E006"]
    assert "no.such.Serializer" in messages[0].msg


def test_e007_engine_typo(settings: Any) -> None:
    settings.SESSION_ENGINE = "django_shmsession.backend.SessionStore"
    messages = checks.check_engine(None)
    assert ids(messages) == ["django_shmsession.E007"]
    assert "'django_shmsession.backend'" in (messages[0].hint or "")


def test_e008_no_dev_shm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "SHM_DIR", "/nonexistent-shm-dir")
    messages = checks.check_settings(None)
    assert ids(messages) == ["django_shmsession.E008"]


def test_w001_settings_without_engine(settings: Any) -> None:
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.db"
    messages = checks.check_engine(None)
    assert ids(messages) == ["django_shmsession.W001"]


def test_no_warning_for_other_engine_without_settings(settings: Any) -> None:
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.db"
    del settings.SHMSESSION
    assert checks.check_engine(None) == []


def test_checks_create_no_segment(shm_name: str) -> None:
    run_all()
    with pytest.raises(FileNotFoundError):
        open(checks.segment_path(shm_name), "rb")  # noqa: SIM115


class ReprSerializer:
    """Round-trips, but not JSON: the engine's stored bytes would not be portable JSON."""

    def dumps(self, obj: object) -> bytes:
        return repr(obj).encode()

    def loads(self, data: bytes) -> object:
        import ast

        return ast.literal_eval(data.decode())
