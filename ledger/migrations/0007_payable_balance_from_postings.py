"""A publisher payable's balance becomes the sum of its postings (its column is NULL).

Settlements credit a payable without touching its row, so concurrent settlements for one
publisher no longer queue on that row's lock. The reverse stores the sums again.
"""

from django.conf import settings
from django.db import migrations, models

TO_POSTINGS = "UPDATE ledger_account SET balance = NULL WHERE kind = 'publisher_payable'"
TO_COLUMN = (
    "UPDATE ledger_account SET balance = (SELECT COALESCE(SUM(p.amount), 0) FROM ledger_posting p"
    " WHERE p.account_id = ledger_account.id) WHERE kind = 'publisher_payable'"
)


class Migration(migrations.Migration):
    dependencies = [
        ("ledger", "0006_drop_pg_post_function"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="account",
            name="ledger_account_balance_non_negative",
        ),
        migrations.RunSQL(TO_POSTINGS, TO_COLUMN, elidable=False),
        migrations.AddConstraint(
            model_name="account",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    models.Q(("balance__gte", 0), ("kind__in", ["agent_wallet", "license_escrow"])),
                    models.Q(
                        models.Q(("kind__in", ["agent_wallet", "license_escrow"]), _negated=True),
                        ("balance__isnull", True),
                    ),
                    _connector="OR",
                ),
                name="ledger_account_balance_non_negative",
            ),
        ),
    ]
