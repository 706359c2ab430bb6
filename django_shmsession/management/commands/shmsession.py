"""``manage.py shmsession ACTION``: inspect and reset the session table.

Actions: ``stats``, ``check``, ``clear``, ``unlink``, ``list``, ``sessions``, ``logout``,
``dump``, ``restore`` (snapshots, docs/snapshot.md: the one action that creates a table),
``listen`` (the tiered engine's host listener, for servers other than gunicorn). Each one
is an ``_add_<action>`` method (its arguments) and a ``_<action>`` method (what it does),
dispatched by name, so a new action is two methods and one entry in ``ACTIONS``. Every action
takes ``--name`` to inspect a table other than the settings' NAME without editing settings.

Every action opens the *existing* segment only: inspecting a table must never create one (a
typo in NAME would otherwise silently make an empty second table). Table errors become
``CommandError`` with the table's message, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_shmsession import conf, introspection, snapshot_ops, store
from django_shmsession.exceptions import SegmentNotFound, ShmSessionError
from django_shmsession.table import SessionTable

#: Every action, in the order ``--help`` lists them, with its one-line help.
ACTIONS = {
    "stats": "occupancy, counts, evictions, lock waits (--json, --format prometheus)",
    "check": "verify the table's consistency",
    "clear": "delete every session (everyone is logged out)",
    "unlink": "remove the segment and its semaphores (every session is lost)",
    "list": "every django-shmsession table of this user in /dev/shm",
    "sessions": "the live sessions: key prefix, size, expiry, user id (never their values)",
    "logout": "delete every session of one user (--user ID)",
    "dump": "write a snapshot of every live session to PATH (-: stdout)",
    "restore": "load a snapshot from PATH (-: stdin) into the table (created if absent)",
    "listen": "run the tiered engine's invalidation listener (until SIGTERM)",
}


TIERED_ENGINE = "django_shmsession.tiered"


class Command(BaseCommand):
    help = "Inspect (stats, check, list, sessions) or reset (clear, unlink, logout) the table."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
        for action, text in ACTIONS.items():
            sub = actions.add_parser(action, help=text)
            sub.add_argument(
                "--name",
                help="the table's POSIX name, e.g. /mysite-sessions (default: SHMSESSION['NAME'])",
            )
            getattr(self, f"_add_{action}")(sub)

    def handle(self, *args: Any, **options: Any) -> None:
        config = conf.get_config()
        if options.get("name"):
            config = dataclasses.replace(config, name=_valid_name(options["name"]))
        run: Callable[[conf.ShmSessionConfig, dict[str, Any]], None] = getattr(
            self, f"_{options['action']}"
        )
        try:
            run(config, options)
        except ShmSessionError as err:
            raise CommandError(str(err)) from err

    # -- arguments ------------------------------------------------------------------------------

    def _add_stats(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--format",
            choices=("text", "json", "prometheus"),
            default="text",
            help="text (default), one JSON object, or Prometheus text exposition (for "
            "node_exporter's textfile collector)",
        )
        parser.add_argument("--json", action="store_true", help="same as --format json")
        parser.add_argument(
            "--snapshot",
            metavar="PATH",
            help="show the last dump and restore of this snapshot (default: SNAPSHOT['PATH'])",
        )

    def _add_check(self, parser: CommandParser) -> None:
        parser.add_argument("--repair", action="store_true", help="fix what the check finds")
        parser.add_argument("--json", action="store_true", help="one JSON object, for scripts")

    def _add_clear(self, parser: CommandParser) -> None:
        _add_noinput(parser)

    def _add_unlink(self, parser: CommandParser) -> None:
        _add_noinput(parser)

    def _add_list(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="a JSON list, for scripts")

    def _add_sessions(self, parser: CommandParser) -> None:
        parser.add_argument("--user", help="only the sessions of this user id (_auth_user_id)")
        parser.add_argument("--json", action="store_true", help="a JSON list, for scripts")

    def _add_logout(self, parser: CommandParser) -> None:
        parser.add_argument("--user", required=True, help="the user id (_auth_user_id)")
        _add_noinput(parser)

    def _add_dump(self, parser: CommandParser) -> None:
        _add_snapshot_path(parser)

    def _add_restore(self, parser: CommandParser) -> None:
        _add_snapshot_path(parser)

    def _add_listen(self, parser: CommandParser) -> None:
        pass

    # -- actions --------------------------------------------------------------------------------

    def _listen(self, config: conf.ShmSessionConfig, options: dict[str, Any]) -> None:
        if not _tiered():
            raise CommandError(
                f"The listener serves SESSION_ENGINE = {conf.TIERED_ENGINE!r}; this site uses "
                f"{getattr(settings, 'SESSION_ENGINE', '')!r}, which needs none."
            )
        if options.get("name"):
            raise CommandError("listen serves the settings' NAME; --name is for inspection.")
        from django_shmsession.tiered import listener

        self.stdout.write("django-shmsession: listening for invalidations (SIGTERM stops)")
        listener.run_forever()

    def _stats(self, config: conf.ShmSessionConfig, options: dict[str, Any]) -> None:
        output = "json" if options["json"] else options["format"]
        with self._open(config) as table:
            stats: dict[str, Any] = dict(table.stats().as_dict())
            if output != "prometheus" and _tiered():
                from django_shmsession.tiered import hoststats

                stats.update(hoststats.collect(table))
        runs = snapshot_ops.last_runs(options["snapshot"] or _default_path(config))
        # Prometheus gets the numbers it can export (a run that never happened has none).
        stats.update(runs if output != "prometheus" else _known(runs))
        if output == "json":
            self.stdout.write(json.dumps(stats, sort_keys=True))
        elif output == "prometheus":
            prometheus = introspection.prometheus(stats, store.CLASS_NAMES)
            self.stdout.write(prometheus, ending="")
        else:
            width = max(len(k) for k in stats)
            for key, value in stats.items():
                self.stdout.write(f"{key.ljust(width)}  {_human(key, value)}")

    def _check(self, config: conf.ShmSessionConfig, options: dict[str, Any]) -> None:
        with self._open(config) as table:
            report = table.check(repair=options["repair"])
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), sort_keys=True))
        else:
            for problem in report.problems:
                self.stdout.write(f"problem: {problem}")
            state = "repaired" if report.repaired else ("ok" if report.ok else "NOT OK")
            self.stdout.write(f"{config.name}: {state}, {report.entries} entries")
        if not report.ok and not report.repaired:
            raise CommandError(
                f"{len(report.problems)} problem(s) found; run "
                f"`python manage.py shmsession check --repair` to fix them."
            )

    def _clear(self, config: conf.ShmSessionConfig, options: dict[str, Any]) -> None:
        with self._open(config) as table:
            if not self._confirm(options, f"Delete every session in {config.name!r}?"):
                self.stdout.write("Nothing deleted.")
                return
            removed = table.clear()
        self.stdout.write(f"Deleted {removed} session(s) from {config.name!r}.")

    def _unlink(self, config: conf.ShmSessionConfig, options: dict[str, Any]) -> None:
        question = (
            f"Remove the segment {config.name!r} and its semaphores? Every session is lost; "
            f"running workers switch to a new, empty table within a second."
        )
        if not self._confirm(options, question):
            self.stdout.write("Nothing removed.")
            return
        store.reset()  # drop this process's mapping of the segment we are about to remove
        if SessionTable.unlink_name(config.name):
            self.stdout.write(f"Removed {config.name!r}.")
        else:
            self.stdout.write(f"No segment named {config.name!r}; nothing to remove.")

    def _list(self, config: conf.ShmSessionConfig, options: dict[str, Any]) -> None:
        only = config.name if options.get("name") else None
        tables = [t for t in introspection.list_tables(config) if only in (None, t.name)]
        if options["json"]:
            self.stdout.write(json.dumps([t.as_dict() for t in tables], sort_keys=True))
            return
        if not tables:
            where = introspection.SHM_DIR
            self.stdout.write(f"No django-shmsession table of this user in {where}.")
            return
        for table in tables:
            self.stdout.write(table.describe())

    def _sessions(self, config: conf.ShmSessionConfig, options: dict[str, Any]) -> None:
        user = options.get("user")
        with self._open(config) as table:
            found = [s for s in introspection.sessions(table) if user is None or s.user_id == user]
        if options["json"]:
            self.stdout.write(json.dumps([s.as_dict() for s in found], sort_keys=True))
            return
        for session in found:
            self.stdout.write(session.describe())
        who = f" of user {user}" if user is not None else ""
        self.stdout.write(f"{len(found)} live session(s){who} in {config.name!r}.")

    def _logout(self, config: conf.ShmSessionConfig, options: dict[str, Any]) -> None:
        user = options["user"]
        if settings.SESSION_ENGINE == TIERED_ENGINE:
            # This table is only a host's L1: deleting here leaves the user signed in through
            # L2 and on every other host.
            raise CommandError(
                "logout works on the plain engine's table only; with the tiered engine, delete "
                "the user's sessions in L2 (for the db L2: Session objects; for Redis: its keys) "
                "and the hosts' listeners drop them from every L1"
            )
        question = f"Delete every session of user {user!r} in {config.name!r}?"
        with self._open(config) as table:
            if not self._confirm(options, question):
                self.stdout.write("Nothing deleted.")
                return
            removed = introspection.logout(table, user)
        self.stdout.write(f"Deleted {removed} session(s) of user {user!r} from {config.name!r}.")

    def _dump(self, config: conf.ShmSessionConfig, options: dict[str, Any]) -> None:
        path = _snapshot_path(config, options["path"])
        with self._open(config) as table:
            try:
                result = snapshot_ops.dump(table, path)
            except OSError as err:
                raise CommandError(f"cannot write the snapshot {path}: {err}") from err
        # With "-" stdout carries the snapshot itself: the report goes to stderr.
        (self.stderr if path == "-" else self.stdout).write(result.summary())

    def _restore(self, config: conf.ShmSessionConfig, options: dict[str, Any]) -> None:
        """Into the table, created with the configured SIZE if absent: restoring before the
        site starts is how a new SIZE is filled (see the README)."""
        path = _snapshot_path(config, options["path"])
        with store.open_table(config, create=True) as table:
            result = snapshot_ops.restore(table, path)
            self.stdout.write(result.summary())
            if result.did_not_fit:
                self.stdout.write(
                    f"{result.did_not_fit} session(s) did not fit in the table "
                    f"({table.size} bytes); the ones that expire last were kept. Raise "
                    "SHMSESSION['SIZE'] to keep them all."
                )
        result.raise_if_damaged()

    # -- helpers --------------------------------------------------------------------------------

    def _open(self, config: conf.ShmSessionConfig) -> SessionTable:
        """The existing table (closed by the caller's ``with``); never creates one. Its recorded
        MAX_SESSION_SIZE and FULL_POLICY are adopted: inspecting or clearing a table works
        whatever settings it was created with."""
        try:
            return store.open_table(config, create=False, adopt=True)
        except SegmentNotFound as err:
            raise CommandError(
                f"No session table named {config.name!r} exists yet: it is created by the first "
                f"request (or by the gunicorn on_starting hook). Check SHMSESSION['NAME'] (or "
                f"--name; `manage.py shmsession list` shows the tables there are). ({err})"
            ) from err

    def _confirm(self, options: dict[str, Any], question: str) -> bool:
        if not options["interactive"]:
            return True
        try:
            answer = input(f"{question} Type 'yes' to continue, or 'no' to cancel: ")
        except EOFError:  # no terminal (cron, a pipe): never destroy sessions unasked
            self.stderr.write("\nNo answer (stdin is closed); cancelled. Pass --noinput to skip.")
            return False
        return answer.strip().lower() == "yes"


def _add_noinput(parser: CommandParser) -> None:
    parser.add_argument(
        "--noinput",
        "--no-input",
        action="store_false",
        dest="interactive",
        help="do not ask for confirmation",
    )


def _add_snapshot_path(parser: CommandParser) -> None:
    parser.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help="the snapshot file, or - (default: SHMSESSION['SNAPSHOT']['PATH'])",
    )


def _default_path(config: conf.ShmSessionConfig) -> str | None:
    return config.snapshot.path if config.snapshot is not None else None


def _snapshot_path(config: conf.ShmSessionConfig, given: str | None) -> str:
    path = given or _default_path(config)
    if path is None:
        raise CommandError(
            "Give the snapshot's PATH (or - for stdin/stdout), or set "
            "SHMSESSION['SNAPSHOT'] = {'PATH': '/var/lib/mysite/sessions.snap'}."
        )
    return path


def _known(runs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in runs.items() if value is not None}


def _valid_name(name: str) -> str:
    """``--name`` is checked like SHMSESSION['NAME'] (a leading slash is added if missing)."""
    name = name if name.startswith("/") else f"/{name}"
    if not conf.NAME_RE.match(name):
        raise CommandError(
            f"--name {name!r} is not a valid table name: a slash followed by up to 200 letters, "
            f"digits, '.', '_' or '-', e.g. --name /mysite-sessions."
        )
    return name


def _human(key: str, value: int | float | str | None) -> str:
    """Byte counts with a readable unit beside them, fractions as percentages, times in UTC."""
    if value is None:
        return "never" if key.endswith("_at") else "-"
    if key == "snapshot_path" and not value:
        return "(none: no SHMSESSION['SNAPSHOT'])"
    if key.endswith("_at") and isinstance(value, (int, float)):
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
        return f"{when} ({max(time.time() - value, 0):.0f} s ago)"
    if key.endswith("_duration") and isinstance(value, (int, float)):
        return f"{value:.3f} s"
    if key == "occupancy" and isinstance(value, float):
        return f"{100 * value:.2f} %"
    if key.endswith(("_size", "_bytes")) and isinstance(value, int) and value >= 1024:
        return (
            f"{value} ({value / 1024**2:.1f} MiB)"
            if value >= 1024**2
            else f"{value} ({value / 1024:.1f} KiB)"
        )
    return str(value)


def _tiered() -> bool:
    return getattr(settings, "SESSION_ENGINE", "") == conf.TIERED_ENGINE
