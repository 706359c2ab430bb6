"""``manage.py shmsession stats|check|clear|unlink``: inspect and reset the session table.

Every action opens the *existing* segment only: inspecting a table must never create one (a
typo in NAME would otherwise silently make an empty second table).
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_shmsession import conf, store
from django_shmsession.exceptions import SegmentNotFound, ShmSessionError
from django_shmsession.table import SessionTable


class Command(BaseCommand):
    help = "Inspect (stats, check) or reset (clear, unlink) the shared-memory session table."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
        stats = actions.add_parser("stats", help="occupancy, counts, evictions, lock waits")
        stats.add_argument("--json", action="store_true", help="one JSON object, for scripts")
        check = actions.add_parser("check", help="verify the table's consistency")
        check.add_argument("--repair", action="store_true", help="fix what the check finds")
        check.add_argument("--json", action="store_true", help="one JSON object, for scripts")
        for name, text in (
            ("clear", "delete every session (everyone is logged out)"),
            ("unlink", "remove the segment and its semaphores (every session is lost)"),
        ):
            sub = actions.add_parser(name, help=text)
            sub.add_argument(
                "--noinput",
                "--no-input",
                action="store_false",
                dest="interactive",
                help="do not ask for confirmation",
            )

    def handle(self, *args: Any, **options: Any) -> None:
        config = conf.get_config()
        action = options["action"]
        if action == "unlink":
            self._unlink(config, options["interactive"])
            return
        table = self._open(config)
        try:
            if action == "stats":
                self._stats(table, options["json"])
            elif action == "check":
                self._check(table, options["repair"], options["json"])
            else:
                self._clear(table, options["interactive"])
        except ShmSessionError as err:
            raise CommandError(str(err)) from err
        finally:
            table.close()

    def _open(self, config: conf.ShmSessionConfig) -> SessionTable:
        try:
            return store.open_table(config, create=False)
        except SegmentNotFound as err:
            raise CommandError(
                f"No session table named {config.name!r} exists yet: it is created by the first "
                f"request (or by the gunicorn on_starting hook). Check SHMSESSION['NAME']."
            ) from err
        except ShmSessionError as err:
            raise CommandError(str(err)) from err

    def _stats(self, table: SessionTable, as_json: bool) -> None:
        stats = table.stats().as_dict()
        if as_json:
            self.stdout.write(json.dumps(stats, sort_keys=True))
            return
        width = max(len(k) for k in stats)
        for key, value in stats.items():
            self.stdout.write(f"{key.ljust(width)}  {_human(key, value)}")

    def _check(self, table: SessionTable, repair: bool, as_json: bool) -> None:
        report = table.check(repair=repair)
        if as_json:
            self.stdout.write(json.dumps(report.as_dict(), sort_keys=True))
        else:
            for problem in report.problems:
                self.stdout.write(f"problem: {problem}")
            state = "repaired" if report.repaired else ("ok" if report.ok else "NOT OK")
            self.stdout.write(f"{table.name}: {state}, {report.entries} entries")
        if not report.ok and not report.repaired:
            raise CommandError(
                f"{len(report.problems)} problem(s) found; run "
                f"`python manage.py shmsession check --repair` to fix them."
            )

    def _clear(self, table: SessionTable, interactive: bool) -> None:
        if not self._confirm(interactive, f"Delete every session in {table.name!r}?"):
            self.stdout.write("Nothing deleted.")
            return
        removed = table.clear()
        self.stdout.write(f"Deleted {removed} session(s) from {table.name!r}.")

    def _unlink(self, config: conf.ShmSessionConfig, interactive: bool) -> None:
        question = (
            f"Remove the segment {config.name!r} and its semaphores? Every session is lost; "
            f"running workers switch to a new, empty table within a second."
        )
        if not self._confirm(interactive, question):
            self.stdout.write("Nothing removed.")
            return
        store.reset()  # drop this process's mapping of the segment we are about to remove
        if SessionTable.unlink_name(config.name):
            self.stdout.write(f"Removed {config.name!r}.")
        else:
            self.stdout.write(f"No segment named {config.name!r}; nothing to remove.")

    def _confirm(self, interactive: bool, question: str) -> bool:
        if not interactive:
            return True
        try:
            answer = input(f"{question} Type 'yes' to continue, or 'no' to cancel: ")
        except EOFError:  # no terminal (cron, a pipe): never destroy sessions unasked
            self.stderr.write("\nNo answer (stdin is closed); cancelled. Pass --noinput to skip.")
            return False
        return answer.strip().lower() == "yes"


def _human(key: str, value: int | float | str) -> str:
    """Byte counts with a readable unit beside them, fractions as percentages."""
    if key == "occupancy" and isinstance(value, float):
        return f"{100 * value:.2f} %"
    if key.endswith(("_size", "_bytes")) and isinstance(value, int) and value >= 1024:
        return (
            f"{value} ({value / 1024**2:.1f} MiB)"
            if value >= 1024**2
            else f"{value} ({value / 1024:.1f} KiB)"
        )
    return str(value)
