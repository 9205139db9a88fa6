"""A publisher in Debian's chromium, with a REAL Celery worker, Redis and PostgreSQL.

The publisher signs up, lists a document by pasting text, and watches the dashboard's live
progress (htmx polling, no reload) until the document is ready. An agent (made through the
services, with an API key and a credited wallet) buys a license and makes a completion with the
official openai client against the live server; the publisher's dashboard and document page
then show the load and earnings > 0. Screenshots of each step go to test-artifacts/.
"""

from __future__ import annotations

import re

import pytest

from marketplace.models import Document, Load, Role
from tests.marketplace.integration import (
    DOCUMENT_TEXT,
    GPU_QUEUES,
    skip_module_unless_worker_can_run,
)
from tests.support.accounts import TEST_PASSWORD, make_api_key, make_user

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

skip_module_unless_worker_can_run()

READY_TIMEOUT_MS = 180_000
PASSWORD = "a-Long-enough-passw0rd"


def _shot(page, artifacts_dir, name: str) -> None:
    page.screenshot(path=artifacts_dir / f"pages-{name}.png", full_page=True)


def test_publisher_lists_watches_progress_and_sees_earnings(
    live_server, browser_page, artifacts_dir, celery_worker_factory, kv_dir
) -> None:
    import openai
    import requests

    from ledger.services import credit_topup

    worker = celery_worker_factory(
        GPU_QUEUES, extra_env={"KV_STORE_DIR": str(kv_dir)}, ready_timeout=120
    )
    page = browser_page
    base = live_server.url

    # 1. Sign up as a publisher: lands on the (empty) dashboard.
    page.goto(base + "/")
    page.click("text=Publish a document")
    page.check("input[value=publisher]")
    page.fill("#id_email", "browser.publisher@example.test")
    page.fill("#id_display_name", "Skerry Press")
    page.fill("#id_password1", PASSWORD)
    page.fill("#id_password2", PASSWORD)
    page.click("button:has-text('Sign up')")
    page.wait_for_url(re.compile(r"/publisher/$"))
    assert page.locator("text=No documents yet").is_visible()
    _shot(page, artifacts_dir, "01-dashboard-empty")

    # 2. New document: the empty form is refused with a message, then the pasted text is taken.
    page.click("text=New document")
    page.click("button:has-text('Create and prefill')")
    assert page.locator(".form-errors").first.is_visible()
    page.fill("#id_title", "The Skerry Point logbook")
    page.fill("#id_text", DOCUMENT_TEXT)
    page.select_option("#id_model", "tiny-qwen3")  # the model the test worker serves
    _shot(page, artifacts_dir, "02-new-document")
    page.click("button:has-text('Create and prefill')")
    page.wait_for_url(re.compile(r"/publisher/documents/\d+/$"))
    doc = Document.objects.get(title="The Skerry Point logbook")
    assert doc.publisher.email == "browser.publisher@example.test"
    _shot(page, artifacts_dir, "03-document-queued")

    # 3. The dashboard follows the precompute live (htmx), with no reload, until ready.
    page.click("text=Dashboard")
    page.wait_for_url(re.compile(r"/publisher/$"))
    page.evaluate("window.__kvmNoReload = true")
    row = page.locator(f"#document-{doc.pk}")
    status = row.get_attribute("data-status")
    assert status in ("queued", "precomputing", "ready"), status
    if status != "ready":
        assert page.locator("#publisher-documents[hx-trigger]").count() == 1
        _shot(page, artifacts_dir, "04-dashboard-progress")
    page.wait_for_selector(
        f"#document-{doc.pk}[data-status=ready]", timeout=READY_TIMEOUT_MS
    )
    assert page.evaluate("window.__kvmNoReload === true"), "the dashboard was reloaded"
    assert page.locator("#publisher-documents[hx-trigger]").count() == 0  # polling stopped
    assert page.locator(f"#document-{doc.pk} >> text=Ready").is_visible()
    doc.refresh_from_db()
    assert doc.status == "ready" and doc.n_tokens and doc.verification["passed"] is True
    _shot(page, artifacts_dir, "05-dashboard-ready")

    # 4. An agent buys a license and completes through the API (openai client, live server).
    agent = make_user(role=Role.AGENT, display_name="Browser Agent")
    raw_key = make_api_key(agent)
    credit_topup(agent=agent, amount_nano=10**9, idempotency_key="pages-browser-topup")
    r = requests.post(
        f"{base}/api/v1/licenses", json={"document": doc.pk, "loads": 3},
        headers={"Authorization": f"Bearer {raw_key}"}, timeout=30,
    )
    assert r.status_code == 201, r.text
    license_id = r.json()["id"]
    client = openai.OpenAI(base_url=f"{base}/api/v1", api_key=raw_key, max_retries=0,
                           timeout=120)
    answer = client.chat.completions.create(
        model="tiny-qwen3", max_tokens=12, temperature=0,
        messages=[{"role": "user", "content": "What did the keeper write every evening?"}],
        extra_body={"document": doc.pk, "license": license_id},
    )
    assert answer.choices[0].message.content
    assert answer.usage.prompt_tokens_details.cached_tokens == doc.n_tokens
    load = Load.objects.get(agent=agent)
    assert load.status == "succeeded" and load.worker == worker.hostname

    # 5. The publisher sees the load and the earnings.
    page.reload()
    assert page.inner_text("#total-loads") == "1"
    earned = page.inner_text(f"#document-{doc.pk} td:nth-child(6)")
    assert earned.startswith("$") and earned != "$0.00", earned
    _shot(page, artifacts_dir, "06-dashboard-earnings")
    page.click(f"#document-{doc.pk} a")
    page.wait_for_url(re.compile(rf"/publisher/documents/{doc.pk}/$"))
    assert page.inner_text("#doc-loads") == "1"
    doc_earned = page.inner_text("#doc-earned")
    assert doc_earned == earned, (doc_earned, earned)
    assert page.locator("#verification >> text=Verified").is_visible()
    assert page.locator("#chart rect.bar").count() > 0
    _shot(page, artifacts_dir, "07-document-earnings")

    # 6. The agent's console shows the license, the load and the wallet history.
    page.click("button:has-text('Log out')")
    page.goto(base + "/account/login/")
    page.fill("#id_username", agent.email)
    page.fill("#id_password", TEST_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/console/$"))
    assert page.locator("#licenses >> text=The Skerry Point logbook").is_visible()
    assert page.locator("#loads .badge.ok").count() == 1
    _shot(page, artifacts_dir, "08-agent-console")
