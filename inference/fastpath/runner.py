"""Reuse runner: first tokens and greedy continuations from a prefix, with CUDA graphs on GPU.

One FastReuse per loaded model. For a hot prefix it captures, per (batch, query length), one
CUDA graph of the whole suffix step (all layers, the suffix-length update included), so a
request costs a few host-to-device copies and graph replays. On CPU (CI) the same forward runs
eagerly; results are the same computation either way.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from inference.fastpath.model import FastDecoder, PrefixKV, SuffixState
from inference.fastpath.transfer import HostPrefix


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    n_valid: torch.Tensor
    logits: torch.Tensor


class _PrefixSlot:
    """Per (prefix, batch size): the suffix buffers and the graphs that read them."""

    def __init__(
        self,
        decoder: FastDecoder,
        prefix: PrefixKV,
        batch: int,
        capacity: int,
        source: HostPrefix | None = None,
        staging: torch.Tensor | None = None,
    ) -> None:
        self.prefix = prefix
        # A prefix that lives in host memory is copied in, layer by layer, inside the graph.
        self.source = source
        self.staging = staging
        self.state = SuffixState(decoder, batch=batch, capacity=capacity, device=decoder.device)
        self.graphs: dict[tuple[int, bool], _Graph] = {}
        # A private memory pool per slot: its graphs are freed together with it.
        self.pool = torch.cuda.graph_pool_handle() if decoder.device.type == "cuda" else None


class FastReuse:
    def __init__(
        self,
        hf_model: torch.nn.Module,
        *,
        capacity: int = 256,
        use_graphs: bool | None = None,
        max_slots: int = 16,
        kernels: bool | None = None,
    ) -> None:
        self.decoder = FastDecoder(hf_model, kernels=kernels)
        self.capacity = capacity
        self.use_graphs = self.decoder.device.type == "cuda" if use_graphs is None else use_graphs
        self.max_slots = max_slots
        self._slots: OrderedDict[tuple[int, int], _PrefixSlot] = OrderedDict()
        # One GPU, one request at a time: a session holds this lock while it generates.
        self._lock = threading.Lock()

    # --- slots and graphs ------------------------------------------------------------------
    def slot_capacity(self, need: int) -> int:
        """Suffix buffer length for `need` tokens per row: a power of two (so few graphs and
        kernel variants serve every request), at least 64, at most the runner's capacity.
        Buffers hold [layers, 2, batch, kv heads, capacity, head dim]: a batch of 512 with
        the full capacity of 1024 would not fit in GPU memory."""
        if need > self.capacity:
            raise ValueError(f"{need} suffix tokens exceed the capacity of {self.capacity}")
        return min(self.capacity, max(64, 1 << (need - 1).bit_length()))

    def _slot(self, prefix: PrefixKV, batch: int, capacity: int) -> _PrefixSlot:
        # Keyed by the prefix object: a graph holds the addresses of that prefix's tensors.
        key = (id(prefix), batch, capacity)
        slot = self._slots.get(key)
        if slot is None or slot.prefix is not prefix:
            slot = _PrefixSlot(self.decoder, prefix, batch, capacity)
        return self._keep(key, slot)

    def _host_slot(self, source: HostPrefix, batch: int, capacity: int) -> _PrefixSlot:
        key = (id(source), batch, capacity)
        slot = self._slots.get(key)
        if slot is None or slot.source is not source:
            staging = torch.empty_like(source.buffer, device=self.decoder.device)
            prefix = PrefixKV([(staging[i, 0], staging[i, 1]) for i in range(staging.shape[0])])
            slot = _PrefixSlot(self.decoder, prefix, batch, capacity, source, staging)
        return self._keep(key, slot)

    def _keep(self, key: tuple[int, int, int], slot: _PrefixSlot) -> _PrefixSlot:
        """Remember slot as the most recently used; the least recently used go past max_slots."""
        self._slots[key] = slot
        self._slots.move_to_end(key)
        while len(self._slots) > self.max_slots:
            self._slots.popitem(last=False)
        return slot

    def forget_host(self, source: HostPrefix) -> None:
        for key in [k for k, s in self._slots.items() if s.source is source]:
            del self._slots[key]

    def forget(self, prefix: PrefixKV) -> None:
        """Drop the graphs and buffers of a prefix (when it leaves GPU memory)."""
        for key in [k for k, s in self._slots.items() if s.prefix is prefix]:
            del self._slots[key]

    def _graph(self, slot: _PrefixSlot, q_len: int, fresh: bool) -> _Graph:
        cached = slot.graphs.get((q_len, fresh))
        if cached is not None:
            return cached
        batch = slot.state.batch
        device = self.decoder.device
        input_ids = torch.zeros((batch, q_len), dtype=torch.long, device=device)
        n_valid = torch.full((batch,), q_len, dtype=torch.long, device=device)
        if slot.source is not None:
            slot.staging.copy_(slot.source.buffer)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._warm_up(slot, input_ids, n_valid, fresh=fresh)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        copy_in = fresh and slot.source is not None
        with torch.cuda.graph(graph, pool=slot.pool):
            ready = self._copy_in(slot) if copy_in else None
            logits = self.decoder.forward(
                input_ids,
                prefix=slot.prefix,
                state=slot.state,
                n_valid=n_valid,
                fresh=fresh,
                layer_ready=ready,
            )
            if copy_in:
                torch.cuda.current_stream().wait_stream(slot.copy_stream)
        captured = _Graph(graph=graph, input_ids=input_ids, n_valid=n_valid, logits=logits)
        slot.graphs[(q_len, fresh)] = captured
        return captured

    @torch.inference_mode()
    def _warm_up(
        self, slot: _PrefixSlot, input_ids: torch.Tensor, n_valid: torch.Tensor, *, fresh: bool
    ) -> None:
        """Run the step twice so kernels are compiled and algorithms chosen before a capture.

        A graph may be captured in the middle of a request (at its first decode step), so the
        runs leave that request's suffix state as they found it: they write K/V only at
        positions from the current length on, which nothing can see yet, and the length is
        put back. (Capturing itself runs nothing.)
        """
        lengths = slot.state.lengths.clone()
        for _ in range(2):
            slot.state.lengths.copy_(lengths)
            self.decoder.forward(
                input_ids, prefix=slot.prefix, state=slot.state, n_valid=n_valid, fresh=fresh
            )
        slot.state.lengths.copy_(lengths)

    @staticmethod
    def _copy_in(slot: _PrefixSlot) -> list[torch.cuda.Event]:
        """Per-layer host-to-GPU copies on a side stream; layer i's attention waits on event i."""
        if not hasattr(slot, "copy_stream"):
            slot.copy_stream = torch.cuda.Stream()
        slot.copy_stream.wait_stream(torch.cuda.current_stream())
        events = []
        with torch.cuda.stream(slot.copy_stream):
            for i in range(slot.staging.shape[0]):
                slot.staging[i].copy_(slot.source.buffer[i], non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                events.append(event)
        return events

    def _step(
        self,
        slot: _PrefixSlot,
        input_ids: torch.Tensor,
        n_valid: torch.Tensor,
        *,
        fresh: bool,
        layer_ready: list[torch.cuda.Event] | None = None,
    ) -> torch.Tensor:
        """One forward; layer_ready: per-layer events of a prefix still being copied in."""
        if not self.use_graphs:
            return self.decoder.forward(
                input_ids,
                prefix=slot.prefix,
                state=slot.state,
                n_valid=n_valid,
                fresh=fresh,
                layer_ready=layer_ready,
            )
        if layer_ready:  # a graph cannot wait on outside events: wait for the whole copy
            torch.cuda.current_stream().wait_event(layer_ready[-1])
        g = self._graph(slot, input_ids.shape[1], fresh)
        g.input_ids.copy_(input_ids, non_blocking=True)
        g.n_valid.copy_(n_valid, non_blocking=True)
        g.graph.replay()
        return g.logits

    # --- public ----------------------------------------------------------------------------
    @torch.inference_mode()
    def first_logits(self, prefix: PrefixKV, suffixes: list[list[int]]) -> torch.Tensor:
        """Logits after each suffix [B, V]: B agents' suffixes against one shared prefix."""
        slot, ids, n_valid = self._start(prefix, suffixes)
        return self._step(slot, ids, n_valid, fresh=True).clone()

    @torch.inference_mode()
    def first_logits_from_host(self, source: HostPrefix, suffixes: list[list[int]]) -> torch.Tensor:
        """Like first_logits for a prefix in (pinned) host memory: the copy to the GPU runs
        layer by layer, overlapped with the compute of the layers already there."""
        capacity = self.slot_capacity(max(len(s) for s in suffixes))
        slot = self._host_slot(source, len(suffixes), capacity)
        slot, ids, n_valid = self._start(slot.prefix, suffixes, slot=slot)
        if not self.use_graphs:
            slot.staging.copy_(source.buffer)
        return self._step(slot, ids, n_valid, fresh=True).clone()

    @torch.inference_mode()
    def greedy(
        self, prefix: PrefixKV, suffixes: list[list[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy continuation of each suffix; one host sync at the end."""
        slot, ids, n_valid = self._start(
            prefix, suffixes, need=max(len(s) for s in suffixes) + max_new_tokens
        )
        logits = self._step(slot, ids, n_valid, fresh=True)
        ones = torch.ones_like(n_valid)
        generated = []
        for step in range(max_new_tokens):
            next_ids = logits.argmax(dim=-1, keepdim=True)
            generated.append(next_ids)
            if step + 1 < max_new_tokens:
                logits = self._step(slot, next_ids, ones, fresh=False)
        return torch.cat(generated, dim=1).tolist()

    def session(
        self,
        prefix: PrefixKV,
        *,
        graphs: bool | None = None,
        max_tokens: int | None = None,
        layer_ready: list[torch.cuda.Event] | None = None,
    ) -> FastSession:
        """A single request's step-by-step access (for sampling loops): first step() takes the
        suffix, later ones the sampled tokens; max_tokens bounds suffix plus output (default:
        the runner's capacity); layer_ready: per-layer events of a prefix still being copied
        to the GPU, waited for layer by layer in the first step. Close it (or use `with`) to
        free the GPU."""
        return FastSession(
            self,
            prefix,
            use_graphs=self.use_graphs if graphs is None else graphs,
            capacity=self.slot_capacity(max_tokens or self.capacity),
            layer_ready=layer_ready,
        )

    def _start(
        self,
        prefix: PrefixKV,
        suffixes: list[list[int]],
        *,
        slot: _PrefixSlot | None = None,
        need: int | None = None,
    ) -> tuple[_PrefixSlot, torch.Tensor, torch.Tensor]:
        """need: suffix tokens per row over the whole request (default: the longest suffix)."""
        if not suffixes or any(len(s) == 0 for s in suffixes):
            raise ValueError("every suffix needs at least one token")
        longest = max(len(s) for s in suffixes)
        if slot is None:
            slot = self._slot(prefix, len(suffixes), self.slot_capacity(max(need or 0, longest)))
        elif longest > slot.state.capacity:
            raise ValueError(f"a suffix exceeds the capacity of {slot.state.capacity} tokens")
        if self.use_graphs:
            # Pad to a multiple of 16 so a handful of graphs serves every suffix length.
            longest = min(slot.state.capacity, -(-longest // 16) * 16)
        slot.state.reset()
        padded = [s + [0] * (longest - len(s)) for s in suffixes]
        ids = torch.tensor(padded, dtype=torch.long).to(self.decoder.device, non_blocking=True)
        n_valid = torch.tensor([len(s) for s in suffixes], dtype=torch.long).to(
            self.decoder.device, non_blocking=True
        )
        return slot, ids, n_valid


class FastSession:
    """One request against one prefix: step(ids) -> logits of the last position [V]."""

    def __init__(
        self,
        reuse: FastReuse,
        prefix: PrefixKV,
        *,
        use_graphs: bool,
        capacity: int,
        layer_ready: list[torch.cuda.Event] | None = None,
    ) -> None:
        self.reuse = reuse
        self.prefix = prefix
        self.length = 0  # suffix tokens so far
        self.capacity = capacity
        self._layer_ready = layer_ready
        self._graphs = use_graphs
        self._slot: _PrefixSlot | None = None
        reuse._lock.acquire()
        self._open = True

    def seq_length(self) -> int:
        return self.prefix.n_tokens + self.length

    @torch.inference_mode()
    def step(self, ids: list[int]) -> torch.Tensor:
        reuse = self.reuse
        if self.length + len(ids) > self.capacity:
            raise ValueError(f"the suffix capacity of {self.capacity} tokens is exhausted")
        saved, reuse.use_graphs = reuse.use_graphs, self._graphs
        try:
            if self._slot is None:
                self._slot, tokens, n_valid = reuse._start(self.prefix, [ids], need=self.capacity)
                logits = reuse._step(
                    self._slot, tokens, n_valid, fresh=True, layer_ready=self._layer_ready
                )
            else:
                device = reuse.decoder.device
                tokens = torch.tensor([ids], dtype=torch.long, device=device)
                n_valid = torch.full((1,), len(ids), dtype=torch.long, device=device)
                logits = reuse._step(self._slot, tokens, n_valid, fresh=False)
        finally:
            reuse.use_graphs = saved
        self.length += len(ids)
        return logits[0]

    def close(self) -> None:
        if self._open:
            self._open = False
            self.reuse._lock.release()

    def __enter__(self) -> FastSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
