"""The public storefront: catalogue with filters and sorting, the document page (card,
verification receipt, economics, quickstart), buying a pack in the browser (idempotent),
the licenses page, sandbox credits, and editing a listing."""

from __future__ import annotations

import io
import re
from html import unescape

import pytest
from django.test import Client
from django.urls import reverse

from ledger.models import Account, AccountKind, Posting, TransactionKind
from ledger.selectors import wallet_balance
from marketplace.models import License, Role
from tests.pages.conftest import NANO, fund, make_document, settled_load

pytestmark = pytest.mark.django_db


@pytest.fixture
def shelf(publisher_user, other_publisher):
    """Three ready documents of two publishers, one draft and one unlisted."""
    other_publisher.display_name = "Harbour Books"
    other_publisher.save()
    return {
        "cheap": make_document(publisher_user, title="Tide tables of Skerry Point", n_tokens=500,
                               price=100_000, description="Tides, hour by hour.",
                               example_questions=["When is high water?"]),
        "long": make_document(other_publisher, title="The lighthouse keeper's log", n_tokens=6000,
                              price=3_000_000, text="Every evening the keeper wrote the log."),
        "tariff": make_document(publisher_user, title="Harbour regulations", n_tokens=2000,
                                verification={"passed": False}),
        "draft": make_document(publisher_user, status="draft", title="Unfinished draft"),
        "unlisted": make_document(publisher_user, title="Withdrawn pamphlet", listed=False),
    }


def _ids(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'id="listing-(\d+)"', html)]


def test_anonymous_visitor_browses_only_listed_ready_documents(client: Client, shelf) -> None:
    r = client.get(reverse("catalogue"))
    assert r.status_code == 200
    html = r.content.decode()
    assert set(_ids(html)) == {shelf["cheap"].pk, shelf["long"].pk, shelf["tariff"].pk}
    assert "Unfinished draft" not in html and "Withdrawn pamphlet" not in html
    assert "$0.0001" in html and "Harbour Books" in html and "✓ Verified" in html


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"q": "keeper"}, ["long"]),  # matches the text, not only the title
        ({"q": "hour by hour"}, ["cheap"]),  # the description
        ({"length": "short"}, ["cheap"]),
        ({"length": "long"}, ["long"]),
        ({"max_price": "0.001"}, ["cheap", "tariff"]),  # tariff: 0.1 x $0.10/M x 2000 = $0.00002
        ({"publisher": "harbour"}, ["long"]),
        ({"verified": "1"}, ["cheap", "long"]),
        ({"model": "no-such-model"}, []),
    ],
)
def test_catalogue_filters(client: Client, shelf, params: dict, expected: list[str]) -> None:
    html = client.get(reverse("catalogue"), params).content.decode()
    assert sorted(_ids(html)) == sorted(shelf[k].pk for k in expected)


def test_catalogue_sorts_by_price_and_popularity(client: Client, shelf, agent_user) -> None:
    by_price = _ids(client.get(reverse("catalogue"), {"sort": "price"}).content.decode())
    assert by_price == [shelf["tariff"].pk, shelf["cheap"].pk, shelf["long"].pk]
    by_price_desc = _ids(client.get(reverse("catalogue"), {"sort": "-price"}).content.decode())
    assert by_price_desc == list(reversed(by_price))
    fund(agent_user, amount_nano=5 * NANO)
    settled_load(agent_user, shelf["long"])
    popular = _ids(client.get(reverse("catalogue")).content.decode())
    assert popular[0] == shelf["long"].pk


def test_document_page_is_a_model_card(client: Client, shelf) -> None:
    doc = shelf["cheap"]
    r = client.get(reverse("document-page", args=[doc.pk]))
    assert r.status_code == 200
    html = r.content.decode()
    assert f'<code id="doc-id">{doc.pk}</code>' in html
    assert "Tide tables of Skerry Point" in html and "Tides, hour by hour." in html
    assert "When is high water?" in html  # example questions, also in the snippet
    assert "$0.0001" in html and "$0.10 per 1,000 loads" in html  # per load and per pack
    assert "<details><summary>Technical detail</summary>" in html and "24/24" in html
    assert 'id="economics-plot"' in html and 'class="series prefill"' in html
    # the quickstart carries the real ids: the openai SDK, curl and the raw completions API
    assert f'extra_body={{"document": {doc.pk}, "license": LICENSE_ID}}' in html
    assert f'"document": {doc.pk}' in html and "/api/v1/completions" in html
    assert "Log in to buy" in html


def test_drafts_and_unlisted_are_404_to_visitors_but_visible_to_their_publisher(
    client: Client, publisher_client: Client, shelf
) -> None:
    for key in ("draft", "unlisted"):
        url = reverse("document-page", args=[shelf[key].pk])
        assert client.get(url).status_code == 404
        assert publisher_client.get(url).status_code == 200


def test_agent_buys_a_pack_once_even_when_the_form_is_sent_twice(
    agent_client: Client, agent_user, shelf
) -> None:
    doc = shelf["long"]  # $0.003 a load
    fund(agent_user, amount_nano=NANO)
    page = agent_client.get(reverse("document-page", args=[doc.pk])).content.decode()
    token = re.search(r'name="token" value="([0-9a-f]+)"', page).group(1)
    assert "$1.00" in page and "after: <strong id=\"buy-after\">$0.97</strong>" in page
    url = reverse("document-buy", args=[doc.pk])
    first = agent_client.post(url, {"loads": 10, "token": token})
    second = agent_client.post(url, {"loads": 10, "token": token})  # a double click
    license = License.objects.get(agent=agent_user)
    assert first["Location"] == second["Location"] == (
        f"{reverse('agent-licenses')}#license-{license.pk}"
    )
    assert license.loads_total == 10 and wallet_balance(agent_user) == NANO - 10 * 3_000_000


def test_a_pack_the_wallet_cannot_pay_is_refused_with_nothing_charged(
    agent_client: Client, agent_user, shelf
) -> None:
    fund(agent_user, amount_nano=NANO)
    r = agent_client.post(reverse("document-buy", args=[shelf["long"].pk]),
                          {"loads": 1000, "token": "t-1"}, follow=True)
    assert "Your wallet cannot pay for this pack" in r.content.decode()
    assert not License.objects.exists() and wallet_balance(agent_user) == NANO


def test_only_agents_buy(client: Client, publisher_client: Client, shelf) -> None:
    url = reverse("document-buy", args=[shelf["cheap"].pk])
    assert client.post(url, {"loads": 10, "token": "x"})["Location"].startswith("/account/login")
    assert publisher_client.post(url, {"loads": 10, "token": "x"}).status_code == 403
    assert not License.objects.exists()


def test_licenses_page_shows_loads_left_expiry_and_a_snippet(
    agent_client: Client, agent_user, shelf
) -> None:
    fund(agent_user, amount_nano=NANO)
    license, _ = settled_load(agent_user, shelf["cheap"], loads=3)
    html = agent_client.get(reverse("agent-licenses")).content.decode()
    assert f'id="license-{license.pk}"' in html and "2 / 3" in html
    assert license.expires_at.strftime("%b") in html
    assert (f'extra_body={{"document": {shelf["cheap"].pk}, "license": {license.pk}}}'
            in html)
    assert '"content": "When is high water?"' in unescape(html)  # a JSON / Python literal


def test_sandbox_credits_are_double_entry_and_credited_once(
    agent_client: Client, agent_user, settings
) -> None:
    settings.SANDBOX_MODE = True
    settings.STRIPE_SECRET_KEY = ""
    page = agent_client.get(reverse("agent-console")).content.decode()
    assert 'id="sandbox-banner"' in page and "Add $20 test credits" in page
    assert "Top up with Stripe" not in page
    token = re.search(r'id="sandbox-credit-form">.*?name="token" value="([0-9a-f]+)"', page,
                      re.S).group(1)
    for _ in range(2):  # a double click credits once
        agent_client.post(reverse("agent-sandbox-credit"), {"amount": "20", "token": token})
    assert wallet_balance(agent_user) == 20 * NANO
    funding = Account.objects.get(kind=AccountKind.SANDBOX_FUNDING)
    postings = Posting.objects.filter(transaction__kind=TransactionKind.SANDBOX_CREDIT)
    assert sorted(p.amount for p in postings) == [-20 * NANO, 20 * NANO]
    assert {p.account_id for p in postings} == {funding.pk, Account.objects.get(
        key=f"wallet:{agent_user.pk}").pk}


def test_no_sandbox_credits_when_sandbox_mode_is_off(
    agent_client: Client, agent_user, settings
) -> None:
    settings.SANDBOX_MODE = False
    settings.STRIPE_SECRET_KEY = ""
    page = agent_client.get(reverse("agent-console")).content.decode()
    assert "sandbox-banner" not in page and "test credits" not in page
    assert "Top-ups are not available right now." in page
    r = agent_client.post(reverse("agent-sandbox-credit"), {"amount": "20", "token": "t"},
                          follow=True)
    assert "not available" in r.content.decode() and wallet_balance(agent_user) == 0


def test_production_settings_turn_sandbox_mode_off() -> None:
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "kvmarket/settings_production.py").read_text()
    assert "\nSANDBOX_MODE = False" in source


def test_publisher_edits_title_description_and_price_not_the_text(
    publisher_client: Client, publisher_user, agent_user, shelf
) -> None:
    doc = shelf["cheap"]
    fund(agent_user, amount_nano=NANO)
    old_license, _ = settled_load(agent_user, doc)
    url = reverse("document-edit", args=[doc.pk])
    assert publisher_client.get(url).status_code == 200
    r = publisher_client.post(url, {"title": "Tide tables, 2026", "description": "New.",
                                     "price_per_load": "0.0002", "text": "hijack"})
    assert r.status_code == 302
    doc.refresh_from_db()
    assert (doc.title, doc.description, doc.price_per_load_nano) == (
        "Tide tables, 2026", "New.", 200_000)
    assert doc.text.startswith("Document text")  # unchanged
    old_license.refresh_from_db()
    assert old_license.price_per_load_nano == 100_000  # sold licenses keep their price
    r = publisher_client.post(url, {"title": "", "price_per_load": "-1"})
    assert r.status_code == 200 and "errorlist" in r.content.decode()


def test_another_publisher_cannot_edit(other_publisher_client: Client, shelf) -> None:
    url = reverse("document-edit", args=[shelf["cheap"].pk])
    assert other_publisher_client.post(url, {"title": "mine"}).status_code == 404


def test_favicon_and_offline_api_docs(client: Client) -> None:
    r = client.get("/favicon.ico")
    assert r.status_code == 301 and r["Location"].endswith("favicon.svg")
    html = client.get("/api/docs/").content.decode()
    assert "drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in html
    assert "cdn.jsdelivr" not in html


def test_home_page_shows_live_numbers_not_a_hard_coded_claim(client: Client, shelf,
                                                             agent_user) -> None:
    html = client.get("/").content.decode()
    assert "9–50" not in html and 'id="live-saving"' in html
    fund(agent_user, amount_nano=NANO)
    settled_load(agent_user, shelf["long"])  # precompute 0.42 s, the load's ttft 0.02 s
    html = client.get("/").content.decode()
    assert "measured at <strong>21× cheaper</strong>" in html


@pytest.mark.slow  # seeds the whole demo; in CI (make test-all)
def test_staff_user_is_seeded_by_the_demo(db) -> None:
    from django.core.management import call_command

    from marketplace.models import User

    call_command("seed_demo", "--no-precompute", stdout=io.StringIO())
    staff = User.objects.get(email="staff@demo.kvmarket")
    assert staff.is_staff and staff.role == Role.STAFF



def test_dashboard_and_new_document_form_show_which_models_are_ready(
    publisher_client: Client, settings
) -> None:
    from django.utils import timezone

    from marketplace import registry

    registry.forget()
    html = publisher_client.get(reverse("publisher-dashboard")).content.decode()
    assert 'data-model="tiny-qwen3" data-ready="false"' in html and "no worker yet" in html
    registry.announce(name="w1@host", url="http://127.0.0.1:1", model_slugs=["tiny-qwen3"],
                      hot_keys=[], in_flight=0, started_at=timezone.now())
    registry.forget()
    for url in (reverse("publisher-dashboard"), reverse("document-create")):
        html = publisher_client.get(url).content.decode()
        assert 'data-model="tiny-qwen3" data-ready="true"' in html and "1 worker" in html


def test_operator_details_never_reach_an_agent_through_the_api(api_client, settings) -> None:
    settings.STRIPE_SECRET_KEY = ""
    r = api_client.post("/api/v1/wallet/topups", {"amount_cents": 1000}, format="json")
    assert r.status_code == 503 and r.json()["error"]["code"] == "stripe_unavailable"
    assert "STRIPE_SECRET_KEY" not in r.content.decode()


def test_the_api_catalogue_carries_the_description(api_client, shelf) -> None:
    body = api_client.get(f"/api/v1/documents/{shelf['cheap'].pk}").json()
    assert body["description"] == "Tides, hour by hour."
    assert body["example_questions"] == ["When is high water?"]
