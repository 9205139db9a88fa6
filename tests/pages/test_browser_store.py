"""The storefront, the operations console and every page at 390 px, in Debian's chromium
against the live server (PostgreSQL). Screenshots go to test-artifacts/store-*.png.

No worker here: documents are made ready through the services (tests.pages.conftest), so these
journeys stay fast; test_browser_store_journeys.py runs the ones that need a real worker.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import responses
from django.conf import settings as django_settings
from django.test import Client

from ledger import services as ledger_services
from ledger.models import ConnectAccount, Payout, PayoutStatus
from marketplace.models import Role
from tests.ledger.stripe_stubs import API, transfer
from tests.pages.conftest import NANO, fund, make_document, settled_load
from tests.support.accounts import make_api_key, make_user

pytestmark = [pytest.mark.browser]

PHONE = {"width": 390, "height": 844}


def shot(page, artifacts_dir: Path, name: str) -> None:
    page.screenshot(path=artifacts_dir / f"store-{name}.png", full_page=True)


def log_in(page, base: str, user) -> None:
    """Log the browser in as ``user`` (a session made by Django's test client)."""
    client = Client()
    client.force_login(user)
    page.context.clear_cookies()
    page.context.add_cookies([{
        "name": django_settings.SESSION_COOKIE_NAME,
        "value": client.cookies[django_settings.SESSION_COOKIE_NAME].value, "url": base,
    }])


def no_sideways_scroll(page) -> int:
    return page.evaluate("document.documentElement.scrollWidth")


@pytest.fixture
def shop(transactional_db):
    publisher = make_user(role=Role.PUBLISHER, display_name="Skerry Press")
    other = make_user(role=Role.PUBLISHER, display_name="Harbour Books")
    agent = make_user(role=Role.AGENT, display_name="Agent Smith")
    docs = [
        make_document(publisher, title="The Skerry Point logbook", n_tokens=3774, price=369_800,
                      description="A lighthouse keeper's log of weather, ships and gulls, "
                                  "winter 1911.",
                      text="The lighthouse keeper of Skerry Point kept a logbook in green ink. "
                           "Every evening at dusk he lit the lamp. " * 20,
                      example_questions=["What colour was the ink?",
                                         "What did the keeper eat in the winter of 1911?"]),
        make_document(other, title="Harbour regulations, 1908", n_tokens=1200),
        make_document(other, title="Tide tables of the northern isles", n_tokens=600,
                      price=50_000),
    ]
    fund(agent, amount_nano=5 * NANO)
    settled_load(agent, docs[0])
    return {"publisher": publisher, "other": other, "agent": agent, "docs": docs}


def test_anonymous_visitor_browses_and_opens_a_document(
    live_server, browser_page, artifacts_dir, shop
) -> None:
    page, base = browser_page, live_server.url
    logbook = shop["docs"][0]
    page.goto(base + "/")
    assert "9–50" not in page.inner_text("body")
    page.click("text=Browse the catalogue")
    page.wait_for_url(re.compile(r"/documents/$"))
    assert page.locator(".listing").count() == 3
    assert page.locator(f"#listing-{logbook.pk}").inner_text().count("$0.00037") == 1
    shot(page, artifacts_dir, "01-catalogue")
    page.fill("#f-q", "keeper")
    page.select_option("#f-sort", "price")
    page.click("button:has-text('Search')")
    page.wait_for_url(re.compile(r"q=keeper"))
    assert page.locator(".listing").count() == 1
    page.click(f"#listing-{logbook.pk} h2 a")
    page.wait_for_url(re.compile(rf"/documents/{logbook.pk}/$"))
    assert page.inner_text("#doc-id") == str(logbook.pk)
    assert page.inner_text("#doc-publisher") == "Skerry Press"
    assert page.inner_text("#doc-price") == "$0.00037"
    assert "What colour was the ink?" in page.inner_text("#example-questions")
    assert page.locator("#verification-receipt >> text=✓ Verified").is_visible()
    assert not page.locator("text=bitwise identical logits").is_visible()
    page.click("text=Technical detail")  # the detail is one click away
    assert page.locator("text=bitwise identical logits").is_visible()
    assert page.locator("#economics-plot polyline.prefill").count() == 1
    snippet = page.inner_text(".snippet-python")
    assert f'"document": {logbook.pk}' in snippet and "LICENSE_ID" in snippet
    assert page.locator("text=Log in to buy").is_visible()
    shot(page, artifacts_dir, "02-document-page")


def test_staff_approves_one_payout_and_rejects_another_and_publishers_see_both(
    live_server, browser_page, artifacts_dir, shop, settings
) -> None:
    page, base = browser_page, live_server.url
    settings.STRIPE_SECRET_KEY = "sk_test_kvmarket_browser"
    settings.STRIPE_API_BASE = ""
    settings.STRIPE_MAX_NETWORK_RETRIES = 0
    paid_pub, rejected_pub, agent = shop["publisher"], shop["other"], shop["agent"]
    fund(agent, amount_nano=50 * NANO)
    settled_load(agent, make_document(rejected_pub, title="Pilot's almanac", price=2 * 10**9))
    settled_load(agent, make_document(paid_pub, title="Keeper's recipes", price=2 * 10**9))
    ConnectAccount.objects.create(publisher=paid_pub, stripe_account_id="acct_browser",
                                  payouts_enabled=True)
    to_pay = ledger_services.create_payout(publisher=paid_pub)
    to_reject = ledger_services.create_payout(publisher=rejected_pub)
    staff = make_user(role=Role.STAFF, display_name="Ops")
    log_in(page, base, staff)
    page.on("dialog", lambda dialog: dialog.accept())  # the confirmations
    page.goto(base + "/ops/")
    assert page.locator("#ledger-health .badge.ok").is_visible()
    assert page.locator("#pending-table tbody tr").count() == 2
    shot(page, artifacts_dir, "03-ops-pending")
    with responses.RequestsMock() as rsps:
        rsps.post(f"{API}/v1/transfers", json=transfer(
            "tr_browser", amount_cents=to_pay.amount_cents, destination="acct_browser",
            payout_id=to_pay.pk))
        page.click(f"#approve-{to_pay.pk}")
        page.wait_for_selector("text=sent to")
    page.click(f"#payout-{to_reject.pk} summary")
    page.fill(f"#reason-{to_reject.pk}", "The loads came from the publisher's own test agent.")
    page.click(f"#reject-{to_reject.pk}")
    page.wait_for_selector(f"text=Payout #{to_reject.pk} rejected")
    assert page.locator("#pending-table").count() == 0
    assert page.locator(f"#decided-table #payout-{to_pay.pk}[data-status=paid]").count() == 1
    shot(page, artifacts_dir, "04-ops-decided")
    for pub, payout, expected in ((paid_pub, to_pay, "Paid"),
                                  (rejected_pub, to_reject, "Rejected")):
        log_in(page, base, pub)
        page.goto(base + "/publisher/")
        row = page.locator(f"#my-payout-{payout.pk}")
        assert expected in row.inner_text()
        if expected == "Rejected":
            assert "own test agent" in row.inner_text()
            shot(page, artifacts_dir, "05-publisher-sees-rejection")
    assert Payout.objects.get(pk=to_pay.pk).status == PayoutStatus.PAID


def test_no_page_scrolls_sideways_at_390px(live_server, browser_page, artifacts_dir, shop) -> None:
    page, base = browser_page, live_server.url
    page.set_viewport_size(PHONE)
    doc = shop["docs"][0]
    from marketplace.models import License

    license = License.objects.filter(agent=shop["agent"]).first()
    staff = make_user(role=Role.STAFF)
    make_api_key(shop["agent"])  # the keys table
    settled_load(shop["agent"], make_document(shop["publisher"], title="Almanac", price=10**9))
    ledger_services.create_payout(publisher=shop["publisher"])
    pages = {
        None: ["/", "/documents/", f"/documents/{doc.pk}/", "/account/login/",
               "/account/signup/"],
        shop["agent"]: ["/console/", "/console/licenses/", "/account/api-keys/",
                        "/account/api-keys/new/", f"/documents/{doc.pk}/"],
        shop["publisher"]: ["/publisher/", "/publisher/documents/new/",
                            f"/publisher/documents/{doc.pk}/",
                            f"/publisher/documents/{doc.pk}/edit/"],
        staff: ["/ops/"],
    }
    wide = []
    for user, paths in pages.items():
        if user is None:
            page.context.clear_cookies()
        else:
            log_in(page, base, user)
        for path in paths:
            page.goto(base + path)
            width = no_sideways_scroll(page)
            name = re.sub(r"[^a-z0-9]+", "-", f"{getattr(user, 'role', 'anon')}{path}").strip("-")
            shot(page, artifacts_dir, f"390-{name}")
            if width > PHONE["width"]:
                wide.append((path, width))
    assert license is not None
    assert wide == [], wide


def test_live_refresh_keeps_keyboard_focus_and_announces_progress(
    live_server, browser_page, shop
) -> None:
    page, base = browser_page, live_server.url
    doc = make_document(shop["publisher"], status="precomputing", title="Being prefilled",
                        tokens_done=10, tokens_total=40)
    log_in(page, base, shop["publisher"])
    page.goto(base + "/publisher/")
    page.evaluate("document.getElementById('publisher-documents').dataset.old = 'yes'")
    page.focus(f"#document-link-{doc.pk}")
    # the panel is replaced by the next poll (every second) ...
    page.wait_for_function("!document.getElementById('publisher-documents').dataset.old")
    # ... and the link with the same id has the focus again
    assert page.evaluate("document.activeElement.id") == f"document-link-{doc.pk}"
    assert page.locator(f"#document-{doc.pk} [aria-live=polite]").count() == 1
    page.goto(f"{base}/publisher/documents/{doc.pk}/")
    assert "10 / 40 tokens prefilled" in page.inner_text("#progress-text[aria-live=polite]")
