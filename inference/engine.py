"""Precompute, reuse (generate), cold generation and verification.

Invariant that makes reuse token-exact: the cached prefix is the document rendered as the
system turn of the chat template, which ends on a special token (+ the template's newline), so
tokenising a whole conversation equals the cached ids followed by the suffix ids.
"""

from __future__ import annotations

import copy
import gc
import inspect
import json
import os
import tempfile
import time
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .artifact import (
    ENGINE_VERSION,
    KVArtifact,
    build_manifest,
    check_manifest,
    content_key,
    payload_sha256,
    read_manifest,
    tensor_nbytes,
)
from .errors import (
    ArtifactCorrupted,
    ArtifactTruncated,
    DocumentTooLong,
    InvalidRequest,
    PrecomputeCancelled,
    UnsupportedArchitecture,
    UnsupportedVersion,
)
from .models import LoadedModel
from .store import KVStore

DEFAULT_CHUNK = 512
PLACEHOLDER_DOC = "kvmarket-document-placeholder"
DEFAULT_VERIFY_SUFFIXES = [
    "What is this document about?",
    "Quote the first sentence.",
    "Continue the text.",
]


# -- results ----------------------------------------------------------------------------------
@dataclass
class PrecomputeResult:
    key: str
    n_tokens: int
    seconds: float
    bytes: int
    flops: float
    path: str
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Usage:
    cached_tokens: int
    suffix_tokens: int
    output_tokens: int
    prefill_tokens: int = 0  # tokens actually run through prefill (suffix on reuse, all on cold)


@dataclass
class Timings:
    load_s: float
    ttft_s: float
    total_s: float


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    timings: Timings
    cache_tier: str = ""  # which store tier served the KV ("gpu", "host", "disk", "s3"; "" cold)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerificationReport:
    key: str
    model_id: str
    model_fingerprint: str
    dtype: str
    device: str
    n_tokens: int
    steps: int
    bitwise_equal: bool
    kv_equal: bool
    greedy_matched: int
    greedy_total: int
    match_rate: float
    max_logit_diff: float
    passed: bool
    seconds: float
    cases: list[dict[str, Any]] = field(default_factory=list)
    created_at: str = ""
    engine_version: str = ENGINE_VERSION
    # The serving fast path (inference.fastpath), where it applies to this model and device:
    # the same checks on what agents are actually served. None where it does not apply.
    fast_path_bitwise_equal: bool | None = None
    fast_path_greedy_matched: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- model plumbing ---------------------------------------------------------------------------
_CACHE_KWARG: dict[type, str] = {}


def _cache_kwarg(model: Any) -> str:
    """transformers >= 5.24 names the forward argument ``cache``; older 5.x ``past_key_values``."""
    cls = type(model)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(model.forward).parameters
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[cls]


def new_cache(loaded: LoadedModel) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=loaded.config)


def cache_from_artifact(loaded: LoadedModel, art: KVArtifact) -> Any:
    """A fresh cache holding copies of the stored tensors (update concatenates onto empty)."""
    cache = new_cache(loaded)
    art.wait_ready()
    for i, (k, v) in enumerate(zip(art.keys, art.values, strict=True)):
        cache.update(
            k.unsqueeze(0).to(loaded.device, non_blocking=True),
            v.unsqueeze(0).to(loaded.device, non_blocking=True),
            i,
        )
    return cache


def forward(loaded: LoadedModel, ids: list[int], cache: Any, logits_to_keep: int = 1) -> Any:
    """Run ``ids`` through the model, growing ``cache``; returns logits [len kept, vocab]."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=loaded.device)
    kwargs = {_cache_kwarg(loaded.model): cache}
    out = loaded.model(
        input_ids=input_ids, use_cache=True, logits_to_keep=logits_to_keep, **kwargs
    )
    return out.logits[0]


class _CacheSession:
    """transformers' forward over a growing DynamicCache (CPU, and any model on GPU)."""

    def __init__(self, loaded: LoadedModel, cache: Any) -> None:
        self.loaded = loaded
        self.cache = cache

    def seq_length(self) -> int:
        return self.cache.get_seq_length()

    @torch.no_grad()
    def step(self, ids: list[int]) -> torch.Tensor:
        return forward(self.loaded, ids, self.cache)[-1]

    def greedy_token(self) -> None:
        return None  # the caller takes the argmax of step's logits

    def close(self) -> None:
        pass


# The fast path of each LoadedModel, by id(); an entry goes when its model is collected (a
# new model could otherwise get the same id and its predecessor's runner).
_FAST_REUSE: dict[int, Any] = {}
FAST_PATH_CAPACITY = 1024  # suffix + output tokens a fast-path request may hold


def _fast_reuse(loaded: LoadedModel) -> Any | None:
    """The GPU fast path for this model (inference.fastpath), or None where it does not apply:
    on CPU, for architectures it does not cover, or with KVMARKET_FASTPATH=0.
    KVMARKET_FASTPATH=1 turns it on on CPU too (eager, for tests)."""
    switch = os.environ.get("KVMARKET_FASTPATH", "")
    if switch == "0" or (switch != "1" and not str(loaded.device).startswith("cuda")):
        return None
    if id(loaded) not in _FAST_REUSE:
        from .fastpath.runner import FastReuse

        try:
            _FAST_REUSE[id(loaded)] = FastReuse(loaded.model, capacity=FAST_PATH_CAPACITY)
        except UnsupportedArchitecture:
            _FAST_REUSE[id(loaded)] = None
        weakref.finalize(loaded, _FAST_REUSE.pop, id(loaded), None)
    return _FAST_REUSE[id(loaded)]


def _fast_prefix(loaded: LoadedModel, art: KVArtifact) -> tuple[Any, bool]:
    """The artifact's KV as the fast path's PrefixKV, and whether it is hot in GPU memory.

    A hot artifact keeps one PrefixKV (its CUDA graphs are keyed by that object); any other is
    copied to the model's device for this request.
    """
    kept = art.extras.get("fast_prefix")
    if kept is not None:
        return kept, True
    from .fastpath.model import PrefixKV

    if art.device.type == "cuda":
        layers = list(zip(art.keys, art.values, strict=True))
        prefix = art.extras["fast_prefix"] = PrefixKV(layers)
        return prefix, True
    device = loaded.device
    return PrefixKV([(k.to(device, non_blocking=True), v.to(device, non_blocking=True))
                     for k, v in zip(art.keys, art.values, strict=True)]), False


def _reuse_session(loaded: LoadedModel, art: KVArtifact, feed: list[int], max_tokens: int) -> Any:
    """Fast path on the GPU when it applies (graphs when the KV is already in GPU memory),
    else transformers over a fresh cache that copies the stored tensors."""
    fast = _fast_reuse(loaded)
    if fast is not None and len(feed) + max_tokens <= fast.capacity:
        prefix, hot = _fast_prefix(loaded, art)
        # With the kernels, the captured graphs serve any document (of a length class), so
        # every request runs on them. The torch-ops step's graphs belong to one prefix: they
        # are captured from a hot artifact's second request on, so a one-off load pays none.
        uses = art.extras["fast_uses"] = art.extras.get("fast_uses", 0) + 1
        graphs = None if fast.any_prefix_graphs or (hot and uses > 1) else False
        # A copy to the GPU still in flight (this request promoted the artifact): the first
        # step waits per layer, computing early layers while later ones land.
        ready = art.landing()
        return fast.session(
            prefix, graphs=graphs, max_tokens=len(feed) + max_tokens, layer_ready=ready
        )
    return _CacheSession(loaded, cache_from_artifact(loaded, art))


def prefill(
    loaded: LoadedModel,
    ids: list[int],
    cache: Any,
    *,
    chunk_size: int | None = DEFAULT_CHUNK,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Chunked prefill; returns the last position's logits [vocab]."""
    total = len(ids)
    step = chunk_size or total
    logits = None
    if progress:
        progress(0, total)
    for start in range(0, total, step):
        if should_cancel and should_cancel():
            raise PrecomputeCancelled(f"cancelled after {start} of {total} tokens")
        logits = forward(loaded, ids[start : start + step], cache, logits_to_keep=1)
        if progress:
            progress(min(start + step, total), total)
    assert logits is not None
    return logits[-1]


def estimate_flops(loaded: LoadedModel, n_tokens: int) -> float:
    """Prefill FLOPs: 2 x non-embedding params per token plus causal attention scores/values."""
    cfg = loaded.config.get_text_config(decoder=True)
    attn_width = cfg.num_attention_heads * loaded.head_dim
    dense = 2.0 * loaded.n_params(exclude_embeddings=True) * n_tokens
    attention = 2.0 * loaded.n_layers * n_tokens * n_tokens * attn_width
    return dense + attention


# -- tokenisation -----------------------------------------------------------------------------
def _encode(loaded: LoadedModel, text: str) -> list[int]:
    return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(loaded: LoadedModel, messages: list[dict], *, add_generation_prompt: bool) -> str:
    return loaded.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _require_tokenizer(loaded: LoadedModel) -> None:
    if loaded.tokenizer is None:
        raise InvalidRequest(f"model {loaded.model_id!r} has no tokenizer; pass token ids")


def document_prefix_ids(loaded: LoadedModel, text: str) -> list[int]:
    """Token ids of the document rendered as the system turn of the chat template."""
    _require_tokenizer(loaded)
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest("document text is empty")
    if getattr(loaded.tokenizer, "chat_template", None):
        return _encode(loaded, _render(loaded, [{"role": "system", "content": text}],
                                       add_generation_prompt=False))
    return _encode(loaded, text)


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
            m.get("content"), str
        ):
            raise InvalidRequest("each message needs string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"unknown role {m['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# The placeholder system turn as each tokenizer renders it: the same for every request, and
# rendering a chat template is a large part of a request's host time in the engine thread.
_SYSTEM_HEADS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _system_head(loaded: LoadedModel) -> str:
    head = _SYSTEM_HEADS.get(loaded.tokenizer)
    if head is None:
        head = _render(loaded, [{"role": "system", "content": PLACEHOLDER_DOC}],
                       add_generation_prompt=False)
        _SYSTEM_HEADS[loaded.tokenizer] = head
    return head


def suffix_ids(
    loaded: LoadedModel,
    *,
    messages: list[dict] | None = None,
    prompt: str | None = None,
    prompt_ids: list[int] | None = None,
) -> list[int]:
    """Token ids that follow the cached document for a chat, raw prompt or raw ids request."""
    if (messages is not None) + (prompt is not None) + (prompt_ids is not None) != 1:
        raise InvalidRequest("pass exactly one of messages or prompt")
    if prompt_ids is not None:
        return list(map(int, prompt_ids))
    _require_tokenizer(loaded)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidRequest("prompt must be a string")
        return _encode(loaded, prompt)
    msgs = _check_messages(messages)
    system = [{"role": "system", "content": PLACEHOLDER_DOC}]
    head = _system_head(loaded)
    full = _render(loaded, system + msgs, add_generation_prompt=True)
    if not full.startswith(head):
        raise InvalidRequest("the chat template does not render the system turn as a prefix")
    return _encode(loaded, full[len(head) :])


def conversation_ids(
    loaded: LoadedModel, text: str, *, messages: list[dict] | None, prompt: str | None
) -> list[int]:
    """The whole request tokenised at once, as a server without a KV cache would."""
    if messages is not None:
        msgs = _check_messages(messages)
        full = _render(
            loaded, [{"role": "system", "content": text}] + msgs, add_generation_prompt=True
        )
        return _encode(loaded, full)
    return document_prefix_ids(loaded, text) + suffix_ids(loaded, prompt=prompt)


# -- precompute -------------------------------------------------------------------------------
def precompute(
    loaded: LoadedModel,
    text: str,
    *,
    store: KVStore,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> PrecomputeResult:
    """Prefill the document once and write its KV artifact (idempotent by content)."""
    ids = document_prefix_ids(loaded, text)
    return precompute_ids(
        loaded, ids, store=store, progress=progress, should_cancel=should_cancel,
        chunk_size=chunk_size,
    )


@torch.no_grad()
def precompute_ids(
    loaded: LoadedModel,
    ids: list[int],
    *,
    store: KVStore,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> PrecomputeResult:
    """precompute() for an already tokenised prefix (random-weight benches have no tokenizer)."""
    if not ids:
        raise InvalidRequest("empty document")
    if chunk_size is None or chunk_size < 1:
        raise InvalidRequest("chunk_size must be a positive integer")
    if len(ids) >= loaded.max_context:
        raise DocumentTooLong(
            f"document is {len(ids)} tokens; model {loaded.model_id!r} has a "
            f"{loaded.max_context}-token context",
            n_tokens=len(ids),
            max_context=loaded.max_context,
        )
    key = content_key(loaded.fingerprint, loaded.tokenizer_fingerprint, loaded.dtype, ids)
    path = store.path(key)
    flops = estimate_flops(loaded, len(ids))
    if store.contains(key) and _existing_is_readable(path, loaded):
        if progress:
            progress(len(ids), len(ids))
        size = path.stat().st_size if path.exists() else 0
        return PrecomputeResult(key, len(ids), 0.0, size, flops, str(path), True)
    t0 = time.perf_counter()
    cache = new_cache(loaded)
    prefill(loaded, ids, cache, chunk_size=chunk_size, progress=progress,
            should_cancel=should_cancel)
    if should_cancel and should_cancel():
        raise PrecomputeCancelled("cancelled before the artifact was written")
    keys = [layer.keys[0] for layer in cache.layers]
    values = [layer.values[0] for layer in cache.layers]
    art = KVArtifact(key=key, manifest={}, token_ids=list(ids), keys=keys, values=values,
                     nbytes=tensor_nbytes(keys, values))
    host_art = art if art.device.type == "cpu" else art.to("cpu", pin=True)
    art.manifest = host_art.manifest = build_manifest(
        key=key, loaded=loaded, token_ids=list(ids),
        payload_hash=payload_sha256(host_art.tensors()), extra={"chunk_size": chunk_size},
    )
    size = store.put(host_art, loaded, device_artifact=None if art is host_art else art)
    return PrecomputeResult(
        key, len(ids), round(time.perf_counter() - t0, 6), size, flops, str(path), False
    )


def _existing_is_readable(path: Path, loaded: LoadedModel) -> bool:
    """Header check of an artifact already on disk; a damaged one is recomputed (overwritten)."""
    if not path.is_file():
        return True  # held only in S3: the store verifies it on download
    try:
        check_manifest(read_manifest(path), loaded)
    except (ArtifactCorrupted, ArtifactTruncated, UnsupportedVersion):
        return False
    return True


# -- generation -------------------------------------------------------------------------------
# A request's sampling parameters (generate()'s keyword arguments besides its suffix) and their
# defaults: one place for every caller that passes requests as dicts.
SAMPLING_DEFAULTS: dict[str, Any] = {
    "max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": None,
}


def sampling_params(request: dict[str, Any]) -> dict[str, Any]:
    """The request's sampling parameters, each missing one at its default."""
    return {name: request.get(name, default) for name, default in SAMPLING_DEFAULTS.items()}


def _validate_sampling(max_tokens: int, temperature: float, top_p: float, stop: Any) -> list[str]:
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequest("max_tokens must be a positive integer")
    if not isinstance(temperature, int | float) or temperature < 0:
        raise InvalidRequest("temperature must be >= 0")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise InvalidRequest("top_p must be in (0, 1]")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequest("stop must be a list of non-empty strings")
    return stop


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs[(cumulative - sorted_probs) > top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might start a stop string (or are a partial UTF-8 char)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return hold


@dataclass
class _Step:
    """What the decode loop asks its driver for: a forward of these tokens."""

    ids: list[int]


def _output_budget(loaded: LoadedModel, context_used: int, n_feed: int, max_tokens: int) -> int:
    """How many tokens a request may generate: max_tokens, or what the context leaves."""
    context_left = loaded.max_context - context_used - n_feed
    if context_left < 1:
        raise InvalidRequest(
            f"request needs {context_used + n_feed} tokens of context; "
            f"the model has {loaded.max_context}"
        )
    return min(max_tokens, context_left)


def _decode_loop(
    loaded: LoadedModel,
    context_used: int,
    feed: list[int],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stops: list[str],
    usage: Usage,
    t0: float,
    load_s: float,
    tier: str,
) -> Generator[_Step | str | Generation, tuple[torch.Tensor, int | None] | None, None]:
    """The decode loop as a coroutine, so one request or a batch of them can drive it: yields
    _Step(ids) and is sent back (logits of the last position, its argmax if the driver already
    has it); yields text deltas (sent None), and last the Generation."""
    budget = _output_budget(loaded, context_used, len(feed), max_tokens)
    generator = None
    if temperature > 0:
        generator = torch.Generator()
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        generator.manual_seed(seed)
    eos = set(loaded.eos_token_ids)
    out_ids: list[int] = []
    emitted = 0
    text = ""
    finish = "length"
    stopped_by_string = False
    ttft = 0.0
    logits, greedy = yield _Step(feed)
    while True:
        if temperature == 0 and greedy is not None:
            token = greedy
        else:
            token = _sample(logits, temperature, top_p, generator)
        if not out_ids:
            ttft = time.perf_counter() - t0
        out_ids.append(token)
        usage.output_tokens = len(out_ids)  # live: a stream stopped early knows what it made
        if token in eos:
            finish = "stop"
            break
        text = _decode_text(loaded, [t for t in out_ids if t not in eos])
        hit = min((text.find(s) for s in stops if s in text), default=-1)
        if hit >= 0:
            text = text[:hit]
            finish = "stop"
            stopped_by_string = True
            break
        safe = len(text) - _held_back(text, stops)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
        if len(out_ids) >= budget:
            break
        logits, greedy = yield _Step([token])
    if not stopped_by_string:
        text = _decode_text(loaded, [t for t in out_ids if t not in eos])
    if len(text) > emitted:
        yield text[emitted:]
    usage.output_tokens = len(out_ids)
    yield Generation(
        text=text,
        token_ids=out_ids,
        finish_reason=finish,
        usage=usage,
        timings=Timings(load_s=round(load_s, 6), ttft_s=round(ttft, 6),
                        total_s=round(time.perf_counter() - t0, 6)),
        cache_tier=tier,
    )


def _decode(
    loaded: LoadedModel, session: Any, feed: list[int], **options: Any
) -> Iterator[str | Generation]:
    """One request's decode loop on its own session: yields text deltas, then the Generation.
    Closes the session. options: _decode_loop's keyword arguments.

    The first step (the whole suffix) is started before this returns: on a GPU it runs while
    the host builds the loop, so the request's first token waits for less host work.
    Sessions run their forward without autograd themselves (grad mode stays the caller's)."""
    try:
        context_used = session.seq_length()
        _output_budget(loaded, context_used, len(feed), options["max_tokens"])  # before work
        first = session.step(feed)
    except BaseException:
        session.close()
        raise
    steps = _decode_steps(loaded, session, feed, context_used, first, options)
    # A stream dropped before its first item never enters the generator's own cleanup.
    weakref.finalize(steps, session.close)
    return steps


def _decode_steps(
    loaded: LoadedModel,
    session: Any,
    feed: list[int],
    context_used: int,
    first: torch.Tensor,
    options: dict[str, Any],
) -> Iterator[str | Generation]:
    """_decode's loop from the first step's logits on. Greedy requests take each token from
    the session where its step computed it (the fast path's graphs do), without an argmax of
    their own."""
    greedy = options["temperature"] == 0

    def answer(logits: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """What the loop is sent after a step: its logits, and its token where it has one."""
        return logits, session.greedy_token() if greedy else None

    try:
        loop = _decode_loop(loaded, context_used, feed, **options)
        out = next(loop)
        assert isinstance(out, _Step) and out.ids is feed
        out = loop.send(answer(first))
        while True:
            if isinstance(out, _Step):
                out = loop.send(answer(session.step(out.ids)))
                continue
            yield out
            if isinstance(out, Generation):
                return
            out = next(loop)
    finally:
        session.close()


def _decode_text(loaded: LoadedModel, ids: list[int]) -> str:
    if loaded.tokenizer is None:
        return ""
    return loaded.tokenizer.decode(ids, skip_special_tokens=True)


def generate_stream(
    loaded: LoadedModel,
    store: KVStore,
    key: str,
    *,
    messages: list[dict] | None = None,
    prompt: str | None = None,
    prompt_ids: list[int] | None = None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    observe: Callable[[Usage], None] | None = None,
) -> Iterator[str | Generation]:
    """Continue from the stored KV of ``key``; yields text deltas, then the final Generation.

    ``observe`` is called once, before the first step, with the request's Usage, whose
    output_tokens counts the tokens made so far while the stream runs (a server that stops a
    stream early, say for a client that went away, reads what was produced from it)."""
    t0 = time.perf_counter()
    stops = _validate_sampling(max_tokens, temperature, top_p, stop)
    feed = suffix_ids(loaded, messages=messages, prompt=prompt, prompt_ids=prompt_ids)
    art, tier = store.load_with_tier(key, loaded, overlap=True)  # readers below wait
    load_s = time.perf_counter() - t0
    cached = art.n_tokens
    if feed:
        session = _reuse_session(loaded, art, feed, max_tokens)
    else:
        # The last cached token's logits are not stored: re-run that one token.
        cache = cache_from_artifact(loaded, art)
        cache.crop(-1)
        feed = [art.token_ids[-1]]
        cached -= 1
        session = _CacheSession(loaded, cache)
    usage = Usage(cached_tokens=cached, suffix_tokens=len(feed), output_tokens=0,
                  prefill_tokens=len(feed))
    if observe is not None:
        observe(usage)
    return _decode(loaded, session, feed, max_tokens=max_tokens, temperature=temperature,
                   top_p=top_p, seed=seed, stops=stops, usage=usage, t0=t0, load_s=load_s,
                   tier=tier)


def _last(stream: Iterator[str | Generation]) -> Generation:
    result = None
    for item in stream:
        result = item
    assert isinstance(result, Generation)
    return result


def generate(
    loaded: LoadedModel,
    store: KVStore,
    key: str,
    *,
    messages: list[dict] | None = None,
    prompt: str | None = None,
    prompt_ids: list[int] | None = None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
) -> Generation:
    """Continue from the stored KV of ``key`` with a chat (messages) or raw (prompt) suffix."""
    return _last(generate_stream(
        loaded, store, key, messages=messages, prompt=prompt, prompt_ids=prompt_ids,
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
    ))


# A batch's per-row listener: called with (row, text delta or final Generation); returning
# False stops that row (its client went away), whose result is then None.
RowListener = Callable[[int, "str | Generation"], bool]


def _run_batch(
    fast: Any, prefix: Any, loops: list[Generator], need: int,
    on_item: RowListener | None = None,
) -> list[Generation | None]:
    """Drive many requests' decode loops in lock step from one thread: every round is one
    batched forward of the live rows' tokens against the shared prefix (finished rows and the
    padding to a power of two, which keeps the CUDA graphs few, carry no valid token), whose
    graph also gives every row's greedy token (one argmax for the batch where it has none).
    ``on_item`` receives each row's text deltas as its steps finish, and its Generation."""
    from .fastpath.runner import graph_greedy

    results: list[Generation | None] = [None] * len(loops)
    pending: dict[int, list[int]] = {}

    def advance(row: int, out: Any) -> None:
        while isinstance(out, str):
            if on_item is not None and not on_item(row, out):
                loops[row].close()  # stopped: the row takes no further steps
                return
            out = next(loops[row])
        if isinstance(out, Generation):
            if on_item is not None:
                on_item(row, out)
            results[row] = out
        else:
            pending[row] = out.ids

    for row, loop in enumerate(loops):
        advance(row, next(loop))
    n_rows = len(loops)
    batch = 1 << (n_rows - 1).bit_length()
    slot = None
    with torch.inference_mode():  # the fast path's buffers are inference tensors
        while pending:
            if slot is None:  # first round: every row brings its whole suffix
                feeds = [pending[row] for row in range(n_rows)] + [[0]] * (batch - n_rows)
                slot, logits = fast._first_step(prefix, feeds, need=need)
            else:  # one token per live row
                tokens = [[pending[row][0] if row in pending else 0] for row in range(batch)]
                live = [int(row in pending) for row in range(batch)]
                ids, n_valid = fast._ids_and_lengths(tokens, 1, lengths=live)
                logits = fast._step(slot, ids, n_valid)
            greedy = graph_greedy(slot)  # computed by the step's graph, where it has one
            if greedy is None:
                greedy = logits.argmax(dim=-1).tolist()
            rows, pending = pending, {}
            for row in rows:
                advance(row, loops[row].send((logits[row], greedy[row])))
    return results  # type: ignore[return-value]


def generate_batch(
    loaded: LoadedModel,
    store: KVStore,
    key: str,
    requests: list[dict[str, Any]],
    *,
    on_item: RowListener | None = None,
    usages: list[Usage | None] | None = None,
) -> list[Generation | None]:
    """Many agents' requests on one document as one batch against the shared prefix KV.

    Each request takes generate()'s keyword arguments (messages / prompt / prompt_ids,
    max_tokens, temperature, top_p, seed, stop) and gets the Generation generate() would give:
    each row runs the same decode loop (sampling, stop strings) and only the forward passes are
    shared. On the fast path (CUDA) a step is one batched forward in which rows never attend to
    each other's tokens; elsewhere the requests run one after another.

    Streaming: ``on_item(row, item)`` is called with each row's text deltas as its steps
    finish and then with its Generation; when it returns False the row stops (result None).
    ``usages``, when given (one slot per request), receives each row's live Usage (see
    generate_stream) before the row's first step.
    """
    if not requests:
        return []
    fast = _fast_reuse(loaded)
    feeds = [suffix_ids(loaded, messages=r.get("messages"), prompt=r.get("prompt"),
                        prompt_ids=r.get("prompt_ids")) for r in requests]
    params = [sampling_params(r) for r in requests]
    stops = [_validate_sampling(p["max_tokens"], p["temperature"], p["top_p"], p["stop"])
             for p in params]
    fits = fast is not None and all(
        f and len(f) + p["max_tokens"] <= fast.capacity
        for f, p in zip(feeds, params, strict=True)
    )
    if not fits:
        return [_stream_row(loaded, store, key, row, r, on_item, usages)
                for row, r in enumerate(requests)]
    t0 = time.perf_counter()
    art, tier = store.load_with_tier(key, loaded)
    load_s = time.perf_counter() - t0
    prefix, _ = _fast_prefix(loaded, art)
    need = max(len(f) + p["max_tokens"] for f, p in zip(feeds, params, strict=True))
    row_usages = [Usage(cached_tokens=art.n_tokens, suffix_tokens=len(feed), output_tokens=0,
                        prefill_tokens=len(feed)) for feed in feeds]
    if usages is not None:
        usages[:] = row_usages
    loops = [
        _decode_loop(
            loaded, art.n_tokens, feed, max_tokens=p["max_tokens"], temperature=p["temperature"],
            top_p=p["top_p"], seed=p["seed"], usage=usage, stops=row_stops, t0=t0, load_s=load_s,
            tier=tier,
        )
        for feed, p, row_stops, usage in zip(feeds, params, stops, row_usages, strict=True)
    ]
    with fast._lock:  # the GPU serves one batch at a time
        return _run_batch(fast, prefix, loops, need, on_item)


def _stream_row(
    loaded: LoadedModel, store: KVStore, key: str, row: int, request: dict[str, Any],
    on_item: RowListener | None, usages: list[Usage | None] | None,
) -> Generation | None:
    """One row of a batch that runs alone (off the fast path), streamed to on_item."""
    def observe(usage: Usage) -> None:
        if usages is not None:
            usages[row] = usage

    stream = generate_stream(loaded, store, key, **request, observe=observe)
    try:
        for item in stream:
            if isinstance(item, Generation):
                if on_item is not None:
                    on_item(row, item)
                return item
            if on_item is not None and not on_item(row, item):
                return None
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return None


def cold_generate(
    loaded: LoadedModel,
    text: str | None,
    *,
    messages: list[dict] | None = None,
    prompt: str | None = None,
    doc_ids: list[int] | None = None,
    prompt_ids: list[int] | None = None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    chunk_size: int | None = None,
) -> Generation:
    """Prefill document + suffix from scratch (no stored KV) and generate the same way."""
    t0 = time.perf_counter()
    stops = _validate_sampling(max_tokens, temperature, top_p, stop)
    if doc_ids is not None:
        prefix = list(doc_ids)
        ids = prefix + suffix_ids(loaded, messages=messages, prompt=prompt, prompt_ids=prompt_ids)
    else:
        if text is None:
            raise InvalidRequest("pass the document text or doc_ids")
        prefix = document_prefix_ids(loaded, text)
        if prompt_ids is not None:
            ids = prefix + list(prompt_ids)
        else:
            if (messages is None) == (prompt is None):
                raise InvalidRequest("pass exactly one of messages or prompt")
            ids = conversation_ids(loaded, text, messages=messages, prompt=prompt)
    if len(ids) >= loaded.max_context:
        raise DocumentTooLong(f"request is {len(ids)} tokens; context is {loaded.max_context}")
    cache = new_cache(loaded)
    with torch.no_grad():
        if chunk_size and len(ids) > chunk_size:
            # Prefill all but the last chunk here; _decode runs the final one.
            cut = ((len(ids) - 1) // chunk_size) * chunk_size
            prefill(loaded, ids[:cut], cache, chunk_size=chunk_size)
            feed = ids[cut:]
        else:
            feed = ids
    usage = Usage(cached_tokens=0, suffix_tokens=len(ids) - len(prefix), output_tokens=0,
                  prefill_tokens=len(ids))
    session = _CacheSession(loaded, cache)
    return _last(_decode(loaded, session, feed, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, seed=seed, stops=stops, usage=usage, t0=t0, load_s=0.0,
                         tier=""))


# -- verification -----------------------------------------------------------------------------
@torch.no_grad()
def verify(
    loaded: LoadedModel,
    store: KVStore,
    key: str,
    *,
    suffixes: list[str] | None = None,
    steps: int = 24,
    save: bool = True,
) -> VerificationReport:
    """Check reuse against two-step prefill (bitwise) and one-shot prefill (greedy tokens).

    Each suffix is a user question rendered with the chat template after the cached system turn
    (raw text when the tokenizer has no chat template).
    """
    t0 = time.perf_counter()
    art = store.load(key, loaded)
    suffixes = suffixes or DEFAULT_VERIFY_SUFFIXES
    chunk = int(art.manifest.get("chunk_size") or DEFAULT_CHUNK)

    # Two-step reference: prefill the document afresh with the same chunking as precompute.
    doc_cache = new_cache(loaded)
    prefill(loaded, art.token_ids, doc_cache, chunk_size=chunk)
    kv_equal = all(
        torch.equal(layer.keys[0], k.to(loaded.device))
        and torch.equal(layer.values[0], v.to(loaded.device))
        for layer, k, v in zip(doc_cache.layers, art.keys, art.values, strict=True)
    )

    fast = _fast_reuse(loaded) if art.token_ids else None
    if fast is not None:
        from .fastpath.model import PrefixKV

        art_prefix, _ = _fast_prefix(loaded, art)
        two_step_prefix = PrefixKV([(layer.keys[0], layer.values[0]) for layer in doc_cache.layers])

    cases = []
    for suffix in suffixes:
        if getattr(loaded.tokenizer, "chat_template", None):
            sids = suffix_ids(loaded, messages=[{"role": "user", "content": suffix}])
        else:
            sids = suffix_ids(loaded, prompt=suffix)
        reuse_cache = cache_from_artifact(loaded, art)
        reuse_logits = forward(loaded, sids, reuse_cache, logits_to_keep=0)
        two_step_logits = forward(loaded, sids, copy.deepcopy(doc_cache), logits_to_keep=0)
        bitwise = bool(torch.equal(reuse_logits, two_step_logits))

        one_cache = new_cache(loaded)
        one_logits = forward(loaded, art.token_ids + sids, one_cache, logits_to_keep=1)[-1]
        r_logits = reuse_logits[-1]
        max_diff = 0.0
        reuse_tokens: list[int] = []
        one_tokens: list[int] = []
        for step in range(steps):
            r_tok, o_tok = int(torch.argmax(r_logits)), int(torch.argmax(one_logits))
            if reuse_tokens == one_tokens:  # inputs still the same: the logits are comparable
                max_diff = max(max_diff, float((r_logits.float() - one_logits.float()).abs().max()))
            reuse_tokens.append(r_tok)
            one_tokens.append(o_tok)
            if step + 1 < steps:
                r_logits = forward(loaded, [r_tok], reuse_cache)[-1]
                one_logits = forward(loaded, [o_tok], one_cache)[-1]
        case = {
            "suffix": suffix,
            "suffix_tokens": len(sids),
            "bitwise_equal": bitwise,
            "greedy_matched": _common_prefix(reuse_tokens, one_tokens),
            "steps": steps,
            "max_logit_diff": max_diff,
            "distinct_tokens": len(set(reuse_tokens)),
        }
        if fast is not None and len(sids) + steps <= fast.capacity:
            # Bitwise: the stored KV and a fresh two-step prefill give the fast path the same
            # logits; greedy: its tokens against one-shot prefill.
            from_store = fast.first_logits(art_prefix, [sids])
            from_two_step = fast.first_logits(two_step_prefix, [sids])
            case["fast_path_bitwise_equal"] = bool(torch.equal(from_store, from_two_step))
            fast_tokens = fast.greedy(art_prefix, [sids], steps)[0]
            case["fast_path_greedy_matched"] = _common_prefix(fast_tokens, one_tokens)
        cases.append(case)
    if fast is not None:
        fast.forget(two_step_prefix)

    matched_total = sum(c["greedy_matched"] for c in cases)
    total = steps * len(cases)
    bitwise_all = all(c["bitwise_equal"] for c in cases)
    rate = matched_total / total if total else 1.0
    fast_cases = [c for c in cases if "fast_path_bitwise_equal" in c]
    fast_bitwise = all(c["fast_path_bitwise_equal"] for c in fast_cases) if fast_cases else None
    fast_matched = sum(c["fast_path_greedy_matched"] for c in fast_cases) if fast_cases else None
    # float32 must match every greedy token; lower precision reports its rate.
    exact = loaded.dtype != "float32" or (
        rate == 1.0 and (fast_matched is None or fast_matched == steps * len(fast_cases))
    )
    report = VerificationReport(
        key=key,
        model_id=loaded.model_id,
        model_fingerprint=loaded.fingerprint,
        dtype=loaded.dtype,
        device=loaded.device,
        n_tokens=art.n_tokens,
        steps=steps,
        bitwise_equal=bitwise_all,
        kv_equal=kv_equal,
        greedy_matched=matched_total,
        greedy_total=total,
        match_rate=rate,
        max_logit_diff=max((c["max_logit_diff"] for c in cases), default=0.0),
        passed=bitwise_all and kv_equal and fast_bitwise is not False and exact,
        seconds=round(time.perf_counter() - t0, 4),
        cases=cases,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        fast_path_bitwise_equal=fast_bitwise,
        fast_path_greedy_matched=fast_matched,
    )
    if save:
        _write_json(store.verification_path(key), report.to_dict())
    return report


def warm_up(
    loaded: LoadedModel,
    *,
    prefix_tokens: tuple[int, ...] = (1024, 4096, 16384, 32768),
    suffix_tokens: tuple[int, ...] = (16, 32, 48, 64),
    batches: tuple[int, ...] = (2, 4, 8, 16, 32, 64),
) -> dict[str, Any]:
    """Run the serving fast path on synthetic prefixes before taking requests.

    Triton compiles each kernel variant on its first use (seconds per process; cached on disk
    afterwards), cuBLAS picks its algorithms and the runner captures its CUDA graphs: a worker
    should pay that at start, not on its first agent's request. With the kernels a graph
    serves every document of a prefix-length class (powers of two), so each class here runs
    every suffix capacity with suffixes padded to 16..64 tokens (longer ones are captured on
    first use), each run a first step and a decode step. Batches (generate_batch pads to a
    power of two) run on the second class. Does nothing where the fast path does not apply
    (CPU)."""
    fast = _fast_reuse(loaded)
    if fast is None:
        return {"fast_path": False, "runs": 0, "seconds": 0.0}
    from .fastpath.model import PrefixKV
    from .fastpath.runner import recorded_events

    t0 = time.perf_counter()
    dec = fast.decoder
    vocab = int(dec.embed.shape[0])
    capacities = sorted({fast.slot_capacity(min(c, fast.capacity))
                         for c in (64, 128, 256, 512, 1024)})
    runs = 0

    # Events of a prefix already copied in (the CPU runs no graphs).
    landed = recorded_events(len(dec.layers)) if dec.device.type == "cuda" else None

    def run(prefix: PrefixKV, n_suffix: int, capacity: int) -> None:
        nonlocal runs
        suffix = [i % vocab for i in range(1, n_suffix + 1)]
        with fast.session(prefix, max_tokens=capacity) as session:
            logits = session.step(suffix)
            session.step([int(logits.argmax())])
        if landed:  # the first step's other graph: layer by layer behind a prefix landing
            with fast.session(prefix, max_tokens=capacity, layer_ready=landed) as session:
                session.step(suffix)
        runs += 1

    for index, n_tokens in enumerate(prefix_tokens):
        n_tokens = min(n_tokens, loaded.max_context - fast.capacity)
        if n_tokens <= 0:
            continue
        shape = (dec.n_kv_heads, n_tokens, dec.head_dim)
        gen = torch.Generator(device=dec.device).manual_seed(n_tokens)
        prefix = PrefixKV([
            tuple(torch.randn(shape, generator=gen, device=dec.device).to(dec.dtype)
                  for _ in range(2))
            for _ in dec.layers
        ])
        for capacity in capacities:
            for n_suffix in suffix_tokens:
                if n_suffix < capacity:
                    run(prefix, n_suffix, capacity)
        if index == min(1, len(prefix_tokens) - 1):
            ids = [i % vocab for i in range(1, max(suffix_tokens) + 1)]
            for batch in batches:
                fast.greedy(prefix, [ids] * batch, 2)
                runs += 1
        fast.forget(prefix)
        del prefix
    return {"fast_path": True, "runs": runs, "seconds": round(time.perf_counter() - t0, 3)}


def freeze_startup_heap() -> None:
    """For a serving process whose models are loaded and warmed up: collect what start-up left
    behind, then freeze the survivors (models, compiled kernels, CUDA graphs) out of the
    garbage collector's sight.

    Why: a full collection over that heap is a pause that some request would pay; frozen, the
    collector's passes skip it."""
    gc.collect()
    gc.freeze()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_verification(store: KVStore, key: str) -> dict[str, Any] | None:
    """The stored verification report for ``key`` (None when it was never verified)."""
    path = store.verification_path(key)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def inspect_artifact(store: KVStore, key: str) -> dict[str, Any]:
    """Manifest, file size and verification of an artifact, without loading its tensors."""
    path = store.path(key)
    if not path.is_file():
        from .errors import ArtifactNotFound

        raise ArtifactNotFound(f"no KV artifact with key {key}", key=key)
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "manifest": read_manifest(path),
        "verification": read_verification(store, key),
    }
