"""Publisher pages with the Django test client: dashboard, new document, document page."""

from __future__ import annotations

import re

import pytest
import responses
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from marketplace.models import Document
from tests.pages.conftest import NANO, fund, make_document, settled_load

TEXT = "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea."


def _post_create(client, **data):
    body = {"title": "Loomings", "model": "tiny-qwen3", "text": "", "price_per_load": ""}
    body.update(data)
    return client.post(reverse("document-create"), body)


# --- new document ------------------------------------------------------------------------------


def test_create_page_shows_models_and_tariff(publisher_client) -> None:
    r = publisher_client.get(reverse("document-create"))
    html = r.content.decode()
    assert r.status_code == 200
    assert 'value="tiny-qwen3"' in html
    # tariff: 0.1 x $0.10 per 1M input tokens -> $0.00001 per 1,000 cached tokens
    assert "$0.00001" in html and 'id="tariffs"' in html
    assert 'enctype="multipart/form-data"' in html


def test_create_pasted_text_queues_precompute(
    publisher_client, publisher_user, sent_tasks, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        r = _post_create(publisher_client, text=TEXT)
    doc = Document.objects.get(publisher=publisher_user)
    assert r.status_code == 302 and r["Location"] == reverse("document-detail", args=[doc.pk])
    assert doc.status == "queued" and doc.text == TEXT and doc.price_per_load_nano is None
    assert len(sent_tasks.calls) == 1
    assert sent_tasks.calls[0]["args"] == [doc.pk]
    assert sent_tasks.calls[0]["queue"] == "gpu.tiny-qwen3"
    doc.refresh_from_db()
    assert doc.celery_task_id.startswith("task-")
    page = publisher_client.get(r["Location"])
    assert b"is queued" in page.content and b"waiting for a worker" in page.content


def test_create_from_upload_with_price_override(
    publisher_client, publisher_user, sent_tasks, django_capture_on_commit_callbacks
) -> None:
    upload = SimpleUploadedFile("moby.md", "# Loomings\n\nCall me Ishmaël.".encode())
    with django_capture_on_commit_callbacks(execute=True):
        r = _post_create(publisher_client, file=upload, price_per_load="0.00005")
    assert r.status_code == 302
    doc = Document.objects.get(publisher=publisher_user)
    assert doc.text == "# Loomings\n\nCall me Ishmaël."
    assert doc.price_per_load_nano == 50_000
    assert len(sent_tasks.calls) == 1


def _errors(r) -> str:
    assert r.status_code == 200, r.status_code
    html = r.content.decode()
    assert 'class="errorlist' in html or 'class="form-errors"' in html, html
    return html


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"text": ""}, "Paste the text or upload a file."),
        ({"text": "   \n  "}, "The text is empty."),
        ({"text": TEXT, "price_per_load": "-0.01"}, "greater than or equal to 0"),
        ({"text": TEXT, "price_per_load": "abc"}, "Enter a number."),
        ({"text": TEXT, "title": ""}, "This field is required."),
        ({"text": TEXT, "model": "gpt-17"}, "Select a valid choice."),
    ],
)
def test_create_form_errors(publisher_client, sent_tasks, data, message) -> None:
    html = _errors(_post_create(publisher_client, **data))
    assert message in html
    assert not Document.objects.exists() and sent_tasks.calls == []


def test_a_registry_model_missing_on_this_server_is_a_form_error(
    publisher_client, settings, sent_tasks
) -> None:
    # An unknown Hugging Face id, offline: an error on the form, not a hub traceback.
    tiny = settings.KVMARKET_MODELS["tiny-qwen3"]
    settings.KVMARKET_MODELS = {
        **settings.KVMARKET_MODELS, "ghost": {**tiny, "ref": "nobody-here/no-such-model-1b"},
    }
    html = _errors(_post_create(publisher_client, text=TEXT, model="ghost"))
    assert "Model &#x27;ghost&#x27; is not available on this server" in html
    assert "nobody-here/no-such-model-1b" in html and "Traceback" not in html
    assert not Document.objects.exists() and sent_tasks.calls == []


def test_both_text_and_file_is_an_error(publisher_client, sent_tasks) -> None:
    upload = SimpleUploadedFile("a.txt", b"hello")
    html = _errors(_post_create(publisher_client, text=TEXT, file=upload))
    assert "either pasted or as a file, not both" in html
    assert not Document.objects.exists()


def test_too_large_upload(publisher_client, settings, sent_tasks) -> None:
    settings.DOCUMENT_MAX_UPLOAD_BYTES = 100
    upload = SimpleUploadedFile("big.txt", b"x" * 101)
    html = _errors(_post_create(publisher_client, file=upload))
    assert "the limit is 100 bytes" in html
    assert not Document.objects.exists()


def test_too_long_pasted_text(publisher_client, settings, sent_tasks) -> None:
    settings.DOCUMENT_MAX_UPLOAD_BYTES = 100
    html = _errors(_post_create(publisher_client, text="y" * 101))
    assert "At most 100 bytes." in html  # the service's rule, put back on the form
    assert not Document.objects.exists()


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("latin1.txt", "café".encode("latin-1"), "not valid UTF-8"),
        ("notes.pdf", b"%PDF-1.4", "Upload a .txt or .md file."),
        ("empty.txt", b"  \n", "The file is empty."),
    ],
)
def test_bad_uploads(publisher_client, sent_tasks, name, data, message) -> None:
    html = _errors(_post_create(publisher_client, file=SimpleUploadedFile(name, data)))
    assert message in html
    assert not Document.objects.exists()


# --- dashboard and progress --------------------------------------------------------------------


def test_dashboard_polls_while_precomputing_and_stops_when_done(
    publisher_client, publisher_user
) -> None:
    doc = make_document(
        publisher_user, status="precomputing", tokens_done=1536, tokens_total=4096,
        title="Skerry Point",
    )
    page = publisher_client.get(reverse("publisher-dashboard")).content.decode()
    assert 'hx-trigger="every 1s"' in page
    assert reverse("publisher-documents-partial") in page
    partial = publisher_client.get(reverse("publisher-documents-partial"), HTTP_HX_REQUEST="true")
    html = partial.content.decode()
    assert partial.status_code == 200 and "<html" not in html
    assert "1,536 / 4,096 tokens (37%)" in html
    assert 'data-polling="true"' in html and 'hx-trigger="every 1s"' in html

    Document.objects.filter(pk=doc.pk).update(
        status="ready", tokens_done=4096, n_tokens=4096, artifact_key="k" * 64,
        artifact_bytes=1000,
    )
    html = publisher_client.get(reverse("publisher-documents-partial")).content.decode()
    assert 'data-polling="false"' in html and "hx-trigger" not in html
    assert "Ready" in html and "4,096" in html


def test_dashboard_empty(publisher_client, settings) -> None:
    settings.SANDBOX_MODE = False  # payouts through Stripe (sandbox mode simulates them)
    html = publisher_client.get(reverse("publisher-dashboard")).content.decode()
    assert "No documents yet" in html and "hx-trigger" not in html
    assert "Set up payouts with Stripe" in html


def test_dashboard_shows_loads_revenue_and_compute_saved(
    publisher_client, publisher_user, agent_user, other_publisher_client
) -> None:
    doc = make_document(publisher_user, n_tokens=1000, price=1_000_000, title="Paid doc")
    fund(agent_user, amount_nano=NANO)
    settled_load(agent_user, doc)
    html = publisher_client.get(reverse("publisher-dashboard")).content.decode()
    row = re.search(rf'<tr id="document-{doc.pk}".*?</tr>', html, re.S).group(0)
    # price $0.001 per load, publisher share 80% -> $0.0008 earned; 1 load x 1000 tokens saved
    assert "$0.001" in row and "$0.0008" in row
    assert "1,000 tok" in row and "2.5 TFLOP" in row
    assert 'id="total-earned">$0.0008<' in html and 'id="total-loads">1<' in html
    # tenant isolation: another publisher sees none of it
    other = other_publisher_client.get(reverse("publisher-dashboard")).content.decode()
    assert "Paid doc" not in other and "$0.0008" not in other and "No documents yet" in other


# --- document page -----------------------------------------------------------------------------


def test_document_page_numbers_verification_and_chart(
    publisher_client, publisher_user, agent_user
) -> None:
    doc = make_document(publisher_user, n_tokens=1000, price=1_000_000)
    fund(agent_user, amount_nano=NANO)
    settled_load(agent_user, doc)
    html = publisher_client.get(reverse("document-detail", args=[doc.pk])).content.decode()
    assert "Ready" in html and "1,000" in html
    assert "143 MiB" in html  # 150,000 bytes/token x 1000 tokens
    assert "✓ Verified" in html and "24/24" in html and "bitwise identical" in html
    assert re.search(r"max logit diff 0\s", html)
    assert 'id="doc-loads">1<' in html and 'id="doc-earned">$0.0008<' in html
    assert "<svg" in html and 'class="bar"' in html and "<polyline" in html
    assert "1 load, $0.0008" in html  # the bar's tooltip for today
    assert 'hx-trigger' not in html  # nothing to poll


def test_status_partial_renders_progress_and_refreshes_when_done(
    publisher_client, publisher_user
) -> None:
    doc = make_document(publisher_user, status="precomputing", tokens_done=10, tokens_total=40)
    url = reverse("document-status", args=[doc.pk])
    r = publisher_client.get(url, HTTP_HX_REQUEST="true")
    html = r.content.decode()
    assert "10 / 40 tokens prefilled (25%)" in html and "hx-trigger" in html
    assert "HX-Refresh" not in r
    Document.objects.filter(pk=doc.pk).update(
        status="ready", tokens_done=40, n_tokens=40, artifact_key="a" * 64
    )
    r = publisher_client.get(url + "?was=precomputing", HTTP_HX_REQUEST="true")
    assert r["HX-Refresh"] == "true" and "hx-trigger" not in r.content.decode()


def test_failed_document_shows_error_and_retry_queues_it(
    publisher_client, publisher_user, sent_tasks, django_capture_on_commit_callbacks
) -> None:
    doc = make_document(publisher_user, status="failed", error="CUDA out of memory",
                        error_code="oom")
    html = publisher_client.get(reverse("document-detail", args=[doc.pk])).content.decode()
    assert "CUDA out of memory" in html and "Retry precompute" in html
    with django_capture_on_commit_callbacks(execute=True):
        r = publisher_client.post(reverse("document-retry", args=[doc.pk]), follow=True)
    doc.refresh_from_db()
    assert doc.status == "queued" and doc.error == ""
    assert [c["args"] for c in sent_tasks.calls] == [[doc.pk]]
    assert "queued again" in r.content.decode()


def test_retry_of_a_ready_document_is_refused(publisher_client, publisher_user, sent_tasks) -> None:
    doc = make_document(publisher_user)
    r = publisher_client.post(reverse("document-retry", args=[doc.pk]), follow=True)
    assert "Only a failed precompute can be retried." in r.content.decode()
    doc.refresh_from_db()
    assert doc.status == "ready" and sent_tasks.calls == []


def test_unlist_explains_live_licenses_and_relist(
    publisher_client, publisher_user, agent_user
) -> None:
    doc = make_document(publisher_user, price=1_000_000)
    fund(agent_user, amount_nano=NANO)
    license, _ = settled_load(agent_user, doc, loads=3)
    r = publisher_client.post(reverse("document-unlist", args=[doc.pk]), follow=True)
    html = r.content.decode()
    doc.refresh_from_db()
    assert not doc.listed and doc.unlisted_at is not None
    assert "Licenses already sold keep working until they expire" in html
    assert 'id="unlisted-note"' in html and "List again" in html
    license.refresh_from_db()
    assert license.is_live  # the service leaves live licenses alone
    publisher_client.post(reverse("document-relist", args=[doc.pk]))
    doc.refresh_from_db()
    assert doc.listed


# --- Stripe Connect -----------------------------------------------------------------------------


def test_connect_without_stripe_shows_a_message(publisher_client, stripe_off, settings) -> None:
    settings.SANDBOX_MODE = False
    r = publisher_client.post(reverse("publisher-connect"), follow=True)
    assert r.redirect_chain[-1][0] == reverse("publisher-dashboard")
    html = r.content.decode()
    assert "Payouts cannot be set up right now" in html
    assert "STRIPE_SECRET_KEY" not in html and "operator must" not in html


def test_connect_redirects_to_the_onboarding_link(publisher_client, stripe_on) -> None:
    link = "https://connect.stripe.com/setup/e/acct_pages/abc"
    with responses.RequestsMock() as rsps:
        rsps.post("https://api.stripe.com/v1/accounts", json={"id": "acct_pages",
                                                              "object": "account"})
        rsps.post("https://api.stripe.com/v1/account_links",
                  json={"object": "account_link", "url": link})
        r = publisher_client.post(reverse("publisher-connect"))
    assert r.status_code == 302 and r["Location"] == link
    html = publisher_client.get(reverse("publisher-dashboard")).content.decode()
    assert "Finish Stripe onboarding" in html


def test_detail_shows_the_example_questions(publisher_client, publisher_user) -> None:
    doc = make_document(publisher_user, example_questions=["Who is the narrator?", "Why <b>?"])
    html = publisher_client.get(reverse("document-detail", args=[doc.pk])).content.decode()
    assert 'id="example-questions"' in html
    assert "<li>Who is the narrator?</li>" in html and "<li>Why &lt;b&gt;?</li>" in html
    plain = make_document(publisher_user)
    html = publisher_client.get(reverse("document-detail", args=[plain.pk])).content.decode()
    assert 'id="example-questions"' not in html
