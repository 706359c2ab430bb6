"""Operator surface of the tiered engine: ``shmsession stats`` and ``listen``, the system
checks, ``clearsessions``, and the listener process (flush on start, standby, heartbeat)."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from io import StringIO
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import CommandError

from django_shmsession import store
from django_shmsession.tiered import hoststats, words
from django_shmsession.tiered.engine import SessionStore
from tests.engine.servers import PROJECT

from .conftest import ListenerThread, wait_for
from .l2servers import RedisServer


def ids(messages: list[Any]) -> set[str]:
    return {m.id for m in messages}


@pytest.mark.usefixtures("redis_tiered")
def test_stats_show_hits_revalidations_errors_and_listener(listener: ListenerThread) -> None:
    s = SessionStore()
    s["a"] = 1
    s.save()
    for _ in range(3):
        SessionStore(s.session_key).load()
    hoststats.publish(store.get_table())
    out = StringIO()
    call_command("shmsession", "stats", "--json", stdout=out)
    stats = json.loads(out.getvalue())
    assert stats["tiered_listener"] == "up"
    assert stats["tiered_listener_pid"] == os.getpid()
    assert stats["tiered_l1_hits"] >= 3
    assert 0 < stats["tiered_l1_hit_ratio"] <= 1
    assert stats["tiered_l1_flushes"] >= 1
    assert stats["tiered_processes_counted"] >= 1
    for name in ("tiered_revalidations", "tiered_l2_errors", "tiered_invalidations_received"):
        assert name in stats
    text = StringIO()
    call_command("shmsession", "stats", stdout=text)
    assert "tiered_listener" in text.getvalue()


@pytest.mark.usefixtures("redis_tiered")
def test_stats_say_listener_down_and_check_warns() -> None:
    SessionStore().save()  # the segment exists
    out = StringIO()
    call_command("shmsession", "stats", "--json", stdout=out)
    assert json.loads(out.getvalue())["tiered_listener"] == "DOWN"
    assert "django_shmsession.tiered.W003" in ids(run_checks())


@pytest.mark.usefixtures("redis_tiered")
def test_listener_check_is_quiet_while_it_runs(listener: ListenerThread) -> None:
    assert "django_shmsession.tiered.W003" not in ids(run_checks())


def test_deploy_check_probes_l2(settings: Any, redis_tiered: str) -> None:
    assert "django_shmsession.tiered.E002" not in ids(run_checks(include_deployment_checks=True))
    settings.SHMSESSION = {
        **settings.SHMSESSION,
        "L2": {"BACKEND": "redis", "LOCATION": "redis://127.0.0.1:1/0"},
    }
    found = [m for m in run_checks(include_deployment_checks=True) if m.id.endswith("E002")]
    assert found
    assert "redis://127.0.0.1:1/0" in found[0].msg


def test_redis_eviction_policy_warns(redis_server: RedisServer, redis_tiered: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.config_set("maxmemory-policy", "volatile-lru")
    try:
        assert "django_shmsession.tiered.W001" in ids(run_checks(include_deployment_checks=True))
    finally:
        client.config_set("maxmemory-policy", "noeviction")
    assert "django_shmsession.tiered.W001" not in ids(run_checks(include_deployment_checks=True))


@pytest.mark.usefixtures("shm_name")
def test_invalid_tiered_settings_are_e001(settings: Any) -> None:
    settings.SESSION_ENGINE = "django_shmsession.tiered"
    settings.SHMSESSION = {"L2": {"BACKEND": "memcached"}}
    messages = [m for m in run_checks() if m.id == "django_shmsession.tiered.E001"]
    assert messages
    assert "'redis'" in messages[0].msg


def test_db_checks(settings: Any, db_tiered: str) -> None:
    found = ids(run_checks(databases=[settings.SHMSESSION["L2"]["DATABASE"]]))
    assert "django_shmsession.tiered.W004" not in found  # migrated by the fixture
    assert "django_shmsession.tiered.W002" not in found  # PostgreSQL
    assert "django_shmsession.tiered.W005" not in found  # functions installed by the fixture
    settings.INSTALLED_APPS = [a for a in settings.INSTALLED_APPS if a != "django.contrib.sessions"]
    assert "django_shmsession.tiered.E003" in ids(run_checks())


def test_missing_functions_are_w005(settings: Any, db_tiered: str) -> None:
    from django.db import connections

    migration = importlib.import_module("django_shmsession.migrations.0001_postgres_functions")
    alias = settings.SHMSESSION["L2"]["DATABASE"]
    with connections[alias].cursor() as cursor:
        for sql in migration.DROP_V1:
            cursor.execute(sql)
    try:
        found = [m for m in run_checks(databases=[alias]) if m.id.endswith("W005")]
        assert len(found) == 1
        assert "migrate django_shmsession" in found[0].hint
    finally:
        call_command("migrate", "django_shmsession", "zero", database=alias, verbosity=0)
        call_command("migrate", "django_shmsession", database=alias, verbosity=0)
    assert not [m for m in run_checks(databases=[alias]) if m.id.endswith("W005")]


@pytest.mark.usefixtures("db_tiered")
def test_clearsessions_clears_l2_and_l1(settings: Any) -> None:
    from django.contrib.sessions.models import Session

    alias = settings.SHMSESSION["L2"]["DATABASE"]
    s = SessionStore()
    s.set_expiry(1)
    s.save()
    live = SessionStore()
    live.save()
    Session.objects.using(alias).filter(session_key=s.session_key).update(
        expire_date=Session.objects.using(alias).get(session_key=s.session_key).expire_date
        - __import__("datetime").timedelta(seconds=5)
    )
    call_command("clearsessions")
    assert not Session.objects.using(alias).filter(session_key=s.session_key).exists()
    assert Session.objects.using(alias).filter(session_key=live.session_key).exists()


@pytest.mark.usefixtures("redis_tiered")
def test_listener_flushes_l1_when_it_starts() -> None:
    s = SessionStore()
    s.save()
    assert store.get_table().get(s.session_key or "") is not None
    thread = ListenerThread().start()
    try:
        assert store.get_table().get(s.session_key or "") is None  # invalidations may be lost
        assert SessionStore(s.session_key).load() == {}  # an empty session is {}, from L2
        assert store.get_table().read_app_word(words.FLUSHES) == 1
    finally:
        thread.close()
    assert not words.listener_up(store.get_table())  # a stopped listener clears its heartbeat


@pytest.mark.usefixtures("redis_tiered")
def test_second_listener_stands_by_and_takes_over(listener: ListenerThread) -> None:
    second = ListenerThread()
    second.thread.start()
    time.sleep(0.5)
    assert store.get_table().read_app_word(words.FLUSHES) == 1  # the standby did nothing
    listener.close()
    wait_for(lambda: words.listener_up(store.get_table()), "the standby to take over")
    assert store.get_table().read_app_word(words.FLUSHES) == 2
    second.close()


def test_listen_command_refuses_the_plain_engine() -> None:
    with pytest.raises(CommandError, match="needs none"):
        call_command("shmsession", "listen")


@pytest.mark.multiprocess
def test_listen_command_runs_until_sigterm(redis_tiered: str, settings: Any) -> None:
    """``manage.py shmsession listen`` in its own process heartbeats into the table."""
    SessionStore().save()
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
    env["SESSION_ENGINE"] = "django_shmsession.tiered"
    env["SHMSESSION_NAME"] = settings.SHMSESSION["NAME"]
    env["SHMSESSION_SIZE"] = settings.SHMSESSION["SIZE"]
    env["SHMSESSION_L2"] = json.dumps(settings.SHMSESSION["L2"])
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "shmsession", "listen"],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: words.listener_up(store.get_table()), "the listen command", 20)
        assert store.get_table().read_app_word(words.LISTENER_PID) == proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out
    assert not words.listener_up(store.get_table())
