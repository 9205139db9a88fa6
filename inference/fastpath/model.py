"""A lean forward pass for Qwen3/Llama-family decoders that continues from a shared prefix KV.

Why not transformers' forward: reuse is bounded by reading the weights once per step, and the
generic path adds a materialised mask, GQA heads repeated in memory, a growing cache that copies
the prefix, and hundreds of small Python-level ops. Here attention is split in two segments:

* the prefix (the hosted document KV, read-only, shared by every request and batch row): one
  mask-free attention call per key chunk, grouped query heads folded into the query axis so KV
  heads are never repeated, returning the log-sum-exp of each row;
* the suffix (each row's own tokens, in a small per-request buffer): causal attention with
  per-row lengths, also returning its log-sum-exp.

The two partial results are merged exactly with their log-sum-exps (the cascade/flash-decoding
identity), so no prefix tensor is ever copied or mutated and a batch of agents shares one prefix.
All shapes are static for a given (prefix length, batch, query length), so the whole step can be
captured in a CUDA graph (runner.py).

Two implementations of the same step: plain torch ops (any device; the reference) and, on CUDA
with Triton, fused kernels (kernels.py). Both round where transformers rounds and take the rotary
frequencies from the model's own buffer, so reuse tracks the plain forward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from inference.errors import UnsupportedArchitecture

SUPPORTED_MODEL_TYPES = ("qwen3", "llama", "mistral", "qwen2")


def _flash_takes_grouped_heads() -> bool:
    """Whether this build's flash kernel accepts fewer K/V heads than query heads."""
    if not torch.cuda.is_available():
        return False
    try:
        q = torch.zeros(1, 4, 16, 64, device="cuda", dtype=torch.bfloat16)
        kv = torch.zeros(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
        torch.ops.aten._scaled_dot_product_flash_attention(q, kv, kv, 0.0, True, False)
        return True
    except RuntimeError:
        return False


NATIVE_GQA_FLASH = _flash_takes_grouped_heads()


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q_dim + 2 * kv_dim, hidden], q, k and v projections fused
    qkv_bias: torch.Tensor | None
    qk_norm: torch.Tensor | None  # [Hq + Hkv, D]: Qwen3 normalises q and k per head
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    # [2 * intermediate, hidden]: gate then up rows; with the kernels, interleaved in groups of
    # FastDecoder.silu_group rows (kernels.interleave_gate_up)
    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass
class PrefixKV:
    """The hosted document's KV: per layer (keys, values), each [kv_heads, n_tokens, head_dim]."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    # Its PrefixTable rows, per anchor: built once, in pinned memory, so binding a table on the
    # GPU is one asynchronous copy (a copy from pageable memory would wait for the stream).
    table_rows: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_tokens(self) -> int:
        return int(self.layers[0][0].shape[1]) if self.layers else 0


class PrefixTable:
    """Where a prefix's K/V live, as device data: per layer the offsets of its keys and values
    from an anchor tensor, their strides, and the prefix's length. The kernels read the prefix
    through it, so a CUDA graph captured once serves every prefix of up to `capacity` tokens
    (bind() before a replay). The torch-ops step takes a PrefixKV instead."""

    FIELDS = 6  # keys offset, values offset, keys head/token strides, values head/token

    def __init__(
        self, n_layers: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.capacity = capacity
        self.n_layers = n_layers
        self.data = torch.zeros(n_layers * self.FIELDS + 1, dtype=torch.int64, device=device)
        self.entries = self.data[:-1].view(n_layers, self.FIELDS)
        self.n_tokens = self.data[-1:]
        self.anchor = _anchor(device, dtype)

    def bind(self, prefix: PrefixKV) -> None:
        """Point the table at prefix (one small host-to-device copy, ordered on the stream)."""
        n = prefix.n_tokens
        if n > self.capacity:
            raise ValueError(f"a prefix of {n} tokens exceeds the table's {self.capacity}")
        rows = prefix.table_rows.get(self.anchor.data_ptr())
        if rows is None or rows.numel() != self.data.numel():
            rows = self._rows(prefix)
            if self.data.is_cuda:
                rows = rows.pin_memory()
            prefix.table_rows[self.anchor.data_ptr()] = rows
        self.data.copy_(rows, non_blocking=self.data.is_cuda)

    def _rows(self, prefix: PrefixKV) -> torch.Tensor:
        rows = [[0] * self.FIELDS] * self.n_layers
        if prefix.n_tokens:
            if len(prefix.layers) != self.n_layers:
                raise ValueError("the prefix has another number of layers than the model")
            base, size = self.anchor.data_ptr(), self.anchor.element_size()
            rows = []
            for k, v in prefix.layers:
                # The kernels assume (and are told) 16-byte aligned K/V and strides of 8n
                # elements: what lets them load K/V as vectors.
                if k.stride(-1) != 1 or v.stride(-1) != 1:
                    raise ValueError("prefix K/V need contiguous head dimensions")
                if any(t.data_ptr() % 16 or t.stride(0) % 8 or t.stride(1) % 8 for t in (k, v)):
                    raise ValueError("prefix K/V need 16-byte alignment and strides of 8n")
                if k.dtype != self.anchor.dtype or v.dtype != self.anchor.dtype:
                    raise ValueError(f"prefix K/V must be {self.anchor.dtype}")
                rows.append([
                    (k.data_ptr() - base) // size, (v.data_ptr() - base) // size,
                    k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                ])
        flat = [x for row in rows for x in row] + [prefix.n_tokens]
        return torch.tensor(flat, dtype=torch.int64)

    @classmethod
    def of(
        cls, prefix: PrefixKV, n_layers: int, device: torch.device, dtype: torch.dtype
    ) -> PrefixTable:
        """A table sized to one prefix (eager steps)."""
        table = cls(n_layers, prefix_capacity(prefix.n_tokens), device, dtype)
        table.bind(prefix)
        return table


_ANCHORS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _anchor(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One small tensor per device and dtype that prefix offsets are counted from (so a
    prefix's table rows are the same for every table)."""
    key = (torch.device(device), dtype)
    if key not in _ANCHORS:
        _ANCHORS[key] = torch.zeros(8, dtype=dtype, device=device)
    return _ANCHORS[key]


# A layer's weight products, as FastDecoder._product's kind names them.
PRODUCT_KINDS = ("qkv", "o_proj", "gate_up", "down")


def prefix_capacity(n_tokens: int) -> int:
    """The prefix-length class a table (and the graphs reading it) serves: 0, or a power of two
    of at least 64 tokens. The kernels' split of the prefix depends only on the class."""
    return 0 if n_tokens == 0 else max(64, 1 << (n_tokens - 1).bit_length())


class SuffixState:
    """Per-request (or per-batch) KV of the tokens after the prefix, with per-row lengths."""

    def __init__(
        self, decoder: FastDecoder, *, batch: int, capacity: int, device: torch.device
    ) -> None:
        shape = (batch, decoder.n_kv_heads, capacity, decoder.head_dim)
        self.keys = [torch.zeros(shape, dtype=decoder.dtype, device=device) for _ in decoder.layers]
        self.values = [
            torch.zeros(shape, dtype=decoder.dtype, device=device) for _ in decoder.layers
        ]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity
        self.batch = batch

    def reset(self) -> None:
        self.lengths.zero_()


def _stacked_qk_norm(attn: torch.nn.Module, n_heads: int, n_kv_heads: int) -> torch.Tensor | None:
    if getattr(attn, "q_norm", None) is None:
        return None
    q, k = attn.q_norm.weight.detach(), attn.k_norm.weight.detach()
    return torch.cat([q.expand(n_heads, -1), k.expand(n_kv_heads, -1)]).contiguous()


class FastDecoder:
    """Weights of a Hugging Face decoder, rearranged for the split-attention forward."""

    def __init__(self, hf_model: torch.nn.Module, *, kernels: bool | None = None) -> None:
        """kernels: use the fused Triton kernels (default: on CUDA when Triton is installed)."""
        cfg = hf_model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitecture(f"No fast path for model type {cfg.model_type!r}.")
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedArchitecture(f"No fast path for rope type {rope_type!r}.")
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        self.hidden = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.n_heads // self.n_kv_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim**-0.5
        base = hf_model.model
        self.dtype = base.embed_tokens.weight.dtype
        self.device = base.embed_tokens.weight.device
        rotary = getattr(base, "rotary_emb", None)
        if rotary is not None:
            # The model's own frequencies, in whatever dtype its buffer has ended up (a model
            # cast with .to(bfloat16) rotates with bf16-rounded frequencies): reuse must rotate
            # exactly as the plain forward does.
            self.inv_freq = rotary.inv_freq.detach().float()
            self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        else:
            steps = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=self.device)
            self.inv_freq = 1.0 / (theta ** (steps / self.head_dim))
            self.rope_scale = 1.0
        self.embed = base.embed_tokens.weight
        self.final_norm = base.norm.weight
        self.lm_head = hf_model.lm_head.weight
        self.kernels = _kernels_available(self.device) if kernels is None else kernels
        self.intermediate = base.layers[0].mlp.down_proj.weight.shape[1]
        # Gate and up rows alternate in groups of this many (one group: all gate rows, then all
        # up rows); with the kernels, small groups, so the MLP product computes its activation.
        self.silu_group = self.intermediate
        if self.kernels:
            from inference.fastpath.kernels import SILU_GROUP

            if self.intermediate % SILU_GROUP == 0:
                self.silu_group = SILU_GROUP
        self.layers: list[LayerWeights] = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
            self.layers.append(
                LayerWeights(
                    input_norm=layer.input_layernorm.weight,
                    qkv=torch.cat(
                        [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
                    ).detach(),
                    qkv_bias=None if biases[0] is None else torch.cat(biases).detach(),
                    qk_norm=_stacked_qk_norm(attn, self.n_heads, self.n_kv_heads),
                    o_proj=attn.o_proj.weight,
                    post_norm=layer.post_attention_layernorm.weight,
                    gate_up=self._stacked_gate_up(mlp),
                    down=mlp.down_proj.weight,
                )
            )
        self.n_sms = 0
        # Products with at most this many rows use the split-K Triton kernel.
        self.skinny_rows = 64 if self.kernels else 0
        # Programmatic dependent launch (kernels.py says why); KVMARKET_PDL=0 turns it off.
        self.pdl = False
        # With PDL, per product kind: how many columns of its weight rows a block prefetches
        # into L2 before it waits, and whether only the blocks of the first wave do (those that
        # start while the kernel ahead still runs; later ones would only fetch early what
        # their own loads fetch a moment after). The amounts per kind were tuned on the whole
        # step; prefetching the prefix's K/V, or the next product's weights, made it slower
        # (docs/performance.md).
        # KVMARKET_PREFETCH overrides kinds ("gate_up=384:first,down=128").
        self.prefetch: dict[str, tuple[int, bool]] = {
            "qkv": (512, False), "o_proj": (256, False), "gate_up": (384, True),
            "down": (256, False),
        }
        self.prefetch.update(_prefetch_overrides(os.environ.get("KVMARKET_PREFETCH", "")))
        # Per product kind, split-K options for PDL steps other than matmul's defaults.
        # gate/up in k-steps of 64 over 4 stages: a block needs 64 KB of shared memory, not 192,
        # so all 304 of its blocks fit on the chip at once instead of running in 2.3 waves.
        self.product_options: dict[str, dict[str, int]] = {
            "gate_up": {"block_k": 64, "stages": 4},
        }
        # Products of more than 16 rows load their tiles with TMA (on Hopper they then beat
        # cuBLAS's product at a first step's row counts).
        self.tma = False
        if self.kernels:
            from inference.fastpath.kernels import pdl_available, sm_count, tma_available

            self.n_sms = sm_count(self.device)
            # cos and sin of every position the model takes [positions, D], computed once as
            # _rope_tables computes a step's (elementwise: the same values): the rope kernel
            # reads its tokens' rows instead of a step running a chain of small table kernels
            # before its first layer.
            positions = torch.arange(int(cfg.max_position_embeddings), device=self.device)
            self.rope_table = self._rope_tables(positions)
            self.pdl = pdl_available(self.device) and os.environ.get("KVMARKET_PDL", "1") != "0"
            self.tma = tma_available(self.device)

    def _stacked_gate_up(self, mlp: torch.nn.Module) -> torch.Tensor:
        """The MLP's gate and up weights as one [2 * intermediate, hidden] matrix, rows in
        groups of silu_group (built once: a first build only to be interleaved after would
        copy every layer's largest matrix twice at start-up)."""
        gate, up = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()
        if self.silu_group == self.intermediate:
            return torch.cat([gate, up])
        from inference.fastpath.kernels import interleave_gate_up

        return interleave_gate_up(gate, up, self.silu_group)

    # --- pieces ----------------------------------------------------------------------------
    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        # As transformers does it: normalise in float32, round, then multiply by the weight.
        h = F.rms_norm(x, (x.shape[-1],), None, self.eps)
        return h if weight is None else weight * h

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [..., D] in the model dtype for the given absolute positions."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.rope_scale != 1.0:
            return (emb.cos() * self.rope_scale).to(self.dtype), (
                emb.sin() * self.rope_scale
            ).to(self.dtype)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _prefix_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query of every batch row against the shared prefix: no mask, no K/V copy.

        q [B, S, Hq, D]. A KV head's query heads and all batch rows are folded into one query
        axis, so one attention call serves the whole batch with K/V read once.
        Returns out [B, Hkv, G, S, D] and lse [B, Hkv, G, S].
        """
        b, s = q.shape[:2]
        hkv, g, d = self.n_kv_heads, self.group, self.head_dim
        qf = q.view(b, s, hkv, g, d).permute(2, 0, 3, 1, 4).reshape(1, hkv, b * g * s, d)
        out, lse = _attention_with_lse(qf, keys[None], values[None], self.scale)
        out = out.view(hkv, b, g, s, d).permute(1, 0, 2, 3, 4)
        return out, lse.view(hkv, b, g, s).permute(1, 0, 2, 3)

    def _fresh_suffix_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A row's first suffix tokens against themselves: plain causal attention.

        The suffix is short, so repeating its KV heads is cheap; padding sits after each row's
        real tokens, and causality keeps it out of their view.
        """
        b, s = q.shape[:2]
        hkv, g, d = self.n_kv_heads, self.group, self.head_dim
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if not (_uses_flash(q) and NATIVE_GQA_FLASH):
            kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)
        out, lse = _attention_with_lse(qt, kt, vt, self.scale, causal=True)
        return out.view(b, hkv, g, s, d), lse.view(b, hkv, g, s)

    def _suffix_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row against its own suffix buffer [B, Hkv, C, D], masked by bias."""
        b, s = q.shape[:2]
        hkv, g, d = self.n_kv_heads, self.group, self.head_dim
        qf = q.view(b, s, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * s, d)
        # Scores in float32, as flash attention keeps them: bf16 scores lose the softmax.
        scores = torch.matmul(qf.float(), keys.float().transpose(-1, -2))
        scores = scores.mul_(self.scale).add_(bias)
        lse = torch.logsumexp(scores, dim=-1)
        probs = scores.sub_(lse[..., None]).exp_().to(values.dtype)
        out = torch.matmul(probs, values)
        return out.view(b, hkv, g, s, d), lse.view(b, hkv, g, s)

    # --- the step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        prefix: PrefixKV | PrefixTable,
        state: SuffixState,
        n_valid: torch.Tensor | None = None,
        all_logits: bool = False,
        fresh: bool = False,
        layer_ready: list[torch.cuda.Event] | None = None,
    ) -> torch.Tensor:
        """Run input_ids [B, S] after the prefix and the rows' earlier suffix tokens.

        n_valid [B] says how many of each row's S tokens are real (padding follows them); the
        suffix lengths advance by it. fresh=True promises the suffix buffers are empty (the
        first step of a request), which allows plain causal attention over the new tokens.
        Returns the logits of each row's last real token [B, V], or of every position
        [B, S, V] with all_logits. layer_ready holds per-layer events of a prefix still being
        copied in: layer i's attention waits for event i, no earlier.
        """
        b, s = input_ids.shape
        device = input_ids.device
        if n_valid is None:
            n_valid = torch.full((b,), s, dtype=torch.long, device=device)
        if self.kernels:
            if not isinstance(prefix, PrefixTable):
                prefix = PrefixTable.of(prefix, len(self.layers), device, self.dtype)
            return self._forward_kernels(input_ids, prefix, state, n_valid, all_logits, layer_ready)
        if isinstance(prefix, PrefixTable):
            raise TypeError("the torch-ops step reads a PrefixKV, not a PrefixTable")
        start = state.lengths
        q_pos = start[:, None] + torch.arange(s, device=device)[None, :]
        cos, sin = self._rope_tables(q_pos + prefix.n_tokens)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        rows = torch.arange(b, device=device)[:, None]
        write = q_pos.clamp(max=state.capacity - 1)
        bias = None
        if not fresh:
            k_idx = torch.arange(state.capacity, device=device)
            visible = (k_idx[None, None, :] <= q_pos[:, :, None]) & (
                k_idx[None, None, :] < (start + n_valid)[:, None, None]
            )
            bias = torch.zeros(visible.shape, device=device).masked_fill_(~visible, float("-inf"))
            bias = bias.repeat(1, self.group, 1)[:, None]  # query rows are (group, S) ordered
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim

        x = F.embedding(input_ids, self.embed)
        for i, w in enumerate(self.layers):
            h = self._rms_norm(x, w.input_norm)
            qkv = F.linear(h, w.qkv, w.qkv_bias).view(b, s, hq + 2 * hkv, d)
            qk, v = qkv[:, :, : hq + hkv], qkv[:, :, hq + hkv :]
            if w.qk_norm is not None:
                qk = self._rms_norm(qk, None) * w.qk_norm
            qk = self._rope(qk, cos, sin)
            q, k = qk[:, :, :hq], qk[:, :, hq:]
            # Padding may write past a row's end; it is masked and later overwritten.
            if fresh:  # empty buffers: the new tokens go to the front, a plain slice copy
                state.keys[i][:, :, :s].copy_(k.transpose(1, 2))
                state.values[i][:, :, :s].copy_(v.transpose(1, 2))
            else:
                state.keys[i][rows, :, write] = k
                state.values[i][rows, :, write] = v
            if fresh:
                out, lse = self._fresh_suffix_attention(q, k, v)
            else:
                out, lse = self._suffix_attention(q, state.keys[i], state.values[i], bias)
            if prefix.n_tokens:
                keys, values = prefix.layers[i]
                if layer_ready is not None:
                    torch.cuda.current_stream().wait_event(layer_ready[i])
                out_p, lse_p = self._prefix_attention(q, keys, values)
                out = _merge(out_p, lse_p, out, lse)
            out = out.to(x.dtype).permute(0, 3, 1, 2, 4).reshape(b, s, hq * d)
            x = x + F.linear(out, w.o_proj)
            h = self._rms_norm(x, w.post_norm)
            gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.down)
        state.lengths.add_(n_valid)
        return self._logits(x, n_valid, all_logits)

    def _logits(self, x: torch.Tensor, n_valid: torch.Tensor, all_logits: bool) -> torch.Tensor:
        if not all_logits:
            x = x[torch.arange(x.shape[0], device=x.device), n_valid - 1]
        return F.linear(self._rms_norm(x, self.final_norm), self.lm_head)

    def _forward_kernels(
        self,
        input_ids: torch.Tensor,
        prefix: PrefixTable,
        state: SuffixState,
        n_valid: torch.Tensor,
        all_logits: bool,
        layer_ready: list[torch.cuda.Event] | None,
    ) -> torch.Tensor:
        """The same step with the fused Triton kernels: tokens flattened to rows [B*S, ...]."""
        from inference.fastpath import kernels

        b, s = input_ids.shape
        start = state.lengths
        cos, sin = self.rope_table
        pdl = self._pdl(b * s)
        delta = None  # the last layer's MLP output, added to the residual by the next norm
        for i, w in enumerate(self.layers):
            if i == 0:
                x, h = kernels.embed_rms_norm(
                    input_ids.reshape(-1), self.embed, w.input_norm, self.eps, pdl=pdl
                )
            else:
                h = kernels.add_rms_norm(x, delta, w.input_norm, self.eps, pdl=pdl)
            q = kernels.qk_norm_rope_store(
                self._product(h, w.qkv, w.qkv_bias, kind="qkv"),
                w.qk_norm,
                cos,
                sin,
                keys=state.keys[i],
                values=state.values[i],
                start=start,
                n_prefix=prefix.n_tokens,
                seq_len=s,
                n_heads=self.n_heads,
                n_kv_heads=self.n_kv_heads,
                eps=self.eps,
                pdl=pdl,
            )
            out = kernels.attention(
                q,
                prefix if prefix.capacity else None,
                state.keys[i],
                state.values[i],
                start=start,
                n_valid=n_valid,
                seq_len=s,
                n_heads=self.n_heads,
                scale=self.scale,
                n_sms=self.n_sms,
                layer=i,
                wait=None if layer_ready is None else layer_ready[i],
                pdl=pdl,
            )
            h = kernels.add_rms_norm(
                x, self._product(out, w.o_proj, kind="o_proj"), w.post_norm, self.eps, pdl=pdl
            )
            act = self._product(h, w.gate_up, silu=True, kind="gate_up")
            delta = self._product(act, w.down, kind="down")
        if all_logits:
            h = kernels.add_rms_norm(x, delta, self.final_norm, self.eps, pdl=pdl).view(b, s, -1)
            state.lengths.add_(n_valid)
        else:  # the last valid token's row only, and the lengths advanced, in one kernel
            h = kernels.last_rows_rms_norm(
                x, delta, self.final_norm, self.eps, n_valid=n_valid, seq_len=s,
                lengths=state.lengths, pdl=pdl,
            )
        return F.linear(h, self.lm_head)

    def _pdl(self, rows: int) -> bool:
        """PDL for steps of many tokens only: on decode steps (a few rows, products split over
        two waves of blocks) the step was slower with it."""
        from inference.fastpath.kernels import DECODE_ROWS

        return self.pdl and rows > DECODE_ROWS

    def _product(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        silu: bool = False,
        kind: str,
    ) -> torch.Tensor:
        """x @ weight.T as [parts, rows, N]: split-K Triton partials for a few rows (weight
        streaming), one cuBLAS product for more rows or with a bias. With PDL every product
        of a few rows is a Triton one: a cuBLAS kernel would break the chain of early launches.
        silu (the MLP's gate/up weight): returns the activation silu(gate) * up [rows, I].
        kind: which of the layer's products (its prefetch under PDL)."""
        from inference.fastpath import kernels

        rows = x.shape[0]
        pdl = self._pdl(rows)
        if (
            bias is None
            and rows <= self.skinny_rows
            and (pdl or kernels.use_split_k(rows, weight.shape[0], self.n_sms))
        ):
            prefetch_k, first_wave = self.prefetch[kind] if pdl else (0, False)
            return kernels.matmul(
                x,
                weight,
                self.n_sms,
                **(self.product_options.get(kind, {}) if pdl else {}),
                pdl=pdl,
                prefetch_k=prefetch_k,
                prefetch_programs=self.n_sms if first_wave else 0,
                tma=self.tma and rows > kernels.DECODE_ROWS,
                silu_group=self.silu_group if silu else 0,
            )
        out = F.linear(x, weight, bias)[None]
        return kernels.silu_mul(out, self.dtype, group=self.silu_group, pdl=pdl) if silu else out


def _prefetch_overrides(spec: str) -> dict[str, tuple[int, bool]]:
    """KVMARKET_PREFETCH: "kind=columns" or "kind=columns:first" (the first wave's blocks
    only), comma-separated, for the PRODUCT_KINDS."""
    overrides = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, setting = item.partition("=")
        columns, _, scope = setting.partition(":")
        if kind not in PRODUCT_KINDS or not columns.isdigit() or scope not in ("", "first"):
            raise ValueError(f"KVMARKET_PREFETCH: cannot read {item!r}")
        overrides[kind] = (int(columns), scope == "first")
    return overrides


def _kernels_available(device: torch.device) -> bool:
    """The Triton kernels run on CUDA when Triton is installed; KVMARKET_TRITON=0 turns them off."""
    if device.type != "cuda" or os.environ.get("KVMARKET_TRITON", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _uses_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning (out, log-sum-exp per row in float32).

    Causal means top-left aligned, which is what we want only when queries and keys are the
    same tokens (the fresh suffix).
    """
    if _uses_flash(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )[:2]
        return out, lse
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        n_q, n_k = scores.shape[-2:]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]).to(v.dtype), v), lse


def _merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Combine attention over two disjoint key sets: a's weight is sigmoid(lse_a - lse_b)."""
    weight_a = torch.sigmoid(lse_a - lse_b)[..., None]
    out_b = out_b.float()
    return torch.addcmul(out_b, out_a.float() - out_b, weight_a)
