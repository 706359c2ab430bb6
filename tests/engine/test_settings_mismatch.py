"""MAX_SESSION_SIZE and FULL_POLICY are recorded by the table's creator: a process configured
otherwise gets an error naming the SHMSESSION key and both values, from the engine, from
``manage.py check`` (E012) and from a server that starts with them; commands still inspect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from django_shmsession import checks
from django_shmsession.backend import SessionStore
from django_shmsession.exceptions import SettingsMismatch
from django_shmsession.table import SessionTable

from . import servers
from .test_introspection import run


@pytest.fixture
def created_with_defaults(shm_name: str) -> str:
    """The table as another process made it: MAX_SESSION_SIZE 64K, FULL_POLICY "evict"."""
    SessionTable(shm_name, 1024 * 1024, max_value_size=65536, full_policy="evict").close()
    return shm_name


@pytest.mark.parametrize(
    ("key", "value", "recorded", "requested"),
    [("MAX_SESSION_SIZE", "128K", "65536", "131072"), ("FULL_POLICY", "raise", "evict", "raise")],
)
def test_the_engine_names_the_setting_and_both_values(
    settings: Any, created_with_defaults: str, key: str, value: str, recorded: str, requested: str
) -> None:
    settings.SHMSESSION = {"NAME": created_with_defaults, "SIZE": "1M", key: value}
    with pytest.raises(SettingsMismatch) as info:
        SessionStore().create()
    message = str(info.value)
    assert f"SHMSESSION['{key}']={recorded}" in message.replace("'evict'", "evict")
    assert requested in message
    assert created_with_defaults in message


def test_manage_py_check_reports_e012(settings: Any, created_with_defaults: str) -> None:
    settings.SHMSESSION = {"NAME": created_with_defaults, "SIZE": "1M", "MAX_SESSION_SIZE": "128K"}
    messages = checks.check_settings(None)
    assert [m.id for m in messages] == ["django_shmsession.E012"]
    assert "65536" in messages[0].msg
    assert "131072" in messages[0].msg
    assert "SHMSESSION['MAX_SESSION_SIZE'] = 65536" in (messages[0].hint or "")
    with pytest.raises(SystemCheckError, match=r"django_shmsession\.E012"):
        call_command("check")


def test_commands_inspect_a_table_whatever_its_settings(
    settings: Any, created_with_defaults: str
) -> None:
    settings.SHMSESSION = {"NAME": created_with_defaults, "SIZE": "1M", "FULL_POLICY": "raise"}
    assert json.loads(run("shmsession", "stats", "--json"))["name"] == created_with_defaults
    assert "0 live session(s)" in run("shmsession", "sessions")


@pytest.mark.multiprocess
def test_a_server_started_with_other_settings_stops_with_the_message(
    tmp_path: Path, created_with_defaults: str
) -> None:
    """gunicorn's on_starting hook opens the table in the master: the server does not start,
    and its log says which setting differs and how."""
    server = servers.gunicorn(created_with_defaults, size="1M", workers=1)
    server.env["SHMSESSION_MAX_SESSION_SIZE"] = "128K"
    with pytest.raises(AssertionError, match="server exited early") as info:
        server.start(tmp_path)
    server.stop()
    assert "SettingsMismatch" in str(info.value)
    assert "SHMSESSION['MAX_SESSION_SIZE']=65536" in str(info.value)
    assert "131072" in str(info.value)


@pytest.mark.multiprocess
def test_manage_py_check_of_the_test_project(created_with_defaults: str) -> None:
    env = servers.project_env(created_with_defaults, "1M")
    env["SHMSESSION_FULL_POLICY"] = "raise"
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=servers.PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "django_shmsession.E012" in result.stderr
    assert "SHMSESSION['FULL_POLICY']='evict'" in result.stderr
