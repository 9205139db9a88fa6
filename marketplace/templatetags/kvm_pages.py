"""Template filters for the pages: money (through ledger.money), token counts, FLOPs, bytes."""

from __future__ import annotations

from decimal import Decimal

from django import template

from ledger.money import usd_amount, usd_large, usd_price

register = template.Library()


@register.filter
def usd(amount_nano: int | None) -> str:
    """An amount (wallet, total, payout) in dollars and cents: see ledger.money.usd_amount."""
    return usd_amount(amount_nano)


@register.filter
def price(amount_nano: int | None) -> str:
    """A unit price (one load) with three significant digits: see ledger.money.usd_price."""
    return usd_price(amount_nano)


@register.filter
def price_per_1k(amount_nano: int | None) -> str:
    """The price of 1,000 units at ``amount_nano`` each, in dollars and cents."""
    if amount_nano is None or amount_nano == "":
        return "—"
    return usd_price(int(amount_nano) * 1000)


@register.filter
def price_per_mtok(amount_nano: int | None, n_tokens: int | None) -> str:
    """A load's price per 1M document tokens: what it costs to read a million cached tokens."""
    if amount_nano is None or amount_nano == "" or not n_tokens:
        return "—"
    return usd_price(Decimal(int(amount_nano)) * 1_000_000 / int(n_tokens))


@register.filter
def big_usd(amount_usd: float | None) -> str:
    """Large dollar sums, compact: $1.51M."""
    if amount_usd is None or amount_usd == "":
        return "—"
    return usd_large(amount_usd)


@register.filter
def mul(value: int | None, factor: int) -> int | None:
    if value is None or value == "":
        return None
    return int(value) * int(factor)


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
def get_item(mapping: dict, key: str):
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


@register.filter
def json_str(value: str) -> str:
    """A string as a JSON literal (also a valid Python literal), for code snippets."""
    import json

    return json.dumps(str(value), ensure_ascii=False)


@register.filter
def shell_sq(value: str) -> str:
    """Text to put inside a single-quoted shell string: each ' becomes '\\''."""
    return str(value).replace("'", "'\\''")
