"""Formerly created the PostgreSQL function ledger_post(), a second way to post money.

Money is now posted only by ledger/services/journal.py; 0006 drops the function where an
earlier version of this migration created it. Kept as an empty step so the migration graph of
existing databases stays valid.
"""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("ledger", "0003_trim_hot_path_indexes")]

    operations = []
