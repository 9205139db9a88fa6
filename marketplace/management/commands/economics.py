"""manage.py economics: what re-prefilling a document for N agents costs against reusing its KV.

Either a document of this deployment (``--document ID``: its measured timings and the
settings' prices) or assumptions given as flags; ``--paper`` loads the source paper's
(a 3774-token document, 80M agents, Qwen3-4B's measured 49.7x saving, the 0.1x cache-read
tariff, re-prefill at $5 per 1M input tokens) and reproduces its headline: about $1.5M to
re-prefill against about $0.03M of reuse compute. Prints JSON (``--json``) or a summary.

Prefill cost, in order of precedence: ``--prefill-usd-per-mtok``; else ``--gpu-usd-per-hour``
x (``--prefill-seconds``, or tokens / ``--prefill-tokens-per-second``) / 3600. Load cost:
``--load-seconds`` (with a GPU price) or prefill cost / ``--saving``.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from ledger.money import usd_large
from marketplace.economics import PAPER, Economics, Timing, from_token_price


class Command(BaseCommand):
    help = "Cost of re-prefilling a document for N agents against reusing its hosted KV."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--document", type=int, help="a document of this deployment")
        parser.add_argument("--paper", action="store_true",
                            help="the source paper's assumptions (flags given override them)")
        parser.add_argument("--tokens", type=int, help="document length in tokens")
        parser.add_argument("--agents", type=int, help="agents that read the document")
        parser.add_argument("--saving", type=float, help="how many times cheaper a load is")
        parser.add_argument("--tariff", type=float, help="cache-read multiplier agents pay")
        parser.add_argument("--prefill-usd-per-mtok", type=float,
                            help="cost of prefill per 1M tokens")
        parser.add_argument("--gpu-usd-per-hour", type=float, help="cost of compute")
        parser.add_argument("--prefill-seconds", type=float, help="one cold prefill")
        parser.add_argument("--prefill-tokens-per-second", type=float, help="prefill speed")
        parser.add_argument("--load-seconds", type=float, help="one load (reuse)")
        parser.add_argument("--kv-bytes-per-token", type=float,
                            help="KV size per token (egress of shipping it)")
        parser.add_argument("--egress-usd-per-gb", type=float, help="egress price")
        parser.add_argument("--json", action="store_true", help="print JSON only")

    def handle(self, *args, **opts) -> None:
        if opts["document"] is not None:
            econ = self._document(opts)
            agents = opts["agents"] or 1000
        else:
            if opts["paper"]:
                for name, value in PAPER.items():
                    key = "tokens" if name == "n_tokens" else name
                    if opts.get(key) is None:
                        opts[key] = value
            econ = self._assumed(opts)
            agents = opts["agents"] or 1000
        result = econ.as_dict(agents=agents)
        if opts["json"]:
            self.stdout.write(json.dumps(result, indent=2))
            return
        self._summary(econ, agents)
        self.stdout.write(json.dumps(result, indent=2))

    def _document(self, opts: dict) -> Economics:
        from django.conf import settings

        from marketplace.models import Document
        from marketplace.selectors.economics import document_economics

        document = Document.objects.filter(pk=opts["document"]).first()
        if document is None:
            raise CommandError(f"No document {opts['document']}.")
        econ = document_economics(document)
        if econ is None:
            raise CommandError(f"Document {document.pk} is not prefilled yet (no token count).")
        if opts["gpu_usd_per_hour"] is not None:
            econ.gpu_usd_per_hour = opts["gpu_usd_per_hour"]
        econ.egress_usd_per_gb = (
            opts["egress_usd_per_gb"] if opts["egress_usd_per_gb"] is not None
            else settings.EGRESS_USD_PER_GB
        )
        return econ

    def _assumed(self, opts: dict) -> Economics:
        tokens = opts["tokens"]
        if not tokens or tokens < 1:
            raise CommandError("Give --tokens (or --paper, or --document).")
        egress = opts["egress_usd_per_gb"] if opts["egress_usd_per_gb"] is not None else 0.09
        if opts["prefill_usd_per_mtok"] is not None:
            if not opts["saving"]:
                raise CommandError("With --prefill-usd-per-mtok, give --saving.")
            return from_token_price(
                n_tokens=tokens, prefill_usd_per_mtok=opts["prefill_usd_per_mtok"],
                saving=opts["saving"], tariff=opts["tariff"],
                kv_bytes_per_token=opts["kv_bytes_per_token"], egress_usd_per_gb=egress,
            )
        gpu = opts["gpu_usd_per_hour"]
        if gpu is None:
            raise CommandError("Give --prefill-usd-per-mtok, or --gpu-usd-per-hour with "
                               "--prefill-seconds or --prefill-tokens-per-second.")
        if opts["prefill_seconds"] is not None:
            prefill = Timing(opts["prefill_seconds"], "assumption")
        elif opts["prefill_tokens_per_second"]:
            prefill = Timing(tokens / opts["prefill_tokens_per_second"], "assumption",
                             f"{opts['prefill_tokens_per_second']:g} tokens/s")
        else:
            raise CommandError("Give --prefill-seconds or --prefill-tokens-per-second.")
        if opts["load_seconds"] is not None:
            load = Timing(opts["load_seconds"], "assumption")
        elif opts["saving"]:
            load = Timing(prefill.seconds / opts["saving"], "assumption",
                          f"{opts['saving']:g}x less than prefill")
        else:
            raise CommandError("Give --load-seconds or --saving.")
        econ = Economics(
            n_tokens=tokens, gpu_usd_per_hour=gpu, prefill=prefill, load=load,
            kv_bytes=(int(opts["kv_bytes_per_token"] * tokens)
                      if opts["kv_bytes_per_token"] else None),
            egress_usd_per_gb=egress,
        )
        if opts["tariff"] is not None:
            econ.price_per_load_usd = econ.prefill_usd * opts["tariff"]
        return econ

    def _summary(self, econ: Economics, agents: int) -> None:
        out = self.stdout.write
        out(f"{econ.n_tokens:,}-token document, {agents:,} agents")
        out(f"  re-prefill for every agent: {usd_large(econ.prefill_total(agents))}"
            f" ({usd_large(econ.prefill_usd)} each; {econ.prefill.source})")
        out(f"  reuse (one precompute + loads): {usd_large(econ.reuse_total(agents))}"
            f" ({usd_large(econ.load_usd)} a load; {econ.load.source})")
        if econ.saving:
            out(f"  saving: {econ.saving:.3g}x; the precompute is paid back after "
                f"{econ.break_even_loads} load(s)")
        if econ.egress_usd is not None:
            out(f"  shipping the KV instead: {usd_large(econ.egress_usd)} of egress per agent "
                f"({econ.egress_usd / econ.prefill_usd:.3g}x the prefill it saves)")
        if econ.price_per_load_usd is not None:
            out(f"  agents pay: {usd_large(agents * econ.price_per_load_usd)}"
                f" ({usd_large(econ.price_per_load_usd)} a load)")
