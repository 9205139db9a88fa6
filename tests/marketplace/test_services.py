"""Service and selector helpers the publisher/agent pages build on."""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from marketplace.models import Load, LoadKind
from marketplace.selectors.documents import document_stats
from marketplace.selectors.licenses import daily_loads
from marketplace.services.completions import charge_load, reserve_load
from marketplace.services.documents import create_document, decode_upload
from marketplace.services.licenses import purchase_license
from tests.marketplace.conftest import FAKE_RESULT, make_ready_document

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("sql_path")]


def test_decode_upload(settings):
    assert decode_upload(data="héllo".encode(), filename="a.md") == "héllo"
    assert decode_upload(data=b"\xef\xbb\xbfbom", filename="a.TXT") == "bom"
    with pytest.raises(ValidationError) as exc:
        decode_upload(data=b"ok \xff\xfe", filename="a.txt")
    assert exc.value.code == "encoding" and "UTF-8" in exc.value.message
    with pytest.raises(ValidationError) as exc:
        decode_upload(data=b"x", filename="a.pdf")
    assert exc.value.code == "file_type"
    settings.DOCUMENT_MAX_UPLOAD_BYTES = 3
    with pytest.raises(ValidationError) as exc:
        decode_upload(data=b"abcd", filename="a.txt")
    assert exc.value.code == "too_big"


def test_only_publishers_create_documents(agent_user):
    with pytest.raises(PermissionDenied):
        create_document(publisher=agent_user, title="t", text="x", model_slug="tiny-qwen3")


def test_create_document_without_submit_is_draft(publisher_user):
    doc = create_document(publisher=publisher_user, title=" T ", text="x",
                          model_slug="tiny-qwen3", submit=False)
    assert doc.status == "draft" and doc.title == "T"


def test_stats_and_daily_loads(publisher_user, funded_agent):
    doc = make_ready_document(publisher_user, n_tokens=500)
    lic, _ = purchase_license(agent=funded_agent, document_id=doc.pk, loads=3)
    for key in ("a", "b"):
        res = reserve_load(agent=funded_agent, license_id=lic.pk, document_id=doc.pk,
                           kind=LoadKind.CHAT, idempotency_key=key, payload={})
        charge_load(load=res.load, result=dict(FAKE_RESULT))
    stats = document_stats(doc)
    assert stats["loads"] == 2 and stats["licenses"] == 1
    assert stats["billed_nano"] == 2 * 5_000
    assert stats["prefill_tokens_saved"] == 1000
    rows = daily_loads(document_id=doc.pk)
    assert len(rows) == 1 and rows[0]["loads"] == 2 and rows[0]["billed_nano"] == 10_000
    assert Load.objects.filter(status="succeeded").count() == 2
