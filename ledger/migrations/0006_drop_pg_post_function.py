"""Drop ledger_post(): money is posted only by ledger/services/journal.py, on every database.

The reverse does not recreate it (no code calls it any more).
"""

from django.db import migrations

DROP = (
    "DROP FUNCTION IF EXISTS ledger_post(text, text, text, text, text, text, text, jsonb,"
    " timestamptz, text[], text[], bigint[], text[], boolean[], boolean[], bigint[], integer,"
    " integer, bigint);"
)


def drop_function(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [("ledger", "0005_sandbox_funding")]

    operations = [migrations.RunPython(drop_function, migrations.RunPython.noop)]
