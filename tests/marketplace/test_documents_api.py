"""Documents API: catalogue visibility, publisher management, tenant isolation, errors."""

from __future__ import annotations

import pytest

from marketplace.models import Document, DocumentStatus, Role
from tests.marketplace.conftest import make_ready_document
from tests.support.accounts import make_user

pytestmark = pytest.mark.django_db


def test_unauthenticated_is_401_json(anon_api_client):
    r = anon_api_client.get("/api/v1/documents")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "not_authenticated"


def test_bad_key_is_401_json(anon_api_client):
    anon_api_client.credentials(HTTP_AUTHORIZATION="Bearer kvm_nope")
    r = anon_api_client.get("/api/v1/documents")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "authentication_failed"


def test_agent_catalogue_shows_ready_listed_only(api_client, publisher_user):
    ready = make_ready_document(publisher_user, n_tokens=3774)
    make_ready_document(publisher_user, listed=False)
    Document.objects.create(
        publisher=publisher_user, title="draft", text="x", model_slug="tiny-qwen3"
    )
    r = api_client.get("/api/v1/documents")
    assert r.status_code == 200
    body = r.json()
    assert [d["id"] for d in body["results"]] == [ready.pk]
    doc = body["results"][0]
    assert doc["model"] == "tiny-qwen3"
    assert doc["n_tokens"] == 3774
    # 3774 tokens x $0.10/Mtok x 0.1 = 37,740 nano-USD (the design's worked example).
    assert doc["price_per_load_nano"] == 37_740
    assert doc["verification"]["passed"] is True
    assert doc["owner_details"] is None
    assert doc["example_questions"] == []
    assert "text" not in doc


def test_agent_detail_of_unready_or_unlisted_is_404(api_client, publisher_user):
    draft = Document.objects.create(
        publisher=publisher_user, title="draft", text="x", model_slug="tiny-qwen3"
    )
    unlisted = make_ready_document(publisher_user, listed=False)
    for doc in (draft, unlisted):
        r = api_client.get(f"/api/v1/documents/{doc.pk}")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
    assert api_client.get("/api/v1/documents/999999").status_code == 404


def test_publisher_price_override(api_client, publisher_user):
    doc = make_ready_document(publisher_user, price=5_000)
    assert api_client.get(f"/api/v1/documents/{doc.pk}").json()["price_per_load_nano"] == 5_000


def test_publisher_creates_document_and_it_is_queued(publisher_client, monkeypatch,
                                                     django_capture_on_commit_callbacks):
    sent = []
    monkeypatch.setattr(
        "marketplace.tasks.enqueue_precompute",
        lambda *, document_id, model_slug: sent.append((document_id, model_slug)) or "task-1",
    )
    with django_capture_on_commit_callbacks(execute=True):
        r = publisher_client.post(
            "/api/v1/documents",
            {"title": "Moby", "text": "Call me Ishmael.", "model": "tiny-qwen3"},
            format="json",
        )
    assert r.status_code == 201, r.content
    body = r.json()
    assert body["status"] == "queued"
    assert body["owner_details"]["text"] == "Call me Ishmael."
    assert sent == [(body["id"], "tiny-qwen3")]
    assert Document.objects.get(pk=body["id"]).celery_task_id == "task-1"


def test_create_document_validation_is_422(publisher_client):
    r = publisher_client.post(
        "/api/v1/documents", {"title": "", "text": "", "model": "gpt-9"}, format="json"
    )
    assert r.status_code == 422
    fields = r.json()["error"]["fields"]
    assert {"title", "text", "model"} <= set(fields)


def test_a_registry_model_missing_on_this_server_is_422(publisher_client, settings):
    tiny = settings.KVMARKET_MODELS["tiny-qwen3"]
    settings.KVMARKET_MODELS = {
        **settings.KVMARKET_MODELS,
        "ghost": {**tiny, "ref": "nobody-here/no-such-model-1b"},
        "no-package": {**tiny, "ref": "pkg:no_such_package_kvm/m.gguf"},
    }
    for slug in ("ghost", "no-package"):
        r = publisher_client.post(
            "/api/v1/documents", {"title": "t", "text": "x", "model": slug}, format="json"
        )
        assert r.status_code == 422, r.content
        error = r.json()["error"]
        assert error["code"] == "invalid_request"
        assert "not available on this server" in str(error["fields"]["model"])


def test_agent_cannot_create_document(api_client):
    r = api_client.post(
        "/api/v1/documents", {"title": "t", "text": "x", "model": "tiny-qwen3"}, format="json"
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "publisher_only"


def test_publisher_sees_only_own_documents(publisher_client, publisher_user):
    mine = make_ready_document(publisher_user)
    other = make_user(role=Role.PUBLISHER)
    theirs = make_ready_document(other)
    theirs_draft = Document.objects.create(
        publisher=other, title="secret", text="secret", model_slug="tiny-qwen3"
    )
    ids = [d["id"] for d in publisher_client.get("/api/v1/documents").json()["results"]]
    assert ids == [mine.pk]
    assert publisher_client.get(f"/api/v1/documents/{theirs_draft.pk}").status_code == 404
    # Another publisher's listed document is public catalogue data, but not editable:
    assert publisher_client.get(f"/api/v1/documents/{theirs.pk}").status_code == 404
    for method, url in [
        ("patch", f"/api/v1/documents/{theirs.pk}"),
        ("post", f"/api/v1/documents/{theirs.pk}/unlist"),
        ("post", f"/api/v1/documents/{theirs.pk}/retry"),
        ("delete", f"/api/v1/documents/{theirs.pk}"),
    ]:
        r = getattr(publisher_client, method)(url, {"title": "pwned"}, format="json")
        assert r.status_code == 404, (method, url, r.content)
    theirs.refresh_from_db()
    assert theirs.listed and theirs.title != "pwned"


def test_publisher_edits_unlists_and_relists(publisher_client, publisher_user):
    doc = make_ready_document(publisher_user)
    r = publisher_client.patch(
        f"/api/v1/documents/{doc.pk}", {"title": "New title", "price_per_load_nano": 777},
        format="json",
    )
    assert r.status_code == 200
    assert r.json()["title"] == "New title" and r.json()["price_per_load_nano"] == 777
    r = publisher_client.patch(
        f"/api/v1/documents/{doc.pk}", {"price_per_load_nano": None}, format="json"
    )
    assert r.json()["price_per_load_nano"] == 10_000  # back to the tariff: 1000 tokens x 10 nano
    r = publisher_client.post(f"/api/v1/documents/{doc.pk}/unlist")
    assert r.status_code == 200 and r.json()["listed"] is False
    assert r.json()["owner_details"]["unlisted_at"]
    r = publisher_client.post(f"/api/v1/documents/{doc.pk}/relist")
    assert r.json()["listed"] is True


def test_retry_only_failed(publisher_client, publisher_user, monkeypatch,
                           django_capture_on_commit_callbacks):
    monkeypatch.setattr(
        "marketplace.tasks.enqueue_precompute", lambda *, document_id, model_slug: "t-2"
    )
    doc = make_ready_document(publisher_user)
    r = publisher_client.post(f"/api/v1/documents/{doc.pk}/retry")
    assert r.status_code == 409
    Document.objects.filter(pk=doc.pk).update(
        status=DocumentStatus.FAILED, error="boom", error_code="internal_error"
    )
    with django_capture_on_commit_callbacks(execute=True):
        r = publisher_client.post(f"/api/v1/documents/{doc.pk}/retry")
    assert r.status_code == 200
    assert r.json()["status"] == "queued"
    assert r.json()["owner_details"]["error"] == ""


def test_delete_document_with_licenses_is_409(publisher_client, publisher_user, funded_agent):
    from marketplace.services.licenses import purchase_license

    doc = make_ready_document(publisher_user)
    purchase_license(agent=funded_agent, document_id=doc.pk, loads=1)
    assert publisher_client.delete(f"/api/v1/documents/{doc.pk}").status_code == 409
    fresh = make_ready_document(publisher_user)
    assert publisher_client.delete(f"/api/v1/documents/{fresh.pk}").status_code == 204


def test_session_writes_need_csrf(publisher_user, password):
    from rest_framework.test import APIClient

    client = APIClient(enforce_csrf_checks=True)
    assert client.login(email=publisher_user.email, password=password)
    doc = make_ready_document(publisher_user)
    assert client.get(f"/api/v1/documents/{doc.pk}").status_code == 200
    assert client.post(f"/api/v1/documents/{doc.pk}/unlist").status_code == 403
