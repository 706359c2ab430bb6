"""`manage.py shmsession list|sessions|logout`, `--name`, `stats --format prometheus`, errors
about another user's table, and housekeeping that never creates a table."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import SESSION_KEY
from django.core.management import call_command
from django.core.management.base import CommandError

from django_shmsession import checks, store
from django_shmsession.backend import SessionStore
from django_shmsession.exceptions import SegmentNotFound
from django_shmsession.table import SessionTable

from .conftest import unique_name

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def login(user_id: int | str, **extra: Any) -> str:
    session = SessionStore()
    session[SESSION_KEY] = str(user_id)
    for key, value in extra.items():
        session[key] = value
    session.save()
    assert session.session_key is not None
    return session.session_key


def shm_listing() -> list[str]:
    return sorted(os.listdir(checks.SHM_DIR))


@pytest.fixture
def other_table() -> Iterator[str]:
    """A second table, not the one the settings name."""
    name = unique_name()
    table = SessionTable(name, 1024 * 1024)
    table.set("k" * 32, b'{"a": 1}', time.time() + 600)
    table.close()
    yield name
    SessionTable.unlink_name(name)


# --- list --------------------------------------------------------------------------------------


def test_list_shows_every_table_of_this_user(shm_name: str, other_table: str) -> None:
    login(1)
    time.sleep(1.1)  # writes change the files' ctime and mtime; their birth time stays
    with SessionTable(other_table) as table:
        table.set("j" * 32, b"{}", time.time() + 600)
    login(2)
    tables = {t["name"]: t for t in json.loads(run("shmsession", "list", "--json"))}
    assert tables[shm_name]["entries"] == 2
    assert tables[shm_name]["size"] == 1024 * 1024
    assert tables[shm_name]["state"] == "ok"
    assert tables[other_table]["entries"] == 2
    made = os.stat(checks.segment_path(other_table))
    assert tables[other_table]["created"] < made.st_mtime - 1  # when it was made, not written
    assert abs(tables[other_table]["created"] - time.time()) < 60
    assert re.match(r"\d{4}-\d\d-\d\dT", tables[other_table]["created_utc"])
    text = run("shmsession", "list")
    assert any(
        line.startswith(f"{shm_name}  1048576 bytes  2 entries") for line in text.splitlines()
    )


def test_list_skips_files_that_are_not_tables(shm_name: str) -> None:
    foreign = f"{checks.SHM_DIR}/{unique_name()[1:]}"
    with open(foreign, "wb") as file:
        file.write(b"not a session table".ljust(1 << 16, b"\0"))
    os.chmod(foreign, 0o600)
    try:
        names = [t["name"] for t in json.loads(run("shmsession", "list", "--json"))]
    finally:
        os.unlink(foreign)
    assert f"/{os.path.basename(foreign)}" not in names


def test_list_names_the_processes_that_map_a_table(shm_name: str) -> None:
    login(1)
    code = (
        "import sys, time; from django_shmsession.table import SessionTable\n"
        f"t = SessionTable({shm_name!r}); t.stats(); print('ready', flush=True); "
        "sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        listed = json.loads(run("shmsession", "list", "--json", "--name", shm_name))
    finally:
        child.communicate("", timeout=30)
    assert [t["name"] for t in listed] == [shm_name]
    assert child.pid in [p["pid"] for p in listed[0]["mapped_by"]]
    assert os.getpid() not in [p["pid"] for p in listed[0]["mapped_by"]]


def test_list_reports_a_table_of_another_layout_version(shm_name: str) -> None:
    from django_shmsession import layout

    login(1)
    store.reset()
    with open(checks.segment_path(shm_name), "r+b") as file:
        os.pwrite(file.fileno(), (layout.LAYOUT_VERSION + 1).to_bytes(4, "little"), 8)
    (listed,) = json.loads(run("shmsession", "list", "--json", "--name", shm_name))
    assert listed["state"].startswith("LayoutMismatch")
    assert listed["entries"] is None


# --- --name --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "action",
    [
        ["stats", "--json"],
        ["check", "--json"],
        ["sessions", "--json"],
        ["clear", "--noinput"],
        ["logout", "--user", "1", "--noinput"],
        ["unlink", "--noinput"],
    ],
)
def test_every_subcommand_takes_name(shm_name: str, other_table: str, action: list[str]) -> None:
    """--name reaches another table; the settings' table is neither touched nor created."""
    out = run("shmsession", *action, "--name", other_table)
    assert not os.path.exists(checks.segment_path(shm_name))
    expected = {
        "stats": lambda: json.loads(out)["name"] == other_table,
        "check": lambda: json.loads(out)["entries"] == 1,
        "sessions": lambda: len(json.loads(out)) == 1,
        "clear": lambda: f"Deleted 1 session(s) from '{other_table}'" in out,
        "logout": lambda: f"Deleted 0 session(s) of user '1' from '{other_table}'" in out,
        "unlink": lambda: not os.path.exists(checks.segment_path(other_table)),
    }
    assert expected[action[0]](), out


def test_name_without_slash_and_invalid_name() -> None:
    with pytest.raises(CommandError, match="No session table named '/no-such-table'"):
        run("shmsession", "stats", "--name", "no-such-table")
    with pytest.raises(CommandError, match="not a valid table name"):
        run("shmsession", "stats", "--name", "/bad name")


# --- stats --format prometheus -------------------------------------------------------------------

_SAMPLE = re.compile(
    r'^(django_shmsession_[a-z_]+)\{table="([^"]+)"(?:,class="([^"]+)")?\} (-?[0-9.e+-]+)$'
)


def test_stats_prometheus_text_format(shm_name: str) -> None:
    login(1)
    SessionStore(login(2)).load()
    out = run("shmsession", "stats", "--format", "prometheus")
    assert out.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[str, float] = {}
    for line in out.splitlines():
        if line.startswith("# TYPE "):
            _, _, metric, kind = line.split()
            types[metric] = kind
        elif line.startswith("# HELP "):
            continue
        else:
            match = _SAMPLE.match(line)
            assert match, line
            assert match[2] == shm_name
            metric = match[1] if match[3] is None else f"{match[1]}[{match[3]}]"
            samples[metric] = float(match[4])
            types.setdefault(metric, types[match[1]])
    assert {m for m in types if "[" not in m} == {m.split("[")[0] for m in samples}
    assert types["django_shmsession_hits_total"] == "counter"
    assert types["django_shmsession_entries"] == "gauge"
    assert samples["django_shmsession_entries"] == 2
    assert samples["django_shmsession_class_entries[signed-in]"] == 2  # both are logged in
    assert samples["django_shmsession_class_entries[anonymous]"] == 0
    assert types["django_shmsession_class_evictions_total"] == "counter"
    assert samples["django_shmsession_sets_total"] >= 2
    assert samples["django_shmsession_hits_total"] >= 1
    assert 0 < samples["django_shmsession_occupancy"] < 1
    assert json.loads(run("shmsession", "stats", "--format", "json"))["entries"] == 2


# --- sessions and logout -------------------------------------------------------------------------


def test_sessions_lists_without_values(shm_name: str) -> None:
    alice = login(7, secret="do-not-print")
    login(8)
    anonymous = SessionStore()
    anonymous["cart"] = [1, 2]
    anonymous.save()
    listed = json.loads(run("shmsession", "sessions", "--json"))
    by_prefix = {s["key_prefix"]: s for s in listed}
    assert len(listed) == 3
    assert by_prefix[alice[:8]]["user_id"] == "7"
    assert by_prefix[alice[:8]]["size"] > 0
    assert by_prefix[alice[:8]]["expires_at"] > time.time()
    assert by_prefix[anonymous.session_key[:8]]["user_id"] is None  # type: ignore[index]
    text = run("shmsession", "sessions")
    assert "do-not-print" not in text
    assert alice not in text  # only the prefix
    assert "3 live session(s)" in text


def test_sessions_of_one_user(shm_name: str) -> None:
    keys = {login(7), login(7)}
    login(8)
    listed = json.loads(run("shmsession", "sessions", "--user", "7", "--json"))
    assert {s["key_prefix"] for s in listed} == {k[:8] for k in keys}


def test_logout_deletes_every_session_of_one_user(shm_name: str) -> None:
    mine = [login(7) for _ in range(3)]
    theirs = login(8)
    out = run("shmsession", "logout", "--user", "7", "--noinput")
    assert "Deleted 3 session(s) of user '7'" in out
    assert not any(SessionStore().exists(k) for k in mine)
    assert SessionStore().exists(theirs)


def test_logout_asks_first(monkeypatch: pytest.MonkeyPatch) -> None:
    key = login(7)
    monkeypatch.setattr("builtins.input", lambda q: "no")
    assert "Nothing deleted." in run("shmsession", "logout", "--user", "7")
    assert SessionStore().exists(key)


def test_logout_needs_a_user() -> None:
    with pytest.raises(CommandError, match="--user"):
        run("shmsession", "logout", "--noinput")


def test_sessions_of_a_large_table_in_batches(shm_name: str) -> None:
    """More sessions than one scan batch (256): every one is seen once."""
    made = {login(i % 5) for i in range(600)}
    listed = json.loads(run("shmsession", "sessions", "--json"))
    assert len(listed) == len(made)
    assert sum(1 for s in listed if s["user_id"] == "3") == 120


# --- commands and housekeeping never create a table ----------------------------------------------


def test_clearsessions_with_a_wrong_name_leaves_dev_shm_unchanged(shm_name: str) -> None:
    before = shm_listing()
    with pytest.raises(SegmentNotFound, match=r"clearsessions never creates one"):
        call_command("clearsessions")
    assert shm_listing() == before
    assert not os.path.exists(checks.segment_path(shm_name))


@pytest.mark.parametrize(
    "action",
    [["stats"], ["check"], ["sessions"], ["clear", "--noinput"], ["logout", "--user", "1"]],
)
def test_subcommands_never_create_a_table(shm_name: str, action: list[str]) -> None:
    before = shm_listing()
    with pytest.raises(CommandError, match="No session table named"):
        run("shmsession", *action)
    call_command("check")
    assert shm_listing() == before


# --- another user's table ------------------------------------------------------------------------


def _as_nobody(*args: str) -> tuple[int, str]:
    """Run ``manage.py shmsession ARGS`` in a forked child that became uid nobody."""
    run("shmsession", "list")  # load the command (and the modules it imports) before dropping
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 0
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            run("shmsession", *args)
            message = "no error"
        except CommandError as err:
            code, message = 1, str(err)
        except BaseException as err:
            code, message = 2, f"{type(err).__name__}: {err}"
        os.write(write, message.encode())
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), message


@pytest.mark.multiprocess
def test_unlink_of_another_users_table_says_who_can_remove_it(shm_name: str) -> None:
    if os.geteuid() != 0:  # pragma: no cover - CI and the dev machines run as root
        pytest.fail("this test switches a child to uid nobody and needs root")
    login(1)
    store.reset()
    code, message = _as_nobody("unlink", "--noinput", "--name", shm_name)
    assert code == 1, message  # a CommandError, not a posix_ipc.PermissionsError traceback
    assert checks.segment_path(shm_name) in message or "sem." in message
    assert "uid 0 (root)" in message
    assert "sticky" in message
    assert "sudo rm" in message
    assert os.path.exists(checks.segment_path(shm_name))


@pytest.mark.multiprocess
def test_stats_of_another_users_table_is_our_error(shm_name: str) -> None:
    login(1)
    store.reset()
    code, message = _as_nobody("stats", "--name", shm_name)
    assert code == 1, message
    assert f"{checks.segment_path(shm_name)} is owned by uid 0 (root)" in message


def test_symlink_planted_under_the_name(shm_name: str, tmp_path: Path) -> None:
    target = tmp_path / "target"
    os.symlink(target, checks.segment_path(shm_name))
    try:
        with pytest.raises(CommandError, match="is a symbolic link to") as info:
            run("shmsession", "unlink", "--noinput")
        assert "Errno" not in str(info.value)
        with pytest.raises(CommandError, match="symbolic link"):
            run("shmsession", "stats")
        assert os.path.islink(checks.segment_path(shm_name))
    finally:
        os.unlink(checks.segment_path(shm_name))
    assert not target.exists()


def test_logout_refuses_the_tiered_engines_l1(settings: Any) -> None:
    """Under the tiered engine the table is a host's L1: deleting there would leave the user
    signed in through L2 and on every other host, so the command says where to delete."""
    key = login(7)
    settings.SESSION_ENGINE = "django_shmsession.tiered"
    with pytest.raises(CommandError, match="tiered engine"):
        run("shmsession", "logout", "--user", "7", "--noinput")
    settings.SESSION_ENGINE = "django_shmsession.backend"
    assert SessionStore().exists(key)
