from marketplace.templatetags.kvm_pages import (
    flops,
    nbytes,
    price,
    price_per_1k,
    price_per_mtok,
    usd,
)


def test_usd_shows_cents_and_never_reads_zero_for_a_sub_cent_amount() -> None:
    assert usd(11_200_118_336) == "$11.20"
    assert usd(19_999_592_200) == "$19.99"  # cut, never rounded up
    assert usd(12_500_000_000) == "$12.50"
    assert usd(1_234_567_000_000_000) == "$1,234,567.00"
    assert usd(0) == "$0.00"
    assert usd(37_740) == "$0.000038"
    assert usd(-3_000_000) == "-$0.003"
    assert usd(None) == "—"


def test_price_keeps_three_significant_digits() -> None:
    assert price(369_800) == "$0.00037"
    assert price(118_336) == "$0.000118"
    assert price(1) == "$0.000000001"
    assert price(2_500_000_000) == "$2.50"
    assert price(0) == "$0.00"
    assert price_per_1k(369_800) == "$0.37"
    assert price_per_mtok(37_740, 3774) == "$0.01"
    assert price(None) == "—"


def test_flops_and_bytes() -> None:
    assert flops(2.5e12) == "2.5 TFLOP"
    assert flops(None) == "—"
    assert nbytes(512) == "512 B"
    assert nbytes(1536) == "1.5 KiB"


def test_sci() -> None:
    from marketplace.templatetags.kvm_pages import sci

    assert sci(0.0) == "0"
    assert sci(1.6689300537109375e-06) == "1.67e-06"
    assert sci(0.25) == "0.25"
    assert sci(None) == "—"
