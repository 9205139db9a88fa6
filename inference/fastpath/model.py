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
captured in a CUDA graph (see graphs.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inference.errors import UnsupportedArchitecture

SUPPORTED_MODEL_TYPES = ("qwen3", "llama", "mistral", "qwen2")


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q_dim + 2 * kv_dim, hidden], q, k and v projections fused
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # Qwen3 normalises q and k per head
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor


@dataclass
class PrefixKV:
    """The hosted document's KV: per layer (keys, values), each [kv_heads, n_tokens, head_dim]."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def n_tokens(self) -> int:
        return int(self.layers[0][0].shape[1]) if self.layers else 0


class SuffixState:
    """Per-request (or per-batch) KV of the tokens after the prefix, with per-row lengths."""

    def __init__(
        self, decoder: FastDecoder, *, batch: int, capacity: int, device: torch.device
    ) -> None:
        shape = (batch, capacity, decoder.n_kv_heads, decoder.head_dim)
        self.keys = [torch.zeros(shape, dtype=decoder.dtype, device=device) for _ in decoder.layers]
        self.values = [
            torch.zeros(shape, dtype=decoder.dtype, device=device) for _ in decoder.layers
        ]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity
        self.batch = batch

    def reset(self) -> None:
        self.lengths.zero_()


class FastDecoder:
    """Weights of a Hugging Face decoder, rearranged for the split-attention forward."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
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
        self.inv_freq = 1.0 / (
            theta
            ** (
                torch.arange(0, self.head_dim, 2, dtype=torch.float, device=self.device)
                / self.head_dim
            )
        )
        self.embed = base.embed_tokens.weight
        self.final_norm = base.norm.weight
        self.lm_head = hf_model.lm_head.weight
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
                    q_norm=getattr(getattr(attn, "q_norm", None), "weight", None),
                    k_norm=getattr(getattr(attn, "k_norm", None), "weight", None),
                    o_proj=attn.o_proj.weight,
                    post_norm=layer.post_attention_layernorm.weight,
                    gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                    down=mlp.down_proj.weight,
                )
            )
        self.intermediate = self.layers[0].down.shape[1]

    # --- pieces ----------------------------------------------------------------------------
    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Same operation order as transformers' RMSNorm, so float32 results agree closely.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x [B, S, H, D]; positions [B, S]
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos().to(x.dtype)[:, :, None, :]
        sin = emb.sin().to(x.dtype)[:, :, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _fold(self, q: torch.Tensor) -> torch.Tensor:
        """[B, S, Hq, D] -> [B, Hkv, G*S, D]: a KV head's query heads become extra rows."""
        b, s = q.shape[:2]
        q = q.view(b, s, self.n_kv_heads, self.group, self.head_dim)
        return q.permute(0, 2, 3, 1, 4).reshape(b, self.n_kv_heads, self.group * s, self.head_dim)

    def _unfold(self, o: torch.Tensor, s: int) -> torch.Tensor:
        """[B, Hkv, G*S, D] -> [B, S, Hq*D]."""
        b = o.shape[0]
        o = o.view(b, self.n_kv_heads, self.group, s, self.head_dim).permute(0, 3, 1, 2, 4)
        return o.reshape(b, s, self.n_heads * self.head_dim)

    def _prefix_attention(
        self, qf: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_chunks: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows of all batch members against the shared prefix: no mask, no copy of K/V."""
        b, hkv, rows, d = qf.shape
        # Batch rows join the query axis: one attention call serves the whole batch.
        q = qf.permute(1, 0, 2, 3).reshape(1, hkv, b * rows, d)
        n_tokens = keys.shape[1]
        chunk = math.ceil(n_tokens / n_chunks)
        outs, lses = [], []
        for start in range(0, n_tokens, chunk):
            k = keys[None, :, start : start + chunk]
            v = values[None, :, start : start + chunk]
            out, lse = _attention_with_lse(q, k, v, self.scale)
            outs.append(out)
            lses.append(lse)
        out, lse = _merge(outs, lses)
        out = out.view(hkv, b, rows, d).permute(1, 0, 2, 3)
        lse = lse.view(hkv, b, rows).permute(1, 0, 2)
        return out, lse

    def _suffix_attention(
        self,
        qf: torch.Tensor,
        state: SuffixState,
        layer: int,
        q_pos: torch.Tensor,
        end: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row against its own suffix tokens, causally, over the fixed-size buffer."""
        keys = state.keys[layer].permute(0, 2, 1, 3)  # [B, Hkv, C, D]
        values = state.values[layer].permute(0, 2, 1, 3)
        scores = torch.matmul(qf, keys.transpose(-1, -2)).float() * self.scale
        k_idx = torch.arange(state.capacity, device=qf.device)
        # q_pos [B, S] is each query's index in the suffix; end [B] the row's valid length.
        visible = (k_idx[None, None, :] <= q_pos[:, :, None]) & (
            k_idx[None, None, :] < end[:, None, None]
        )
        visible = visible.repeat(1, self.group, 1)[:, None]  # rows are (group, S) ordered
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None]).to(values.dtype)
        return torch.matmul(probs, values), lse

    # --- the step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        prefix: PrefixKV,
        state: SuffixState,
        n_valid: torch.Tensor | None = None,
        all_logits: bool = False,
        prefix_chunks: int | None = None,
        layer_ready: list[torch.cuda.Event] | None = None,
    ) -> torch.Tensor:
        """Run input_ids [B, S] after the prefix and the rows' earlier suffix tokens.

        n_valid [B] says how many of each row's S tokens are real (the rest is padding); the
        suffix lengths advance by it. Returns the logits of each row's last real token [B, V],
        or of every position [B, S, V] with all_logits. layer_ready holds per-layer events of
        a prefix still being copied in: layer i's attention waits for event i, no earlier.
        """
        b, s = input_ids.shape
        if n_valid is None:
            n_valid = torch.full((b,), s, dtype=torch.long, device=input_ids.device)
        start = state.lengths
        q_pos = start[:, None] + torch.arange(s, device=input_ids.device)[None, :]
        end = start + n_valid
        positions = q_pos + prefix.n_tokens
        rows = torch.arange(b, device=input_ids.device)[:, None]
        if prefix_chunks is None:
            prefix_chunks = prefix_chunk_count(prefix.n_tokens, b * s * self.group, self.n_kv_heads)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim

        x = F.embedding(input_ids, self.embed)
        for i, w in enumerate(self.layers):
            h = self._rms_norm(x, w.input_norm)
            qkv = F.linear(h, w.qkv, w.qkv_bias)
            q = qkv[..., :q_dim].view(b, s, self.n_heads, self.head_dim)
            k = qkv[..., q_dim : q_dim + kv_dim].view(b, s, self.n_kv_heads, self.head_dim)
            v = qkv[..., q_dim + kv_dim :].view(b, s, self.n_kv_heads, self.head_dim)
            if w.q_norm is not None:
                q = self._rms_norm(q, w.q_norm)
                k = self._rms_norm(k, w.k_norm)
            q = self._rope(q, positions)
            k = self._rope(k, positions)
            # Padding rows may write past a row's end; they are masked and later overwritten.
            write = q_pos.clamp(max=state.capacity - 1)
            state.keys[i].index_put_((rows, write), k)
            state.values[i].index_put_((rows, write), v)
            qf = self._fold(q)
            out_s, lse_s = self._suffix_attention(qf, state, i, q_pos, end)
            if prefix.n_tokens:
                keys, values = prefix.layers[i]
                if layer_ready is not None:
                    torch.cuda.current_stream().wait_event(layer_ready[i])
                out_p, lse_p = self._prefix_attention(qf, keys, values, prefix_chunks)
                out, _ = _merge([out_p, out_s], [lse_p, lse_s])
            else:
                out = out_s
            x = x + F.linear(self._unfold(out.to(x.dtype), s), w.o_proj)
            h = self._rms_norm(x, w.post_norm)
            gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.down)
        state.lengths.add_(n_valid)
        if not all_logits:
            x = x[torch.arange(b, device=x.device), n_valid - 1]
        return F.linear(self._rms_norm(x, self.final_norm), self.lm_head)


def prefix_chunk_count(n_tokens: int, rows_per_kv_head: int, n_kv_heads: int) -> int:
    """Split long prefixes along the key axis (flash-decoding) so enough blocks run at once.

    Flash attention parallelises over (query blocks x heads); a single request has few query
    rows, so without a split only a handful of SMs would read a 32k-token prefix.
    """
    if n_tokens == 0:
        return 1
    blocks = max(1, math.ceil(rows_per_kv_head / 128)) * n_kv_heads
    wanted = max(1, 264 // blocks)  # about two blocks per SM on an H100
    return max(1, min(wanted, n_tokens // 512 or 1))


def _attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention without a mask, returning (out, log-sum-exp per row in float32)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale
        )[:2]
        return out, lse
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]).to(v.dtype), v), lse


def _merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key sets: weights are exp(lse_i - lse_total)."""
    if len(outs) == 1:
        return outs[0], lses[0]
    lse = torch.stack(lses)
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total)[..., None]
    out = (torch.stack(outs).float() * weights).sum(dim=0)
    return out.to(outs[0].dtype), total
