"""Reuse runner: first tokens and greedy continuations from a prefix, with CUDA graphs on GPU.

One FastReuse per loaded model. It captures, per (prefix-length class, batch, suffix capacity,
query length), one CUDA graph of the whole suffix step (all layers, the suffix-length update
included), so a request costs a few host-to-device copies and a graph replay, from its
document's first request on: the graphs read the prefix through a table of addresses. A prefix
still being copied to the GPU (from host memory or disk) is waited for layer by layer inside the
graph, through event wait nodes. On CPU (CI) the same forward runs eagerly; results are the same
computation either way.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from inference.fastpath.model import (
    FastDecoder,
    PrefixKV,
    PrefixTable,
    SuffixState,
    prefix_capacity,
)
from inference.fastpath.transfer import DevicePrefix, HostPrefix


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    n_valid: torch.Tensor
    logits: torch.Tensor
    # A first-step graph copies its inputs (token ids, then lengths) from this pinned buffer and
    # resets the suffix lengths itself: a request writes the buffer and replays, no other CUDA
    # call on the host's path to the GPU (those calls were a large share of a request's host time).
    host_inputs: torch.Tensor | None = None
    host_array: np.ndarray | None = None  # host_inputs as numpy, made once (not per request)
    # Recorded by the graph once it has copied host_inputs: the buffer may be written again.
    inputs_read: torch.cuda.Event | None = None
    # Kernels steps: each row's greedy token, written into this pinned buffer by the graph's
    # own kernel, which records greedy_ready after it (no argmax launch, no .item()).
    greedy_host: torch.Tensor | None = None
    greedy_array: np.ndarray | None = None  # greedy_host as numpy: read without a torch call
    greedy_ready: torch.cuda.Event | None = None
    # The host has seen this graph's last replay end (it waited for a greedy_ready of the slot
    # recorded after it): the next request writes host_inputs without a CUDA call.
    finished: bool = True


class _Slot:
    """Suffix buffers and the CUDA graphs that run on them, for one batch size and capacity.

    With the Triton kernels a slot serves a prefix-length class: the graphs read the bound
    prefix's addresses and length from a PrefixTable, so one capture serves every document of
    the class, a new document included. The torch-ops step bakes the prefix's addresses into
    its graphs, so there a slot belongs to one prefix.
    """

    def __init__(
        self, decoder: FastDecoder, *, batch: int, capacity: int, prefix_class: int | None
    ) -> None:
        device = decoder.device
        # The bound prefix, weakly: a slot must not keep a document's KV in GPU memory after
        # the store let it go (a request in flight holds it strongly, and every request binds
        # before its graph runs).
        self._bound: weakref.ref[PrefixKV] | None = None
        self.table = (
            None
            if prefix_class is None
            else PrefixTable(len(decoder.layers), prefix_class, device, decoder.dtype)
        )
        self.state = SuffixState(decoder, batch=batch, capacity=capacity, device=device)
        # GPU memory of the suffix buffers (the graphs' own pool comes on top, about as large:
        # activations of the same batch). Counted once: FastReuse sums it over its slots.
        self.nbytes = sum(
            t.numel() * t.element_size() for t in (*self.state.keys, *self.state.values)
        )
        self.graphs: dict[tuple[int, bool, bool], _Graph] = {}  # (q_len, fresh, waits)
        self.last: _Graph | None = None  # the graph that ran last (None: the step ran eagerly)
        # A private memory pool per slot: its graphs are freed together with it.
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        # Per-layer events the first-step graph waits on (event wait nodes): a prefix still
        # being copied to the GPU re-records them as its layers land.
        self.ready = recorded_events(len(decoder.layers)) if device.type == "cuda" else None

    @property
    def prefix(self) -> PrefixKV | None:
        return None if self._bound is None else self._bound()

    def bind(self, prefix: PrefixKV) -> None:
        if prefix is self.prefix:  # the table already points at it
            return
        if self.table is not None:
            self.table.bind(prefix)
        self._bound = weakref.ref(prefix)

    def unbind(self) -> None:
        self._bound = None

    @property
    def view(self) -> PrefixKV | PrefixTable:
        """What the step reads the prefix through."""
        return self.prefix if self.table is None else self.table


def _packed(rows: list[list[int]], width: int, lengths: list[int] | None = None) -> list[int]:
    """Token rows padded to width and flattened, then their lengths (default: the rows' own):
    a step's inputs as one buffer, for one copy."""
    flat = [t for row in rows for t in row + [0] * (width - len(row))]
    return flat + ([len(row) for row in rows] if lengths is None else lengths)


def _pack_into(out: np.ndarray, rows: list[list[int]], width: int) -> None:
    """_packed(rows, width) written into out. A single row (every lone request) is written in
    place, without building the padded list first: this is on the host's path to the GPU."""
    if len(rows) == 1:
        row = rows[0]
        out[: len(row)] = row
        out[len(row) : width] = 0
        out[width] = len(row)
    else:
        out[:] = _packed(rows, width)


def graph_greedy(slot: _Slot) -> list[int] | None:
    """Each row's greedy token of the slot's last step, where its graph computed them (waits
    for them); None where that step ran without a graph that does."""
    g = slot.last
    if g is None or g.greedy_host is None:
        return None
    g.greedy_ready.synchronize()
    for graph in slot.graphs.values():  # replayed before g, on the same stream: all ended
        graph.finished = True
    return g.greedy_array.tolist()


def recorded_events(n: int) -> list[torch.cuda.Event]:
    """n events, each recorded once on the current stream (so waiting on one is defined before
    any copy): a slot's per-layer events, or the layer_ready of a prefix that has landed."""
    events = [torch.cuda.Event(external=True) for _ in range(n)]
    for event in events:
        event.record()
    return events


class FastReuse:
    def __init__(
        self,
        hf_model: torch.nn.Module,
        *,
        capacity: int = 256,
        use_graphs: bool | None = None,
        max_slots: int = 48,
        max_slot_bytes: int | None = None,
        kernels: bool | None = None,
    ) -> None:
        """max_slots, max_slot_bytes: slots kept (least recently used go first), by count and
        by the bytes of their suffix buffers (a batch of 512 on Qwen3-4B holds 4.8 GB); the
        byte limit defaults to a fifth of the GPU's memory (16 GiB without one)."""
        self.decoder = FastDecoder(hf_model, kernels=kernels)
        self.capacity = capacity
        self.use_graphs = self.decoder.device.type == "cuda" if use_graphs is None else use_graphs
        self.max_slots = max_slots
        if max_slot_bytes is None:
            device = self.decoder.device
            max_slot_bytes = (
                torch.cuda.get_device_properties(device).total_memory // 5
                if device.type == "cuda"
                else 16 << 30
            )
        self.max_slot_bytes = max_slot_bytes
        self._slots: OrderedDict[tuple[int, int, int], _Slot] = OrderedDict()
        self._staging: OrderedDict[int, tuple[HostPrefix, DevicePrefix]] = OrderedDict()
        self._chain_stream: torch.cuda.Stream | None = None
        # One GPU, one request at a time: a session holds this lock while it generates.
        self._lock = threading.Lock()

    @property
    def any_prefix_graphs(self) -> bool:
        """Whether captured graphs serve any prefix (of their length class) without a new
        capture: then a document's first request runs on graphs too."""
        return self.use_graphs and self.decoder.kernels

    # --- slots and graphs ------------------------------------------------------------------
    def slot_capacity(self, need: int) -> int:
        """Suffix buffer length for `need` tokens per row: a power of two (so few graphs and
        kernel variants serve every request), at least 64, at most the runner's capacity.
        Buffers hold [layers, 2, batch, kv heads, capacity, head dim]: a batch of 512 with
        the full capacity of 1024 would not fit in GPU memory."""
        if need > self.capacity:
            raise ValueError(f"{need} suffix tokens exceed the capacity of {self.capacity}")
        return min(self.capacity, max(64, 1 << (need - 1).bit_length()))

    def _slot_key(self, prefix: PrefixKV, batch: int, capacity: int) -> tuple[int, int, int]:
        if self.decoder.kernels:
            return (prefix_capacity(prefix.n_tokens), batch, capacity)
        return (id(prefix), batch, capacity)  # graphs hold the addresses of this prefix's tensors

    def _slot(self, prefix: PrefixKV, batch: int, capacity: int) -> _Slot:
        key = self._slot_key(prefix, batch, capacity)
        slot = self._slots.get(key)
        created = slot is None or (not self.decoder.kernels and slot.prefix is not prefix)
        if created:
            slot = _Slot(
                self.decoder,
                batch=batch,
                capacity=capacity,
                prefix_class=key[0] if self.decoder.kernels else None,
            )
        self._slots[key] = slot  # the most recently used
        self._slots.move_to_end(key)
        if created:  # only a new slot can pass the limits: the least recently used go
            total = sum(s.nbytes for s in self._slots.values())
            while len(self._slots) > 1 and (
                len(self._slots) > self.max_slots or total > self.max_slot_bytes
            ):
                total -= self._slots.popitem(last=False)[1].nbytes
        slot.bind(prefix)
        return slot

    def forget(self, prefix: PrefixKV) -> None:
        """Let go of a prefix (when it leaves GPU memory): per-prefix slots are dropped,
        class slots only unbind it and keep their graphs."""
        for key, slot in list(self._slots.items()):
            if slot.prefix is prefix:
                if slot.table is None:
                    del self._slots[key]
                else:
                    slot.unbind()

    def forget_host(self, source: HostPrefix) -> None:
        staged = self._staging.pop(id(source), None)
        if staged is not None:
            self.forget(staged[1].prefix)

    def _graph(self, slot: _Slot, q_len: int, fresh: bool, *, waits: bool = False) -> _Graph:
        """The slot's graph of a step of q_len tokens per row; waits (first steps only): its
        layers wait for the slot's per-layer events (a prefix still being copied in). A hot
        prefix gets the graph without them: an event wait before a layer's attention also
        takes that launch out of the chain of early (PDL) launches."""
        cached = slot.graphs.get((q_len, fresh, waits))
        if cached is not None:
            return cached
        batch = slot.state.batch
        device = self.decoder.device
        # ids then lengths in one buffer, as host_inputs holds them: one copy node in the graph,
        # not two
        inputs = torch.full((batch * q_len + batch,), q_len, dtype=torch.long, device=device)
        input_ids, n_valid = inputs[: batch * q_len].view(batch, q_len), inputs[batch * q_len :]
        input_ids.zero_()
        ready = slot.ready if waits else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._warm_up(slot, input_ids, n_valid, fresh=fresh, layer_ready=ready)
        torch.cuda.current_stream().wait_stream(side)
        host_inputs = inputs_read = host_array = greedy_host = greedy_ready = None
        if fresh:
            host_inputs = torch.zeros(batch * q_len + batch, dtype=torch.long).pin_memory()
            host_array = host_inputs.numpy()
            inputs_read = torch.cuda.Event(external=True)
        if self.decoder.kernels:
            greedy_host = torch.zeros(batch, dtype=torch.long).pin_memory()
            greedy_ready = torch.cuda.Event(external=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=slot.pool):
            if host_inputs is not None:
                inputs.copy_(host_inputs, non_blocking=True)
                inputs_read.record()
                slot.state.reset()
            logits = self._forward(slot, input_ids, n_valid, fresh=fresh, layer_ready=ready)
            if greedy_host is not None:
                from inference.fastpath.kernels import greedy_tokens

                greedy_tokens(logits, out=greedy_host)  # the kernel writes host memory
                greedy_ready.record()
        captured = _Graph(
            graph=graph,
            input_ids=input_ids,
            n_valid=n_valid,
            logits=logits,
            host_inputs=host_inputs,
            host_array=host_array,
            inputs_read=inputs_read,
            greedy_host=greedy_host,
            greedy_array=None if greedy_host is None else greedy_host.numpy(),
            greedy_ready=greedy_ready,
        )
        slot.graphs[(q_len, fresh, waits)] = captured
        return captured

    @torch.inference_mode()
    def _warm_up(
        self,
        slot: _Slot,
        input_ids: torch.Tensor,
        n_valid: torch.Tensor,
        *,
        fresh: bool,
        layer_ready: list[torch.cuda.Event] | None = None,
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
            self._forward(slot, input_ids, n_valid, fresh=fresh, layer_ready=layer_ready)
        slot.state.lengths.copy_(lengths)

    def _forward(
        self,
        slot: _Slot,
        input_ids: torch.Tensor,
        n_valid: torch.Tensor,
        *,
        fresh: bool,
        layer_ready: list[torch.cuda.Event] | None,
    ) -> torch.Tensor:
        """The decoder's step on a slot's buffers and bound prefix (run eagerly or captured)."""
        return self.decoder.forward(
            input_ids,
            prefix=slot.view,
            state=slot.state,
            n_valid=n_valid,
            fresh=fresh,
            layer_ready=layer_ready,
        )

    def _first_step(
        self,
        prefix: PrefixKV,
        suffixes: list[list[int]],
        *,
        need: int | None = None,
        layer_ready: list[torch.cuda.Event] | None = None,
    ) -> tuple[_Slot, torch.Tensor]:
        """A request's (or batch's) first step: its slot, bound to the prefix, and the logits
        after each suffix [B, V] (with graphs, the graph's own buffer: read it before the slot's
        next first step). need: suffix tokens per row over the whole request (default: the
        longest suffix); layer_ready: per-layer events of a prefix still being copied in, each
        waited for by its own layer's attention, no earlier."""
        if not suffixes or any(len(s) == 0 for s in suffixes):
            raise ValueError("every suffix needs at least one token")
        longest = max(len(s) for s in suffixes)
        capacity = self.slot_capacity(max(need or 0, longest))
        # Pad to a multiple of 16 so a handful of graphs serves every suffix length.
        width = min(capacity, -(-longest // 16) * 16)
        ready = None if layer_ready else self._ready_graph(prefix, len(suffixes), capacity, width)
        if ready is not None:  # a hot request: no tensor work before the replay
            slot, g = ready
        else:
            with torch.inference_mode():  # a new slot, binding or capture, or no graphs
                slot = self._slot(prefix, len(suffixes), capacity)
                if not self.use_graphs:
                    slot.last = None
                    slot.state.reset()
                    ids, n_valid = self._ids_and_lengths(suffixes, longest)
                    logits = self._forward(slot, ids, n_valid, fresh=True, layer_ready=layer_ready)
                    return slot, logits
                g = self._graph(slot, width, fresh=True, waits=bool(layer_ready))
        if not g.finished:  # the last replay must have copied its inputs (a CUDA call)
            g.inputs_read.synchronize()
        _pack_into(g.host_array, suffixes, width)
        if layer_ready:  # the graph waits on the slot's events: move each one after its layer
            if self._chain_stream is None:
                self._chain_stream = torch.cuda.Stream()
            chain = self._chain_stream
            for landed, event in zip(layer_ready, slot.ready, strict=True):
                chain.wait_event(landed)
                event.record(chain)
        slot.last = g
        g.finished = False
        g.graph.replay()
        return slot, g.logits

    def _ready_graph(
        self, prefix: PrefixKV, batch: int, capacity: int, width: int
    ) -> tuple[_Slot, _Graph] | None:
        """The slot and first-step graph of a hot request, when they need no tensor work: the
        slot exists and is bound to prefix, the graph is captured (kernels, no layer waits).
        That path is a buffer write and a replay; it runs outside inference mode, whose entry
        and exit were host time before the GPU had work."""
        if not (self.use_graphs and self.decoder.kernels):
            return None
        key = self._slot_key(prefix, batch, capacity)
        slot = self._slots.get(key)
        if slot is None or slot.prefix is not prefix:
            return None
        g = slot.graphs.get((width, True, False))
        if g is None:
            return None
        self._slots.move_to_end(key)  # the most recently used, as _slot keeps them
        return slot, g

    def _step(self, slot: _Slot, input_ids: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        """A later step of the slot's request: input_ids [B, S] (on the device) after what its
        rows hold."""
        if not self.use_graphs:
            slot.last = None
            return self._forward(slot, input_ids, n_valid, fresh=False, layer_ready=None)
        g = self._graph(slot, input_ids.shape[1], False)
        g.input_ids.copy_(input_ids, non_blocking=True)
        g.n_valid.copy_(n_valid, non_blocking=True)
        slot.last = g
        g.graph.replay()
        return g.logits

    def _stage(self, source: HostPrefix) -> DevicePrefix:
        """Copy a host prefix into its GPU staging buffer (kept for the next request from the
        same source), layer by layer on a side stream; returns the staged prefix with its
        per-layer events."""
        staged = self._staging.pop(id(source), None)
        if staged is None or staged[0] is not source:
            while len(self._staging) >= 2:  # staging buffers are whole documents: keep few
                self.forget(self._staging.popitem(last=False)[1][1].prefix)
            out = None
        else:
            out = staged[1].buffer
        device_prefix = source.to_device(
            self.decoder.device, out=out, overlap=self.decoder.device.type == "cuda"
        )
        self._staging[id(source)] = (source, device_prefix)
        return device_prefix

    # --- public ----------------------------------------------------------------------------
    @torch.inference_mode()
    def first_logits(self, prefix: PrefixKV, suffixes: list[list[int]]) -> torch.Tensor:
        """Logits after each suffix [B, V]: B agents' suffixes against one shared prefix."""
        return self._first_step(prefix, suffixes)[1].clone()

    @torch.inference_mode()
    def first_logits_from_host(self, source: HostPrefix, suffixes: list[list[int]]) -> torch.Tensor:
        """Like first_logits for a prefix in (pinned) host memory: the copy to the GPU runs
        layer by layer, overlapped with the compute of the layers already there."""
        staged = self._stage(source)
        return self._first_step(staged.prefix, suffixes, layer_ready=staged.ready)[1].clone()

    @torch.inference_mode()
    def greedy(
        self, prefix: PrefixKV, suffixes: list[list[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy continuation of each suffix; one host sync at the end."""
        slot, logits = self._first_step(
            prefix, suffixes, need=max(len(s) for s in suffixes) + max_new_tokens
        )
        ones = torch.ones(len(suffixes), dtype=torch.long, device=logits.device)
        generated = []
        for step in range(max_new_tokens):
            next_ids = logits.argmax(dim=-1, keepdim=True)
            generated.append(next_ids)
            if step + 1 < max_new_tokens:
                logits = self._step(slot, next_ids, ones)
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

    def _ids_and_lengths(
        self, rows: list[list[int]], width: int, lengths: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rows padded to width [B, width] and their lengths [B] (default: the rows' own), on
        the device. They travel in one copy: every copy adds to the request's latency."""
        packed = self._to_device(_packed(rows, width, lengths))
        return packed[: len(rows) * width].view(len(rows), width), packed[len(rows) * width :]

    def _to_device(self, values: list) -> torch.Tensor:
        """A small host list on the GPU without waiting: from pageable memory a copy would wait
        for the stream (the step before), so it goes through pinned memory."""
        host = torch.tensor(values, dtype=torch.long)
        if self.decoder.device.type != "cuda":
            return host
        return host.pin_memory().to(self.decoder.device, non_blocking=True)


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
        self._slot: _Slot | None = None
        reuse._lock.acquire()
        self._open = True

    def seq_length(self) -> int:
        return self.prefix.n_tokens + self.length

    def step(self, ids: list[int]) -> torch.Tensor:
        reuse = self.reuse
        if self.length + len(ids) > self.capacity:
            raise ValueError(f"the suffix capacity of {self.capacity} tokens is exhausted")
        saved, reuse.use_graphs = reuse.use_graphs, self._graphs
        try:
            if self._slot is None:  # enters inference mode itself where it does tensor work
                self._slot, logits = reuse._first_step(
                    self.prefix, [ids], need=self.capacity, layer_ready=self._layer_ready
                )
            else:
                with torch.inference_mode():
                    tokens, n_valid = reuse._ids_and_lengths([ids], len(ids))
                    logits = reuse._step(self._slot, tokens, n_valid)
        finally:
            reuse.use_graphs = saved
        self.length += len(ids)
        return logits[0]

    def greedy_token(self) -> int | None:
        """The argmax of the last step's logits, where its graph computed it (waits for it);
        None where the step ran without one (take the argmax of the logits then)."""
        rows = None if self._slot is None else graph_greedy(self._slot)
        return None if rows is None else rows[0]

    def close(self) -> None:
        if self._open:
            self._open = False
            self.reuse._lock.release()

    def __enter__(self) -> FastSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
