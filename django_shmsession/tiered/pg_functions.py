"""The db L2's PL/pgSQL functions on PostgreSQL: update and delete, each with its NOTIFY.

Why functions: Django leaves psycopg's prepared statements off by default (for connection
poolers), so every save's ``WITH u AS (UPDATE ...) SELECT pg_notify(...)`` was parsed and
planned anew. PL/pgSQL prepares the statements inside a function once per connection and
reuses the plans, and a call of a function is cheap to plan, so a site gets most of what
prepared statements give with no setting and nothing a pooler must know about (the plans live
in the server process, not in the protocol). Measured on one connection (psycopg, 300 B
session, the benchmark cluster): server CPU per update 273-290 µs as the statement, 167-183 µs
as the function call (117-150 µs prepared); round trip 447-457 µs against 325-364 µs.

Migration ``django_shmsession.0001_postgres_functions`` installs them (``manage.py migrate``)
and holds their SQL, frozen: a change of name, arguments or behaviour is a new version
(``_v2``) installed by a new migration beside the old one, so that workers of the previous
release keep working during a rolling upgrade. Both run as the caller (SECURITY INVOKER, the
default). Until they exist (and may be executed), :class:`Availability` says no, the db L2
sends the same SQL as plain statements (same results, same invalidations), and a system check
(W005) says so.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = [
    "DELETE_CALL",
    "PRESENT_QUERY",
    "UPDATE_CALL",
    "Availability",
    "delete_statement",
    "update_statement",
]

UPDATE_FUNCTION = "shmsession_update_v1"
DELETE_FUNCTION = "shmsession_delete_v1"
UPDATE_SIGNATURE = f"{UPDATE_FUNCTION}(text, text, timestamptz, timestamptz, text, text)"
DELETE_SIGNATURE = f"{DELETE_FUNCTION}(text, text, text)"

#: The calls the db L2 sends (parameters as in :func:`update_statement` and the delete below).
UPDATE_CALL = f"SELECT {UPDATE_FUNCTION}(%s, %s, %s, %s, %s, %s)"
DELETE_CALL = f"SELECT {DELETE_FUNCTION}(%s, %s, %s)"

#: The conditional UPDATE (the new version is the row's + 1, read under the row lock; a row
#: holding no version of ours restarts at 1), with ``{table}``, ``{body}``, ``{expire}``,
#: ``{key}`` and ``{now}`` to fill in: the statement, and (frozen in the migration) the body
#: of ``shmsession_update_v1``, which a test compares.
_UPDATE = (
    "UPDATE {table} SET session_data = "
    "(CASE WHEN session_data ~ '^[0-9]{{1,19}}[:b]' "
    "THEN substring(session_data from '^[0-9]+')::numeric + 1 ELSE 1 END)::text || {body}, "
    "expire_date = {expire} WHERE session_key = {key} AND expire_date > {now} "
    "RETURNING substring(session_data from '^[0-9]+')"
)


def update_statement(table: str) -> str:
    """The update as one SQL statement (for a database without the functions).

    Parameters: body, expire, key, now, channel, notice; returns the new version and sends
    ``"<version> <notice>"`` on the channel, at commit, only if a live row was updated.
    """
    update = _UPDATE.format(table=table, body="%s", expire="%s", key="%s", now="%s")
    return f"WITH u AS ({update} AS v) SELECT v, pg_notify(%s, v || ' ' || %s) FROM u"


def delete_statement(table: str) -> str:
    """The delete as one SQL statement (parameters: key, channel, notice)."""
    return (
        f"WITH d AS (DELETE FROM {table} WHERE session_key = %s RETURNING 1) "
        f"SELECT pg_notify(%s, %s) FROM d"
    )


#: Whether both functions exist on the caller's search_path and the caller may call them
#: (a hardened database may revoke EXECUTE from PUBLIC).
PRESENT_QUERY = (
    f"SELECT coalesce(has_function_privilege(to_regprocedure('{UPDATE_SIGNATURE}'), 'EXECUTE') "
    f"AND has_function_privilege(to_regprocedure('{DELETE_SIGNATURE}'), 'EXECUTE'), false)"
)
#: SQLSTATEs of a call that cannot work (undefined_function, insufficient_privilege): the
#: functions were dropped or EXECUTE revoked after the L2 asked.
MISSING_STATES = frozenset({"42883", "42501"})


class Availability:
    """Whether the functions are installed on one database, asked once and remembered.

    A yes is kept until a call finds them gone (the db L2 then records a no: somebody ran the
    migration backwards or revoked EXECUTE); a no is asked again after ``RECHECK`` seconds, so
    workers started before ``migrate`` pick the functions up without a restart.
    """

    RECHECK = 60.0

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._known: bool | None = None
        self._asked_at = 0.0

    def known(self) -> bool | None:
        """True or False while the last answer holds, None when the database must be asked."""
        if self._known is False and self._clock() - self._asked_at >= self.RECHECK:
            self._known = None
        return self._known

    def record(self, present: bool) -> bool:
        """Remember the answer (a no, for ``RECHECK`` seconds); returns it."""
        self._known, self._asked_at = present, self._clock()
        return present
