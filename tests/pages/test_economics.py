"""Economics of a document: the arithmetic, the paper's headline reproduced by the command,
this deployment's measured timings, the API endpoint and the plot; precompute steps."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from marketplace.economics import Economics, Timing, cost_plot
from marketplace.selectors.economics import document_economics
from marketplace.selectors.pages import precompute_progress
from marketplace.services.documents import record_progress, start_precompute
from tests.pages.conftest import NANO, fund, make_document, settled_load


def test_paper_headline_is_reproduced_within_five_percent() -> None:
    out = io.StringIO()
    call_command("economics", "--paper", "--json", stdout=out)
    result = json.loads(out.getvalue())
    assert result["agents"] == 80_000_000 and result["n_tokens"] == 3774
    assert result["prefill_total_usd"] == pytest.approx(1.5e6, rel=0.05)
    assert result["reuse_total_usd"] == pytest.approx(0.03e6, rel=0.05)
    assert result["saving"] == pytest.approx(49.7)
    # the 0.1x tariff: agents pay 10x less than re-prefill, more than the reuse compute
    assert result["agents_pay_usd"] == pytest.approx(result["prefill_total_usd"] / 10)
    # shipping ~0.15 MB/token of KV costs more than the prefill it saves
    assert result["egress_vs_prefill"] > 1


def test_command_takes_gpu_price_and_throughput() -> None:
    out = io.StringIO()
    call_command("economics", "--tokens", "3774", "--agents", "1000", "--gpu-usd-per-hour", "3.6",
                 "--prefill-seconds", "0.1", "--load-seconds", "0.004", "--json", stdout=out)
    result = json.loads(out.getvalue())
    assert result["prefill_usd"] == pytest.approx(1e-4)  # $3.6/h = $0.001/s
    assert result["load_usd"] == pytest.approx(4e-6)
    assert result["saving"] == pytest.approx(25)
    assert result["break_even_loads"] == 2
    assert result["prefill_total_usd"] == pytest.approx(0.1)
    assert result["reuse_total_usd"] == pytest.approx(1e-4 + 1000 * 4e-6)


def test_break_even_and_plot_geometry() -> None:
    econ = Economics(n_tokens=1000, gpu_usd_per_hour=3600.0, prefill=Timing(1.0, "measured"),
                     load=Timing(0.5, "measured"), kv_bytes=10**9, egress_usd_per_gb=0.09)
    assert econ.saving == 2 and econ.break_even_loads == 2
    assert Economics(n_tokens=1, gpu_usd_per_hour=1, prefill=Timing(1, "x"),
                     load=Timing(1, "x")).break_even_loads is None  # never pays back
    plot = cost_plot(econ, max_agents=10**4)
    assert set(plot["lines"]) == {"prefill", "reuse", "egress"}
    assert len(plot["lines"]["prefill"].split()) == 5  # 1, 10, ..., 10^4 agents
    assert plot["end"]["prefill"]["usd"] == 10**4 and plot["end"]["reuse"]["usd"] == 1 + 5000


@pytest.mark.django_db
def test_document_economics_use_measured_timings_else_estimates(publisher_user, agent_user,
                                                                settings) -> None:
    settings.GPU_USD_PER_HOUR = 3.6
    doc = make_document(publisher_user, n_tokens=1000, price=37_740)
    econ = document_economics(doc)
    assert econ.prefill.source == "measured" and econ.prefill.seconds == 0.42
    assert econ.load.source == "estimate"  # no load yet: the hot tier's estimate
    assert econ.saving == pytest.approx(25)
    fund(agent_user, amount_nano=NANO)
    settled_load(agent_user, doc)  # the worker's result: ttft 0.02 s
    econ = document_economics(doc)
    assert econ.load.source == "measured" and econ.load.seconds == 0.02
    assert econ.saving == pytest.approx(21)
    # the load's store tier (from the worker's timings) is measured; the others estimated
    tiers = {t["tier"]: t for t in econ.tiers}
    assert tiers["host"]["source"] == "measured" and tiers["host"]["seconds"] == 0.02
    assert tiers["gpu"]["source"] == "estimate" and tiers["gpu"]["saving"] == 25
    assert econ.prefill_usd == pytest.approx(0.42 * 0.001)
    assert econ.kv_bytes_per_token == 150_000 and econ.egress_usd == pytest.approx(0.0135)
    assert econ.price_per_load_usd == pytest.approx(37_740e-9)
    doc.precompute_seconds = None  # e.g. an artifact reused from another document
    assert document_economics(doc).prefill.source == "estimate"


@pytest.mark.django_db
def test_economics_api_endpoint(api_client, publisher_user) -> None:
    doc = make_document(publisher_user, n_tokens=1000)
    r = api_client.get(f"/api/v1/documents/{doc.pk}/economics", {"agents": 10})
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["document"] == doc.pk and body["agents"] == 10
    assert body["prefill_total_usd"] == pytest.approx(10 * body["prefill_usd"])
    assert api_client.get(f"/api/v1/documents/{doc.pk}/economics",
                          {"agents": "x"}).json()["error"]["code"] == "invalid_request"
    draft = make_document(publisher_user, status="draft")
    assert api_client.get(f"/api/v1/documents/{draft.pk}/economics").status_code == 404


@pytest.mark.django_db
def test_publisher_sees_economics_on_the_dashboard_and_document_page(
    publisher_client, publisher_user
) -> None:
    doc = make_document(publisher_user, title="Tide tables")
    html = publisher_client.get(reverse("publisher-dashboard")).content.decode()
    assert 'id="economics-plot"' in html and "Tide tables" in html
    html = publisher_client.get(reverse("document-detail", args=[doc.pk])).content.decode()
    assert 'id="economics-plot"' in html and f'<code id="doc-id">{doc.pk}</code>' in html


@pytest.mark.django_db
def test_precompute_shows_its_steps_and_an_estimate(publisher_client, publisher_user) -> None:
    doc = make_document(publisher_user, status="queued")
    start_precompute(document_id=doc.pk, task_id="t-1")
    doc.refresh_from_db()
    assert precompute_progress(doc)["current"] == "tokenizing"
    record_progress(document_id=doc.pk, tokens_done=10, tokens_total=40)
    doc.refresh_from_db()
    doc.precompute_started_at = timezone.now() - timedelta(seconds=2)
    progress = precompute_progress(doc)
    assert [s["state"] for s in progress["steps"]] == ["done", "current", "todo"]
    assert progress["remaining_seconds"] == pytest.approx(6, rel=0.1)  # 30 tokens at 5/s
    doc.save(update_fields=["precompute_started_at"])
    html = publisher_client.get(reverse("document-status", args=[doc.pk])).content.decode()
    assert 'aria-live="polite"' in html and "Prefilling: 10 / 40 tokens prefilled" in html
    assert "s left" in html
    record_progress(document_id=doc.pk, tokens_done=40, tokens_total=40)
    doc.refresh_from_db()
    verifying_since = doc.step_started_at
    record_progress(document_id=doc.pk, tokens_done=40, tokens_total=40)  # later writes
    doc.refresh_from_db()
    assert doc.step_started_at == verifying_since  # the step's start stays put
    doc.precompute_started_at = verifying_since - timedelta(seconds=3)
    progress = precompute_progress(doc, now=verifying_since + timedelta(seconds=1))
    assert progress["current"] == "verifying"
    assert progress["remaining_seconds"] == pytest.approx(5)  # 2 x 3 s of prefill, 1 s gone
    html = publisher_client.get(reverse("document-status", args=[doc.pk])).content.decode()
    assert "Writing and verifying" in html
