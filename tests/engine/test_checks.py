"""System checks: one test per check id, plus the clean case."""

from __future__ import annotations

import os
import sys
from typing import Any

import posix_ipc
import pytest
from django.core.checks import CheckMessage
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from django_shmsession import checks, layout
from django_shmsession.table import SessionTable

NOBODY = 65534


def ids(messages: list[CheckMessage]) -> list[str | None]:
    return [m.id for m in messages]


def run_all() -> list[CheckMessage]:
    return [
        *checks.check_posix_ipc(None),
        *checks.check_settings(None),
        *checks.check_engine(None),
        *checks.check_serializer(None),
        *checks.check_explicit_name(None),
    ]


def plant_file(name: str, data: bytes) -> None:
    with open(checks.segment_path(name), "wb") as file:
        file.write(data)
    os.chmod(checks.segment_path(name), 0o600)


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


def test_e005_hint_never_proposes_a_size_below_the_minimum(settings: Any, shm_name: str) -> None:
    """A truncated (or tiny) segment cannot be matched by SIZE: the hint says to replace it."""
    SessionTable(shm_name, 1024 * 1024).close()
    os.truncate(checks.segment_path(shm_name), 4096)
    messages = checks.check_settings(None)
    assert ids(messages) == ["django_shmsession.E005"]
    hint = messages[0].hint or ""
    assert "back to 4096" not in hint
    assert "below what SHMSESSION allows" in hint
    assert "shmsession unlink --noinput" in hint


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


def test_e009_symlink_planted_under_the_name(settings: Any, shm_name: str, tmp_path: Any) -> None:
    target = tmp_path / "elsewhere"
    os.symlink(target, checks.segment_path(shm_name))
    try:
        messages = checks.check_settings(None)
    finally:
        os.unlink(checks.segment_path(shm_name))
    assert ids(messages) == ["django_shmsession.E009"]
    assert "symbolic link" in messages[0].msg
    assert str(target) in messages[0].msg
    assert "uid 0 (root)" in messages[0].msg
    assert not target.exists()


def test_e009_segment_of_another_user(settings: Any, shm_name: str) -> None:
    SessionTable(shm_name, 1024 * 1024).close()
    os.chown(checks.segment_path(shm_name), NOBODY, NOBODY)
    messages = checks.check_settings(None)
    assert ids(messages) == ["django_shmsession.E009"]
    assert f"uid {NOBODY} (nobody)" in messages[0].msg


def test_e010_segment_of_another_layout_version(settings: Any, shm_name: str) -> None:
    SessionTable(shm_name, 1024 * 1024).close()
    with open(checks.segment_path(shm_name), "r+b") as file:
        os.pwrite(file.fileno(), (layout.LAYOUT_VERSION + 1).to_bytes(4, "little"), 8)
    messages = checks.check_settings(None)
    assert ids(messages) == ["django_shmsession.E010"]
    assert f"layout version {layout.LAYOUT_VERSION + 1}" in messages[0].msg
    with pytest.raises(SystemCheckError, match=r"django_shmsession\.E010"):
        call_command("check")


def test_e010_file_that_is_not_a_table(settings: Any, shm_name: str) -> None:
    plant_file(shm_name, b"PGSQL-not-ours" * (1024 * 1024 // 14 + 1))
    os.truncate(checks.segment_path(shm_name), 1024 * 1024)
    messages = checks.check_settings(None)
    assert ids(messages) == ["django_shmsession.E010"]
    assert "not a django-shmsession table" in messages[0].msg


def test_e011_corrupt_header(settings: Any, shm_name: str) -> None:
    SessionTable(shm_name, 1024 * 1024).close()
    with open(checks.segment_path(shm_name), "r+b") as file:
        offset = layout.GEOMETRY_OFFSET + 32  # a byte of the hash secret: only the CRC sees it
        old = os.pread(file.fileno(), 1, offset)
        os.pwrite(file.fileno(), bytes([old[0] ^ 0xFF]), offset)
    messages = checks.check_settings(None)
    assert ids(messages) == ["django_shmsession.E011"]


def test_w002_segment_whose_semaphore_was_removed(settings: Any, shm_name: str) -> None:
    SessionTable(shm_name, 1024 * 1024).close()
    os.unlink(checks.SHM_DIR + "/sem." + shm_name[1:] + ".lock")
    messages = checks.check_settings(None)
    assert ids(messages) == ["django_shmsession.W002"]
    assert "next request replaces it" in (messages[0].hint or "")


def test_w003_deploy_check_without_explicit_name(settings: Any) -> None:
    assert checks.check_explicit_name(None) == []
    settings.SHMSESSION = {"SIZE": "1M"}
    messages = checks.check_explicit_name(None)
    assert ids(messages) == ["django_shmsession.W003"]
    assert "/djshm-tests-" in (messages[0].hint or "")
    call_command("check")  # not a deploy check: plain `check` stays quiet
    with pytest.raises(SystemCheckError, match=r"django_shmsession\.W003"):
        call_command("check", "--deploy", "--fail-level", "WARNING")


def test_a_site_on_another_engine_gets_no_errors(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app installed, SESSION_ENGINE another: nothing about a table it does not use."""
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.db"
    del settings.SHMSESSION
    settings.SESSION_SERIALIZER = "tests.engine.test_checks.ReprSerializer"
    monkeypatch.setitem(sys.modules, "posix_ipc", None)
    monkeypatch.setattr(checks, "SHM_DIR", "/nonexistent-shm-dir")
    assert run_all() == []
    settings.SHMSESSION = {"SIZE": "100000G"}
    assert ids(run_all()) == ["django_shmsession.W001"]


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
