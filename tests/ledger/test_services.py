"""Services: postings, idempotency, rounding, the tariff (PostgreSQL)."""

from decimal import Decimal

import pytest

from ledger import selectors, services
from ledger.errors import IdempotencyConflict, InsufficientFunds, InvalidAmount, LedgerError
from ledger.models import AccountKind, Posting, Tariff, Transaction, TransactionKind
from marketplace.models import Role

from .conftest import make_user

pytestmark = pytest.mark.django_db

USD = 10**9


def test_design_example_load_price():
    tariff = selectors.tariff_for("tiny-qwen3")  # 0.10 USD / Mtok input, 0.40 output
    assert tariff.input_nano_per_token == 100
    assert tariff.cache_read_multiplier == Decimal("0.1")
    assert tariff.publisher_share == Decimal("0.8")
    assert tariff.load_price_nano(3774) == 37_740
    assert tariff.compute_price_nano(10, 5) == 10 * 100 + 5 * 400


def test_tariff_rounds_down_once_at_the_end():
    t = Tariff(
        model_slug="x",
        input_price_usd_per_mtok=Decimal("0.0375"),  # 37.5 nano-USD per token
        output_price_usd_per_mtok=Decimal("0.15"),
        cache_read_multiplier=Decimal("0.1"),
    )
    assert t.load_price_nano(1) == 3  # 3.75 -> 3
    assert t.load_price_nano(4) == 15  # exact, not 4 x 3
    assert t.compute_price_nano(3, 0) == 112  # 112.5 -> 112


def test_tariff_unknown_model():
    with pytest.raises(KeyError):
        selectors.tariff_for("no-such-model")
    with pytest.raises(KeyError):
        services.ensure_tariff(model_slug="no-such-model")


def test_reading_a_tariff_writes_nothing_and_ensure_stores_it_once():
    Tariff.objects.filter(model_slug="tiny-qwen3").delete()
    assert selectors.tariff_for("tiny-qwen3").load_price_nano(3774) == 37_740
    assert not Tariff.objects.filter(model_slug="tiny-qwen3").exists()  # a read, not a write

    stored = services.ensure_tariff(model_slug="tiny-qwen3")
    assert stored.pk is not None
    assert services.ensure_tariff(model_slug="tiny-qwen3").pk == stored.pk
    Tariff.objects.filter(pk=stored.pk).update(publisher_share=Decimal("0.5"))
    assert selectors.tariff_for("tiny-qwen3").publisher_share == Decimal("0.5")  # staff's edit
    with pytest.raises(KeyError):
        services.ensure_tariff(model_slug="no-such-model")


def test_tariff_edit_never_touches_past_postings(agent, publisher):
    tariff = selectors.tariff_for("tiny-qwen3")
    price = tariff.load_price_nano(3774)
    services.credit_topup(agent=agent, amount_nano=USD, idempotency_key="t1")
    services.purchase_license(agent=agent, license_ref="L1", amount_nano=price, idempotency_key="b")
    tx = services.settle_load(
        license_ref="L1", publisher=publisher, amount_nano=price,
        publisher_share=tariff.publisher_share, idempotency_key="s",
    )
    before = list(Posting.objects.filter(transaction=tx).values_list("amount", flat=True))
    tariff.input_price_usd_per_mtok = Decimal("5")
    tariff.publisher_share = Decimal("0.5")
    tariff.save()
    after = list(Posting.objects.filter(transaction=tx).values_list("amount", flat=True))
    assert before == after == [-price, 30_192, 7_548]
    assert selectors.tariff_for("tiny-qwen3").load_price_nano(3774) == 1_887_000


def test_topup_purchase_settle_refund_flow(agent, publisher):
    services.credit_topup(agent=agent, amount_nano=USD, idempotency_key="top", external_ref="cs_1")
    assert selectors.wallet_balance(agent) == USD
    assert selectors.system_balance(AccountKind.STRIPE_CLEARING) == -USD
    services.purchase_license(
        agent=agent, license_ref="L", amount_nano=100_000, idempotency_key="b"
    )
    assert selectors.wallet_balance(agent) == USD - 100_000
    assert selectors.escrow_balance("L") == 100_000
    tx = services.settle_load(
        license_ref="L", publisher=publisher, amount_nano=37_741,
        publisher_share=Decimal("0.8"), idempotency_key="s1", agent=agent, compute_nano=1_000,
    )
    assert tx.kind == TransactionKind.LOAD_SETTLEMENT
    assert selectors.escrow_balance("L") == 100_000 - 37_741
    assert selectors.payable_balance(publisher) == 30_192  # floor(37741 * 0.8)
    assert selectors.system_balance(AccountKind.PLATFORM_REVENUE) == 7_549
    assert selectors.system_balance(AccountKind.PLATFORM_COMPUTE_REVENUE) == 1_000
    assert selectors.wallet_balance(agent) == USD - 100_000 - 1_000
    refund = services.refund_escrow(license_ref="L", agent=agent, idempotency_key="r")
    assert refund is not None and selectors.escrow_balance("L") == 0
    assert selectors.wallet_balance(agent) == USD - 1_000 - 37_741
    assert services.refund_escrow(license_ref="L", agent=agent, idempotency_key="r2") is None
    # the retry of the first refund returns it
    assert services.refund_escrow(license_ref="L", agent=agent, idempotency_key="r") == refund
    history = selectors.wallet_history(agent)
    assert [h["kind"] for h in history] == [
        "escrow_refund", "load_settlement", "license_purchase", "topup"
    ]
    assert history[0]["balance_after_nano"] == selectors.wallet_balance(agent)


def test_idempotent_retry_returns_first_and_conflict_on_different_request(agent):
    first = services.credit_topup(agent=agent, amount_nano=500, idempotency_key="k")
    again = services.credit_topup(agent=agent, amount_nano=500, idempotency_key="k")
    assert first.pk == again.pk
    assert selectors.wallet_balance(agent) == 500
    with pytest.raises(IdempotencyConflict):
        services.credit_topup(agent=agent, amount_nano=501, idempotency_key="k")
    with pytest.raises(IdempotencyConflict):
        services.record_egress(agent=agent, amount_nano=500, idempotency_key="k")
    assert Transaction.objects.count() == 1


def test_insufficient_funds_posts_nothing(agent):
    services.credit_topup(agent=agent, amount_nano=10, idempotency_key="t")
    with pytest.raises(InsufficientFunds):
        services.purchase_license(agent=agent, license_ref="L", amount_nano=11, idempotency_key="b")
    with pytest.raises(InsufficientFunds):
        services.record_egress(agent=agent, amount_nano=11, idempotency_key="e")
    assert selectors.wallet_balance(agent) == 10
    assert Transaction.objects.count() == 1
    # the failed key is free to be used again once the wallet can pay
    services.credit_topup(agent=agent, amount_nano=1, idempotency_key="t2")
    services.purchase_license(agent=agent, license_ref="L", amount_nano=11, idempotency_key="b")
    assert selectors.wallet_balance(agent) == 0


def test_settle_needs_escrow_and_caps_compute_at_wallet(agent, publisher):
    with pytest.raises(InsufficientFunds):
        services.settle_load(
            license_ref="nope", publisher=publisher, amount_nano=1,
            publisher_share=Decimal("0.8"), idempotency_key="x",
        )
    services.credit_topup(agent=agent, amount_nano=1_000, idempotency_key="t")
    services.purchase_license(agent=agent, license_ref="L", amount_nano=900, idempotency_key="b")
    with pytest.raises(InsufficientFunds):
        services.settle_load(
            license_ref="L", publisher=publisher, amount_nano=901,
            publisher_share=Decimal("0.8"), idempotency_key="s0",
        )
    tx = services.settle_load(
        license_ref="L", publisher=publisher, amount_nano=900, publisher_share=Decimal("0.8"),
        idempotency_key="s", compute_nano=5_000,  # agent defaults to the license owner
    )
    assert tx.details["compute_charged_nano"] == 100
    assert tx.details["compute_uncharged_nano"] == 4_900
    assert selectors.wallet_balance(agent) == 0
    assert selectors.escrow_balance("L") == 0


def test_escrow_belongs_to_its_buyer(agent):
    other = make_user(Role.AGENT)
    services.credit_topup(agent=agent, amount_nano=100, idempotency_key="t1")
    services.credit_topup(agent=other, amount_nano=100, idempotency_key="t2")
    services.purchase_license(agent=agent, license_ref="L", amount_nano=10, idempotency_key="b1")
    with pytest.raises(LedgerError):
        services.purchase_license(
            agent=other, license_ref="L", amount_nano=10, idempotency_key="b2"
        )
    with pytest.raises(LedgerError):
        services.refund_escrow(license_ref="L", agent=other, idempotency_key="r")
    assert selectors.escrow_balance("L") == 10


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_amounts_are_positive_ints(agent, bad):
    with pytest.raises(InvalidAmount):
        services.credit_topup(agent=agent, amount_nano=bad, idempotency_key="t")


def test_free_license_posts_nothing(agent):
    tx = services.purchase_license(agent=agent, license_ref="F", amount_nano=0, idempotency_key="b")
    assert tx.postings.count() == 0
    assert selectors.escrow_balance("F") == 0


@pytest.mark.parametrize(
    "amount,share",
    [(37_741, "0.8"), (1, "0.8"), (3, "0.333333"), (10**12 + 7, "0.999999"), (9, "0"), (9, "1")],
)
def test_split_never_creates_or_loses_nano(amount, share):
    pub, plat = services.split_amount(amount, Decimal(share))
    assert pub + plat == amount and pub >= 0 and plat >= 0
    assert pub == int(Decimal(share) * amount)  # floor for non-negative values


def test_publisher_earnings(agent, publisher):
    services.credit_topup(agent=agent, amount_nano=USD, idempotency_key="t")
    services.purchase_license(agent=agent, license_ref="L", amount_nano=10**6, idempotency_key="b")
    for i in range(3):
        services.settle_load(
            license_ref="L", publisher=publisher, amount_nano=1000,
            publisher_share=Decimal("0.8"), idempotency_key=f"s{i}", document_ref="doc-1",
        )
    earnings = selectors.publisher_earnings(publisher, days=7)
    assert len(earnings["days"]) == 7
    assert earnings["days"][-1]["loads"] == 3 and earnings["days"][-1]["earned_nano"] == 2400
    assert earnings["totals"] == {"loads": 3, "earned_nano": 2400}
    assert earnings["payable_nano"] == 2400
    assert selectors.publisher_earnings(publisher, document_ref="other")["totals"]["loads"] == 0


def test_free_license_without_escrow_settles_compute_only(agent, publisher):
    services.credit_topup(agent=agent, amount_nano=500, idempotency_key="t")
    tx = services.settle_load(
        license_ref="free-never-bought", publisher=publisher, amount_nano=0,
        publisher_share=Decimal("0.8"), idempotency_key="s", agent=agent, compute_nano=300,
    )
    assert tx.details["compute_charged_nano"] == 300
    assert selectors.wallet_balance(agent) == 200
    assert selectors.payable_balance(publisher) == 0
