"""How money is shown to people: one place for every page, the admin and the commands.

Amounts are int nano-USD (1 USD = 10**9). Two styles:
- amounts (wallets, totals, payouts): dollars and cents, "$11.20", cut (never rounded up, so a
  wallet never shows more than it holds); an amount that is not zero but under a cent keeps two
  significant digits ("$0.000037"), so it never reads as "$0.00".
- prices (of one load, one token): three significant digits, "$0.000370".
Nano-USD stay in the API fields named so; nothing here is used to compute money.
"""

from __future__ import annotations

from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal

NANO_PER_USD = Decimal(10**9)
CENT = Decimal("0.01")


def _dollars(amount_nano: int | Decimal) -> Decimal:
    return Decimal(amount_nano) / NANO_PER_USD


def _significant(value: Decimal, digits: int) -> Decimal:
    """``value`` rounded to ``digits`` significant digits (value != 0)."""
    exponent = value.adjusted() - digits + 1
    return value.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_HALF_EVEN)


def _text(sign: str, value: Decimal, *, min_decimals: int = 2) -> str:
    text = format(value, "f")
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0").ljust(min_decimals, "0")
    return f"{sign}${int(whole):,}.{frac}" if frac else f"{sign}${int(whole):,}"


def usd_amount(amount_nano: int | None) -> str:
    """Dollars and cents: 11_200_118_336 -> "$11.20"; 19_999_592_200 -> "$19.99";
    37_740 -> "$0.000038"; 0 -> "$0.00"."""
    if amount_nano is None or amount_nano == "":
        return "—"
    value = _dollars(int(amount_nano))
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value == 0 or value >= CENT:
        return _text(sign, value.quantize(CENT, rounding=ROUND_DOWN))
    return _text(sign, _significant(value, 2))


def usd_price(amount_nano: int | Decimal | None, digits: int = 3) -> str:
    """A unit price with ``digits`` significant digits: 369_800 -> "$0.00037";
    1_234_567_890 -> "$1.23"; at least the cents are shown."""
    if amount_nano is None or amount_nano == "":
        return "—"
    value = _dollars(amount_nano)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value == 0:
        return "$0.00"
    if value >= 1:
        return _text(sign, value.quantize(CENT, rounding=ROUND_HALF_EVEN))
    return _text(sign, _significant(value, digits))


def usd_large(amount_usd: float | Decimal) -> str:
    """Large sums in dollars, compact: 1_509_600 -> "$1.51M", 30_374 -> "$30.4k"."""
    value = float(amount_usd)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{sign}${value / scale:.3g}{suffix}"
    if value >= 1 or value == 0:
        return f"{sign}${value:,.2f}"
    return f"{sign}{usd_price(Decimal(str(value)) * NANO_PER_USD)}"
