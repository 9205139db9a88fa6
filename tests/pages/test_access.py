"""Who may open which page: anonymous -> login, wrong role -> 403, another publisher -> 404."""

import pytest
from django.test import Client
from django.urls import reverse

from tests.pages.conftest import make_document

PUBLISHER_GET = ["publisher-dashboard", "publisher-documents-partial", "document-create"]
PUBLISHER_DOC_GET = ["document-detail", "document-status"]
PUBLISHER_DOC_POST = ["document-retry", "document-unlist", "document-relist"]


def _all_urls(doc_id: int) -> list[tuple[str, str]]:
    urls = [("get", reverse(n)) for n in PUBLISHER_GET]
    urls += [("get", reverse(n, args=[doc_id])) for n in PUBLISHER_DOC_GET]
    urls += [("post", reverse(n, args=[doc_id])) for n in PUBLISHER_DOC_POST]
    urls += [("post", reverse("publisher-connect")), ("get", reverse("agent-console")),
             ("post", reverse("agent-topup"))]
    return urls


def test_anonymous_is_sent_to_login(publisher_user) -> None:
    doc = make_document(publisher_user)
    client = Client()
    for method, url in _all_urls(doc.pk):
        r = getattr(client, method)(url)
        assert r.status_code == 302, url
        assert r["Location"].startswith(reverse("login") + "?next="), url


def test_agent_gets_403_on_publisher_pages(agent_client, publisher_user) -> None:
    doc = make_document(publisher_user)
    for name in PUBLISHER_GET:
        r = agent_client.get(reverse(name))
        assert r.status_code == 403, name
        assert b"publisher accounts" in r.content
    for name in PUBLISHER_DOC_GET:
        assert agent_client.get(reverse(name, args=[doc.pk])).status_code == 403
    for name in [*PUBLISHER_DOC_POST]:
        assert agent_client.post(reverse(name, args=[doc.pk])).status_code == 403
    assert agent_client.post(reverse("publisher-connect")).status_code == 403
    doc.refresh_from_db()
    assert doc.listed


@pytest.mark.parametrize("name", ["agent-console"])
def test_publisher_and_staff_get_403_on_the_console(publisher_client, staff_user, name) -> None:
    r = publisher_client.get(reverse(name))
    assert r.status_code == 403
    assert publisher_client.post(reverse("agent-topup"), {"amount": "10"}).status_code == 403
    staff = Client()
    staff.force_login(staff_user)
    assert staff.get(reverse(name)).status_code == 403
    assert staff.get(reverse("publisher-dashboard")).status_code == 403


def test_other_publisher_gets_404_and_changes_nothing(
    other_publisher_client, publisher_user, sent_tasks
) -> None:
    doc = make_document(publisher_user, title="Secret ledger of Skerry Point")
    failed = make_document(publisher_user, status="failed", error="boom", error_code="oom")
    for name in PUBLISHER_DOC_GET:
        r = other_publisher_client.get(reverse(name, args=[doc.pk]))
        assert r.status_code == 404
        assert b"Skerry" not in r.content
    for name in PUBLISHER_DOC_POST:
        assert other_publisher_client.post(reverse(name, args=[doc.pk])).status_code == 404
    assert other_publisher_client.post(reverse("document-retry", args=[failed.pk])).status_code \
        == 404
    doc.refresh_from_db()
    failed.refresh_from_db()
    assert doc.listed and failed.status == "failed" and sent_tasks.calls == []


def test_missing_document_is_404(publisher_client) -> None:
    assert publisher_client.get(reverse("document-detail", args=[999999])).status_code == 404


def test_get_only_and_post_only(publisher_client, publisher_user) -> None:
    doc = make_document(publisher_user)
    assert publisher_client.get(reverse("document-unlist", args=[doc.pk])).status_code == 405
    assert publisher_client.post(reverse("publisher-dashboard")).status_code == 405
