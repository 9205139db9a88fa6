"""The fault campaign's database side, run as a subprocess against the campaign's own stack
(its DATABASE_URL, KV_STORE_DIR): `python -m tests.support.fault_campaign_db setup|audit`.
Prints one JSON line starting with "RESULT=".

setup: migrate, precompute the document's KV, a publisher, the document (ready), N agents
       (API key, funded wallet, one license of limited loads).
audit: what the books say: loads by status and by campaign phase (the phase is the
       Idempotency-Key's prefix), settlement transactions, double charges, licenses over
       their limit, and `reconcile` (call_command).
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections import Counter

import django

SLUG = "tiny-qwen3"


def setup(agents: int, loads: int) -> dict:
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from marketplace import engine
    from marketplace.models import Document, DocumentStatus, Role
    from marketplace.services.licenses import purchase_license
    from tests.marketplace.integration import DOCUMENT_TEXT
    from tests.support.accounts import make_api_key, make_user
    from tests.support.money import NANO, fund

    artifact = engine.precompute(slug=SLUG, text=DOCUMENT_TEXT)
    publisher = make_user(role=Role.PUBLISHER)
    document = Document.objects.create(
        publisher=publisher, title="Skerry Point", text=DOCUMENT_TEXT, model_slug=SLUG,
        status=DocumentStatus.READY, n_tokens=artifact["n_tokens"],
        tokens_done=artifact["n_tokens"], tokens_total=artifact["n_tokens"],
        artifact_key=artifact["key"], artifact_bytes=artifact["bytes"], listed=True,
    )
    out = []
    for _ in range(agents):
        agent = make_user(role=Role.AGENT)
        fund(agent, amount_nano=100 * NANO)
        lic, _ = purchase_license(agent=agent, document_id=document.pk, loads=loads)
        out.append({"key": make_api_key(agent), "license": lic.pk})
    return {"document": document.pk, "agents": out}


def audit() -> dict:
    from django.core.management import call_command
    from django.core.management.base import CommandError
    from django.db.models import Count, F

    from ledger.models import Transaction
    from marketplace.models import License, Load, LoadStatus

    loads = list(Load.objects.values("pk", "idempotency_key", "status", "amount_nano"))
    settled = Counter(
        Transaction.objects.filter(kind="load_settlement").values_list("idempotency_key",
                                                                       flat=True)
    )
    by_phase: dict[str, Counter] = {}
    for load in loads:
        phase = load["idempotency_key"].split(":", 1)[0]
        by_phase.setdefault(phase, Counter())[load["status"]] += 1
    succeeded = {f"load:{x['pk']}" for x in loads if x["status"] == LoadStatus.SUCCEEDED}
    charged_by_phase: Counter = Counter()
    for load in loads:
        if f"load:{load['pk']}" in settled:
            charged_by_phase[load["idempotency_key"].split(":", 1)[0]] += 1
    over_limit = list(
        License.objects.filter(loads_used__gt=F("loads_total")).values_list("pk", flat=True)
    ) + [
        row["license"] for row in Load.objects.filter(status=LoadStatus.SUCCEEDED)
        .values("license").annotate(n=Count("pk"))
        if row["n"] > License.objects.get(pk=row["license"]).loads_total
    ]
    out = io.StringIO()
    try:
        call_command("reconcile", stdout=out, stderr=out)
        reconcile_ok = True
    except CommandError as exc:
        reconcile_ok = False
        out.write(f"\n{exc}")
    return {
        "loads_by_status": dict(Counter(x["status"] for x in loads)),
        "loads_by_phase": {k: dict(v) for k, v in by_phase.items()},
        "charged_by_phase": dict(charged_by_phase),
        "settlements": sum(settled.values()),
        "settled_not_succeeded": sorted(set(settled) - succeeded),
        "succeeded_not_settled": sorted(
            k for k in succeeded - set(settled)
            if next(x for x in loads if f"load:{x['pk']}" == k)["amount_nano"] > 0
        ),
        "double_settled": sorted(k for k, n in settled.items() if n > 1),
        "licenses_over_limit": over_limit,
        "reconcile_ok": reconcile_ok,
        "reconcile_output": out.getvalue()[-2000:],
    }


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmarket.settings")
    django.setup()
    command = sys.argv[1]
    if command == "setup":
        result = setup(int(sys.argv[2]), int(sys.argv[3]))
    else:
        result = audit()
    print("RESULT=" + json.dumps(result))


if __name__ == "__main__":
    main()
