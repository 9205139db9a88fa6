from marketplace.templatetags.kvm_pages import flops, nbytes, usd


def test_usd_is_exact_with_enough_decimals() -> None:
    assert usd(37_740) == "$0.00003774"
    assert usd(1) == "$0.000000001"
    assert usd(0) == "$0.00"
    assert usd(12_500_000_000) == "$12.50"
    assert usd(1_234_567_000_000_000) == "$1,234,567.00"
    assert usd(-3_000_000) == "-$0.003"
    assert usd(None) == "—"


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
