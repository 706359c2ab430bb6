"""Install the tiered engine's PL/pgSQL functions on PostgreSQL (see ``tiered.pg_functions``).

The SQL is written out here, not imported: a migration must install the same functions
whatever release runs it, so version 1 of the functions is frozen in this file (a change is a
``_v2`` in a new migration, beside it, for rolling upgrades). ``tests/tiered`` checks that the
functions and the db L2's plain statements compute the same thing.

On any other database it does nothing (``sqlmigrate`` prints the SQL on PostgreSQL only). No
dependency on ``sessions``: a PL/pgSQL body is resolved when it runs, so the functions may
exist before Django's session table does.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

UPDATE_V1 = """
CREATE OR REPLACE FUNCTION shmsession_update_v1(p_key text, p_body text, p_expire timestamptz,
    p_now timestamptz, p_channel text, p_notice text) RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE version text;
BEGIN
    UPDATE "django_session" SET session_data = (CASE WHEN session_data ~ '^[0-9]{1,19}[:b]'
        THEN substring(session_data from '^[0-9]+')::numeric + 1 ELSE 1 END)::text || p_body,
        expire_date = p_expire
    WHERE session_key = p_key AND expire_date > p_now
    RETURNING substring(session_data from '^[0-9]+') INTO version;
    IF FOUND THEN
        PERFORM pg_notify(p_channel, version || ' ' || p_notice);
    END IF;
    RETURN version;
END
$fn$"""

DELETE_V1 = """
CREATE OR REPLACE FUNCTION shmsession_delete_v1(p_key text, p_channel text, p_notice text)
    RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE hit boolean;
BEGIN
    DELETE FROM "django_session" WHERE session_key = p_key;
    hit := FOUND;
    IF hit THEN
        PERFORM pg_notify(p_channel, p_notice);
    END IF;
    RETURN hit;
END
$fn$"""

DROP_V1 = (
    "DROP FUNCTION IF EXISTS "
    "shmsession_update_v1(text, text, timestamptz, timestamptz, text, text)",
    "DROP FUNCTION IF EXISTS shmsession_delete_v1(text, text, text)",
)


class PostgresSQL(migrations.RunSQL):
    """``RunSQL`` that runs on PostgreSQL only (and is shown by ``sqlmigrate`` there)."""

    def database_forwards(self, app_label: str, schema_editor: Any, *args: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, *args)

    def database_backwards(self, app_label: str, schema_editor: Any, *args: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, *args)


class Migration(migrations.Migration):
    dependencies = []  # none needed: see the module
    operations = [PostgresSQL([UPDATE_V1, DELETE_V1], DROP_V1, elidable=False)]
