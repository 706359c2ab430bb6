"""Install the tiered engine's PL/pgSQL functions on PostgreSQL (see ``tiered.pg_functions``).

On any other database, and for sites on the plain engine, it does nothing: it only creates
functions, never tables. No dependency on ``sessions``: a PL/pgSQL body is resolved when it
runs, so the functions may exist before Django's session table does.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

from django_shmsession.tiered import pg_functions

SESSION_TABLE = "django_session"  # django.contrib.sessions.models.Session._meta.db_table


def install(apps: Any, schema_editor: Any) -> None:
    connection = schema_editor.connection
    if connection.vendor == "postgresql":
        for sql in pg_functions.create_sql(connection.ops.quote_name(SESSION_TABLE)):
            schema_editor.execute(sql, None)  # None: no %-interpolation of the body


def remove(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        for sql in pg_functions.drop_sql():
            schema_editor.execute(sql, None)  # None: no %-interpolation of the body


class Migration(migrations.Migration):
    dependencies = []  # none needed: see the module
    operations = [migrations.RunPython(install, remove, elidable=False)]
