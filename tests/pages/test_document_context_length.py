"""The new-document page refuses a document longer than the model's context with a form
error (nothing created, nothing queued)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from marketplace.models import Document

pytestmark = pytest.mark.django_db


def test_too_long_document_is_a_form_error(publisher_client, sent_tasks) -> None:
    body = {"title": "Long", "model": "tiny-qwen3", "text": "hello world " * 2100,
            "price_per_load": ""}
    response = publisher_client.post(reverse("document-create"), body)
    assert response.status_code == 200
    html = response.content.decode()
    assert "errorlist" in html and "4096-token context" in html
    assert not Document.objects.exists() and sent_tasks.calls == []
