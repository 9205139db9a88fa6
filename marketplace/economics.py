"""The economics of one document: re-prefilling it for every agent against reusing its KV.

Pure arithmetic (no database): marketplace.selectors.economics gathers the inputs from this
deployment's measurements and settings; `manage.py economics` feeds assumptions by hand.

Model (all costs in USD):
- compute is priced per second of a GPU: ``gpu_usd_per_hour / 3600``;
- one cold prefill of the document costs ``prefill_seconds`` of it, one load (a reuse: the
  KV read from a tier, then the first token) ``load_seconds``;
- with N agents, re-prefilling costs ``N x prefill``; reusing costs one precompute (a prefill)
  plus ``N x load``; the precompute is paid back after ``ceil(prefill / (prefill - load))`` loads;
- shipping the KV to each agent instead of hosting it costs ``kv_bytes x egress_usd_per_gb``
  per agent (KV barely compresses, so the bytes are the artifact's);
- agents pay the tariff's price per load (cache-read multiplier x input price x tokens, or the
  publisher's price).
Where a timing is not measured, an estimate with its ``source`` saying so is used instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# A hosted load against a cold prefill of the same document, per store tier: the engine's
# measured speed-ups at 3774 tokens on Qwen3-4B (README, bench/results), used only where this
# deployment has no measured load.
ESTIMATED_TIER_SPEEDUP = {"gpu": 25.0, "host": 7.8, "disk": 1.4}
TIER_LABELS = {"gpu": "GPU memory", "host": "host memory", "disk": "local disk",
               "s3": "object storage"}


@dataclass(frozen=True)
class Timing:
    seconds: float
    source: str  # "measured" or "estimate"
    note: str = ""


@dataclass
class Economics:
    n_tokens: int
    # None when the costs are given directly (from_token_price): then a Timing's "seconds"
    # hold dollars.
    gpu_usd_per_hour: float | None
    prefill: Timing
    load: Timing
    tiers: list[dict] = field(default_factory=list)
    kv_bytes: int | None = None
    egress_usd_per_gb: float = 0.0
    price_per_load_usd: float | None = None

    @property
    def usd_per_second(self) -> float:
        return 1.0 if self.gpu_usd_per_hour is None else self.gpu_usd_per_hour / 3600.0

    @property
    def prefill_usd(self) -> float:
        return self.prefill.seconds * self.usd_per_second

    @property
    def load_usd(self) -> float:
        return self.load.seconds * self.usd_per_second

    @property
    def saving(self) -> float | None:
        """How many times cheaper a load is than a cold prefill."""
        return self.prefill_usd / self.load_usd if self.load_usd > 0 else None

    @property
    def break_even_loads(self) -> int | None:
        """Loads after which reuse (precompute + loads) costs no more than re-prefilling."""
        gain = self.prefill_usd - self.load_usd
        if gain <= 0:
            return None
        return max(1, math.ceil(self.prefill_usd / gain - 1e-9))

    @property
    def egress_usd(self) -> float | None:
        """Shipping the KV to one agent instead of hosting it."""
        if self.kv_bytes is None:
            return None
        return self.kv_bytes / 1e9 * self.egress_usd_per_gb

    @property
    def kv_bytes_per_token(self) -> float | None:
        if self.kv_bytes is None or not self.n_tokens:
            return None
        return self.kv_bytes / self.n_tokens

    def prefill_total(self, agents: int) -> float:
        return agents * self.prefill_usd

    def reuse_total(self, agents: int) -> float:
        return self.prefill_usd + agents * self.load_usd

    def egress_total(self, agents: int) -> float | None:
        egress = self.egress_usd
        return None if egress is None else self.prefill_usd + agents * egress

    def as_dict(self, *, agents: int | None = None) -> dict:
        out = {
            "n_tokens": self.n_tokens,
            "gpu_usd_per_hour": self.gpu_usd_per_hour,
            "prefill": asdict(self.prefill),
            "load": asdict(self.load),
            "tiers": self.tiers,
            "prefill_usd": self.prefill_usd,
            "load_usd": self.load_usd,
            "saving": self.saving,
            "break_even_loads": self.break_even_loads,
            "kv_bytes": self.kv_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "egress_usd_per_gb": self.egress_usd_per_gb,
            "egress_usd_per_load": self.egress_usd,
            "egress_vs_prefill": (
                self.egress_usd / self.prefill_usd
                if self.egress_usd is not None and self.prefill_usd > 0 else None
            ),
            "price_per_load_usd": self.price_per_load_usd,
        }
        if agents is not None:
            out["agents"] = agents
            out["prefill_total_usd"] = self.prefill_total(agents)
            out["reuse_total_usd"] = self.reuse_total(agents)
            out["egress_total_usd"] = self.egress_total(agents)
            if self.price_per_load_usd is not None:
                out["agents_pay_usd"] = agents * self.price_per_load_usd
        return out


def tier_timings(prefill_seconds: float, measured: dict[str, float]) -> list[dict]:
    """One row per store tier: the measured load time where there is one, else the estimate."""
    rows = []
    for tier in [*ESTIMATED_TIER_SPEEDUP, *sorted(set(measured) - set(ESTIMATED_TIER_SPEEDUP))]:
        if tier in measured:
            seconds, source = measured[tier], "measured"
        else:
            seconds, source = prefill_seconds / ESTIMATED_TIER_SPEEDUP[tier], "estimate"
        rows.append({
            "tier": tier, "label": TIER_LABELS.get(tier, tier), "seconds": seconds,
            "source": source,
            "saving": prefill_seconds / seconds if seconds > 0 else None,
        })
    return rows


# --- the cost-vs-agents plot (inline SVG, server-rendered) ----------------------------------

PLOT_W, PLOT_H, PAD_L, PAD_R, PAD_T, PAD_B = 640, 300, 84, 30, 16, 44


def _log_ticks(lo: float, hi: float) -> list[float]:
    return [10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]


def cost_plot(econ: Economics, *, max_agents: int = 10**8) -> dict:
    """Geometry of a log-log plot: total cost against the number of agents, for re-prefilling,
    for reuse (one precompute + loads) and, where the KV size is known, for shipping it."""
    agents = [10**k for k in range(0, int(math.log10(max_agents)) + 1)]
    series = {"prefill": [econ.prefill_total(n) for n in agents],
              "reuse": [econ.reuse_total(n) for n in agents]}
    if econ.egress_usd is not None and econ.egress_usd > 0:
        series["egress"] = [econ.egress_total(n) for n in agents]
    values = [v for ys in series.values() for v in ys if v > 0]
    if not values:
        return {}
    y_lo, y_hi = min(values), max(values)
    y_ticks = _log_ticks(y_lo, y_hi)
    y0, y1 = math.log10(y_ticks[0]), math.log10(y_ticks[-1])
    x0, x1 = 0.0, math.log10(agents[-1])
    plot_w, plot_h = PLOT_W - PAD_L - PAD_R, PLOT_H - PAD_T - PAD_B

    def px(n: float) -> float:
        return round(PAD_L + plot_w * (math.log10(n) - x0) / (x1 - x0), 2)

    def py(v: float) -> float:
        return round(PAD_T + plot_h - plot_h * (math.log10(v) - y0) / max(y1 - y0, 1e-9), 2)

    lines = {
        name: " ".join(f"{px(n)},{py(v)}" for n, v in zip(agents, ys, strict=True) if v > 0)
        for name, ys in series.items()
    }
    step = max(1, len(y_ticks) // 6)
    return {
        "width": PLOT_W, "height": PLOT_H, "lines": lines,
        "x_ticks": [{"x": px(n), "label": _count_label(n)} for n in agents[::2]],
        "y_ticks": [{"y": py(v), "label": _usd_label(v)} for v in y_ticks[::step]],
        "axis_x0": PAD_L, "axis_x1": PLOT_W - PAD_R, "axis_y0": PAD_T, "axis_y1": PAD_T + plot_h,
        "label_y": PLOT_H - PAD_B + 18, "x_title_y": PLOT_H - 6, "y_label_x": PAD_L - 6,
        "end": {name: {"x": px(agents[-1]), "y": py(ys[-1]), "usd": ys[-1]}
                for name, ys in series.items()},
        "max_agents": agents[-1],
    }


def _count_label(n: int) -> str:
    for scale, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if n >= scale:
            return f"{n // scale}{suffix}"
    return str(n)


def _usd_label(v: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"${v / scale:g}{suffix}"
    return f"${v:g}"


# --- the paper's headline, reproduced from its assumptions ----------------------------------

PAPER = {
    "n_tokens": 3774,  # the hot document
    "agents": 80_000_000,
    "saving": 49.7,  # measured reuse saving on Qwen3-4B
    "tariff": 0.1,  # cache-read multiplier APIs charge
    # Re-prefill priced at $5 per 1M input tokens: the price the paper's $1.5M implies
    # ($1.5M / (80M x 3774 tokens) = $4.97 per 1M).
    "prefill_usd_per_mtok": 5.0,
    # Qwen3-4B's KV in bf16: 36 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes (~0.15 MB).
    "kv_bytes_per_token": 147_456,
}


def from_token_price(
    *, n_tokens: int, prefill_usd_per_mtok: float, saving: float, tariff: float | None = None,
    kv_bytes_per_token: float | None = None, egress_usd_per_gb: float = 0.0,
) -> Economics:
    """Economics from a price per prefill token and a saving ratio (no timings): a GPU-hour
    is not involved: the timings carry dollars and the ratios are those given."""
    prefill_usd = n_tokens * prefill_usd_per_mtok / 1e6
    return Economics(
        n_tokens=n_tokens, gpu_usd_per_hour=None,
        prefill=Timing(prefill_usd, "assumption", f"${prefill_usd_per_mtok:g} per 1M tokens"),
        load=Timing(prefill_usd / saving, "assumption", f"{saving:g}x less than prefill"),
        kv_bytes=int(kv_bytes_per_token * n_tokens) if kv_bytes_per_token else None,
        egress_usd_per_gb=egress_usd_per_gb,
        price_per_load_usd=prefill_usd * tariff if tariff is not None else None,
    )
