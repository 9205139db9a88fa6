"""Template filters for the pages: money in nano-USD, token counts, FLOPs, bytes."""

from __future__ import annotations

from decimal import Decimal

from django import template

register = template.Library()

NANO_PER_USD = Decimal(10**9)


@register.filter
def usd(amount_nano: int | None) -> str:
    """nano-USD as dollars with enough decimals: 37740 -> "$0.00003774", 12.5e9 -> "$12.50".

    Exact (no float): at least 2 decimals, at most 9, trailing zeros trimmed beyond the cents.
    """
    if amount_nano is None or amount_nano == "":
        return "—"
    value = Decimal(int(amount_nano)) / NANO_PER_USD
    sign = "-" if value < 0 else ""
    text = f"{abs(value):.9f}".rstrip("0")
    whole, _, frac = text.partition(".")
    frac = frac.ljust(2, "0")
    return f"{sign}${int(whole):,}.{frac}"


def _scaled(value: float, units: list[tuple[float, str]], suffix: str) -> str:
    for scale, prefix in units:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{suffix}"
    return f"{value:.3g} {suffix}"


@register.filter
def flops(value: float | None) -> str:
    """1.23e12 -> "1.23 TFLOP"."""
    if value is None or value == "":
        return "—"
    units = [(1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
    return _scaled(float(value), units, "FLOP")


@register.filter
def nbytes(value: int | None) -> str:
    """1536 -> "1.5 KiB"."""
    if value is None or value == "":
        return "—"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value} B"  # pragma: no cover


@register.filter
def percent(value: float | None, digits: int = 1) -> str:
    if value is None or value == "":
        return "—"
    return f"{float(value) * 100:.{int(digits)}f}%"


@register.filter
def get_item(mapping: dict, key: str):  # noqa: ANN201
    return mapping.get(key) if isinstance(mapping, dict) else None


@register.filter
def sci(value: float | None) -> str:
    """A small float, readable: 0 -> "0", 1.67e-06 -> "1.67e-06", 0.25 -> "0.25"."""
    if value is None or value == "":
        return "—"
    value = float(value)
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e6:
        return f"{value:.3g}" if "e" in f"{value:.3g}" else f"{value:.2e}"
    return f"{value:.4g}"
