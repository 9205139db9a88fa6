"""manage.py seed_demo: a demo publisher, a demo agent with an API key and wallet credit, and the
demo documents (marketplace/demo/documents.json: public-domain and PSF-licensed texts, each
with example questions whose answers are in the text) on the default model, queued for
precompute. Safe to run again: accounts and documents are reused, the wallet credit uses a
fixed idempotency key (credited once), and a new API key is printed on each run (keys are
stored hashed, so an old one cannot be shown again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction

from marketplace.models import Document, Role, User
from marketplace.services.accounts import create_api_key
from marketplace.services.documents import (
    create_document,
    queue_precompute,
    set_example_questions,
)

PUBLISHER_EMAIL = "publisher@demo.kvmarket"
AGENT_EMAIL = "agent@demo.kvmarket"
STAFF_EMAIL = "staff@demo.kvmarket"
DEFAULT_PASSWORD = "kvmarket-demo-2026"
DEMO_DIR = Path(__file__).resolve().parents[2] / "demo"
WALLET_CREDIT_NANO = 20 * 10**9  # $20
TOPUP_KEY = "seed_demo:agent-wallet-credit"


def demo_documents() -> list[dict[str, Any]]:
    """The demo documents: title, file (in marketplace/demo/), source, licence and questions
    ({question, answer_contains}: a phrase the default model's greedy answer contains)."""
    return json.loads((DEMO_DIR / "documents.json").read_text())


class Command(BaseCommand):
    help = "Create (idempotently) the demo publisher, agent, wallet credit and document."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--password", default=os.environ.get("KVMARKET_DEMO_PASSWORD", DEFAULT_PASSWORD),
            help="Password for both demo accounts (env KVMARKET_DEMO_PASSWORD).",
        )
        parser.add_argument("--model", default=next(iter(settings.KVMARKET_MODELS)),
                            help="Model slug of the demo documents.")
        parser.add_argument("--no-precompute", action="store_true",
                            help="Create the documents without queueing their precompute.")

    def handle(self, *args, **opts) -> None:
        from ledger.services import credit_topup

        password = opts["password"]
        with transaction.atomic():
            publisher = self._user(PUBLISHER_EMAIL, Role.PUBLISHER, "Demo Publisher", password)
            agent = self._user(AGENT_EMAIL, Role.AGENT, "Demo Agent", password)
            self._staff(STAFF_EMAIL, password)
            key = create_api_key(user=agent, name="seed_demo").raw_key
            credit_topup(agent=agent, amount_nano=WALLET_CREDIT_NANO, idempotency_key=TOPUP_KEY,
                         external_ref="seed_demo")
            documents = [
                self._document(publisher, spec, opts["model"], not opts["no_precompute"])
                for spec in demo_documents()
            ]
        out = self.stdout.write
        out(self.style.SUCCESS("Demo data ready."))
        out(f"  publisher: {PUBLISHER_EMAIL} / {password}")
        out(f"  agent:     {AGENT_EMAIL} / {password}")
        out(f"  staff:     {STAFF_EMAIL} / {password} (operations console /ops/, admin)")
        out(f"  agent API key (new, shown once): {key}")
        out(f"  wallet credit: ${WALLET_CREDIT_NANO / 10**9:.2f} (once, key {TOPUP_KEY!r})")
        for document in documents:
            document.refresh_from_db()
            out(f"  document {document.pk}: {document.title!r} on {document.model_slug}, "
                f"status {document.status}")
            for question in document.example_questions:
                out(f"      ask: {question}")

    def _document(self, publisher: User, spec: dict[str, Any], model: str,
                   precompute: bool) -> Document:
        document = Document.objects.filter(publisher=publisher, title=spec["title"]).first()
        if document is None:
            return create_document(
                publisher=publisher, title=spec["title"],
                text=(DEMO_DIR / spec["file"]).read_text(), model_slug=model,
                example_questions=[q["question"] for q in spec["questions"]],
                description=f"{spec['source']} ({spec['licence']}).",
                submit=precompute,
            )
        if not document.example_questions:  # seeded before the demo had questions
            document = set_example_questions(
                document=document, questions=[q["question"] for q in spec["questions"]]
            )
        if precompute:
            return queue_precompute(document=document)  # re-queues a failed one only
        return document

    def _staff(self, email: str, password: str) -> User:
        user = User.objects.filter(email=email).first()
        if user is None:
            return User.objects.create_superuser(email=email, password=password,
                                                 display_name="Demo Staff")
        if not user.check_password(password):
            user.set_password(password)
            user.save(update_fields=["password"])
        return user

    def _user(self, email: str, role: Role, name: str, password: str) -> User:
        user = User.objects.filter(email=email).first()
        if user is None:
            user = User.objects.create_user(email=email, password=password, role=role,
                                            display_name=name)
        elif not user.check_password(password):
            user.set_password(password)
            user.save(update_fields=["password"])
        return user
