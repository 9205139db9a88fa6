"""The journeys that need a real worker, in Debian's chromium against the live server, with a
REAL Celery worker, Redis and PostgreSQL (screenshots: test-artifacts/store-journey-*.png).

A publisher lists a document and watches the precompute's steps, edits the price and sees the
economics plot. A new agent signs up, adds
sandbox credits, buys a pack in the browser, creates an API key, copies the quickstart snippet
of its license and the test runs that code (the openai SDK) against the live server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from marketplace.models import Document, License, Load
from tests.marketplace.integration import (
    DOCUMENT_TEXT,
    GPU_QUEUES,
    skip_module_unless_worker_can_run,
)

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

skip_module_unless_worker_can_run()

READY_TIMEOUT_S = 180
PASSWORD = "a-Long-enough-passw0rd"


def _shot(page, artifacts_dir, name: str) -> None:
    page.screenshot(path=artifacts_dir / f"store-journey-{name}.png", full_page=True)


def _sign_up(page, base: str, *, role: str, email: str, name: str) -> None:
    page.goto(f"{base}/account/signup/?role={role}")
    page.check(f"input[value={role}]")
    page.fill("#id_email", email)
    page.fill("#id_display_name", name)
    page.fill("#id_password1", PASSWORD)
    page.fill("#id_password2", PASSWORD)
    page.click("button:has-text('Sign up')")


def _watch_steps(page, document_id: int, on_step=None) -> list[str]:
    """The precompute steps the page showed, in order, until it shows the document ready."""
    from playwright.sync_api import Error as PlaywrightError

    seen: list[str] = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            state = page.evaluate("""() => {
                const panel = document.querySelector('#document-status');
                const step = document.querySelector('#precompute-steps .step-current');
                return {status: panel && panel.dataset.status, step: step && step.dataset.step};
            }""")
        except PlaywrightError:  # the page reloads itself once the precompute is done
            time.sleep(0.25)
            continue
        if state["step"] and (not seen or seen[-1] != state["step"]):
            seen.append(state["step"])
            if on_step is not None:
                on_step(state["step"])
        if state["status"] == "ready":
            return seen
        if state["status"] == "failed":
            raise AssertionError("the precompute failed")
        time.sleep(0.25)
    raise AssertionError(f"document {document_id} not ready in {READY_TIMEOUT_S}s ({seen})")


def test_publisher_lists_and_prices_an_agent_buys_and_runs_the_snippet(
    live_server, browser_page, artifacts_dir, celery_worker_factory, kv_dir, settings
) -> None:
    settings.SANDBOX_MODE = True
    settings.STRIPE_SECRET_KEY = ""
    worker = celery_worker_factory(
        GPU_QUEUES, extra_env={"KV_STORE_DIR": str(kv_dir)}, ready_timeout=120
    )
    page, base = browser_page, live_server.url
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)

    # 1. A publisher lists a document and lands on its page.
    _sign_up(page, base, role="publisher", email="journey.publisher@example.test",
             name="Skerry Press")
    page.wait_for_url(re.compile(r"/publisher/$"))
    page.click("text=New document")
    page.fill("#id_title", "The Skerry Point logbook")
    page.fill("#id_description", "A lighthouse keeper's log: weather, ships, gulls.")
    # About 1,000 tokens, so the precompute's steps last long enough to be seen.
    page.fill("#id_text", "\n\n".join([DOCUMENT_TEXT] * 8))
    page.select_option("#id_model", "tiny-qwen3")  # the model the test worker serves
    page.click("button:has-text('Create and prefill')")
    page.wait_for_url(re.compile(r"/publisher/documents/\d+/$"))
    doc = Document.objects.get(title="The Skerry Point logbook")
    assert page.inner_text("#doc-id") == str(doc.pk)
    _shot(page, artifacts_dir, "01-queued")

    # 2. The document page shows the steps, then the document ready.
    seen = _watch_steps(
        page, doc.pk, on_step=lambda step: _shot(page, artifacts_dir, f"01-step-{step}")
    )
    order = ["tokenizing", "prefilling", "verifying"]
    assert seen and [order.index(s) for s in seen] == sorted(order.index(s) for s in seen)
    page.wait_for_selector("#verification >> text=Verified")
    _shot(page, artifacts_dir, "02-ready")

    # 3. The publisher edits the price and sees the economics plot.
    page.click("#edit-document")
    page.fill("#id_price_per_load", "0.0005")
    page.click("button:has-text('Save')")
    page.wait_for_url(re.compile(rf"/publisher/documents/{doc.pk}/$"))
    assert "$0.0005" in page.inner_text(".stats")
    assert page.locator("#economics-plot polyline.prefill").count() == 1
    assert page.locator("#economics-plot polyline.reuse").count() == 1
    _shot(page, artifacts_dir, "03-priced-with-economics")
    page.click("button:has-text('Log out')")

    # 4. A new agent signs up and adds sandbox credits.
    _sign_up(page, base, role="agent", email="journey.agent@example.test", name="Journey Agent")
    page.wait_for_url(re.compile(r"/console/$"))
    assert page.locator("#sandbox-banner").is_visible()
    page.click("#sandbox-credit-20")
    page.wait_for_selector("text=Added $20 of test credits")
    assert page.inner_text("#wallet-balance") == "$20.00"

    # 5. It finds the document in the catalogue and buys 100 loads (the total and the wallet
    # after are shown before buying).
    page.click("nav >> text=Catalogue")
    page.click(f"#listing-{doc.pk} h2 a")
    page.check("input[name=loads][value='100']")
    assert page.inner_text("#buy-after") == "$19.95"  # $20 - 100 x $0.0005
    _shot(page, artifacts_dir, "04-buy")
    page.click("#buy-button")
    page.wait_for_url(re.compile(r"/console/licenses/"))
    license = License.objects.get(agent__email="journey.agent@example.test")
    assert license.loads_total == 100 and license.price_per_load_nano == 500_000
    card = page.locator(f"#license-{license.pk}")
    assert "100 / 100" in card.inner_text()

    # 6. An API key, then the license's snippet, copied with its button and run.
    page.goto(base + "/account/api-keys/new/")
    page.fill("#id_name", "journey")
    page.click("button:has-text('Create key')")
    raw_key = page.input_value("#raw-key")
    page.goto(base + "/console/licenses/")
    page.click(f"#license-{license.pk} button.copy")
    page.wait_for_selector(f"#license-{license.pk} button.copy:has-text('Copied')")
    code = page.evaluate("navigator.clipboard.readText()")
    assert code == page.inner_text(f"#license-{license.pk} .snippet-python")
    assert f'"license": {license.pk}' in code and f'"document": {doc.pk}' in code
    _shot(page, artifacts_dir, "05-licenses")
    env = {**os.environ, "KVMARKET_API_KEY": raw_key}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    doc.refresh_from_db()
    assert f"cached tokens: {doc.n_tokens}" in run.stdout, run.stdout
    load = Load.objects.get(license=license)
    assert load.status == "succeeded" and load.worker == worker.hostname
    page.reload()
    assert "99 / 100" in page.locator(f"#license-{license.pk}").inner_text()
