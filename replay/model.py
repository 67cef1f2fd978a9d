"""An MoE decoder stack in PyTorch at a scenario's dimensions, with experts offloaded.

Dense weights (embeddings, attention, norms, routers, shared experts, LM head) live on
the device. (Not modelled: DeepSeek's dense first layers and MLA attention.)
Every routed expert lives in host memory (pinned on CUDA) as one flat tensor
(w1 | w3 | w2), so a load is one copy. The device holds an ExpertCache: a pool of
slots the policy's resident experts occupy, plus a staging slot per top-k for
experts streamed through a full cache. Copies go over one host link under the
simulator's copy rule (replay/link.py; sim/costmodel.py states it): one expert at a
time, demand before queued prefetches, and a layer computes once its experts landed.
Weights are random unless real ones are loaded (replay/weights.py): memory and time
do not depend on the values. Routing is forced from the trace, or with real weights
decided by the model's own router as each layer runs (`step(..., routes=None)`).
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from replay.link import LANDED, QUEUED, Copy, HostLink

# KV is held in blocks of this many tokens per request (a paged KV cache's granularity, vLLM's
# default block). `emoe profile` records it (measured.kv_block_tokens) so the simulator's memory
# ledger counts KV in the same blocks.
KV_BLOCK_TOKENS = 16
# Steps whose per-layer events a CUDA replay records (ExpertCache.stamp): the first ones.
CUDA_LAYER_STEPS = 20


def scaled_spec(spec, scale: int, dtype_bytes: int):
    """Shrink hidden sizes by `scale` (for CPU runs); heads keep their count."""
    if scale == 1 and dtype_bytes == spec.dtype_bytes:
        return spec
    hd = max((spec.hidden // scale) // spec.n_heads, 1)
    hidden = hd * spec.n_heads
    return replace(spec, name=f"{spec.name}/s{scale}", hidden=hidden, head_dim=hd,
                   expert_ffn=max(spec.expert_ffn // scale, 1), vocab=max(spec.vocab // scale, 16),
                   shared_ffn=spec.shared_ffn // scale, dense_ffn=spec.dense_ffn // scale,
                   dtype_bytes=dtype_bytes, kv_cache_dim=0, attn_params=0)


class ExpertCache:
    """Device slots for experts, filled over one host link (replay/link.py: the copy rule).

    The policy's resident experts hold slots; a prefetch or demand copy takes its slot when
    issued, a streamed expert (no room in the cache) a free staging slot when its copy
    starts, returned once the layer has used it. On CUDA copies run on a dedicated stream,
    the layer's compute waits for each copy's done event, and a slot is not overwritten
    before the compute that read it has finished (an in-use event)."""

    def __init__(self, host_experts, n_slots: int, device, dtype, n_staging: int = 0):
        self.host = host_experts                    # [layer][expert] flat tensors
        self.numel = host_experts[0][0].numel()
        self.device = device
        self.cuda = device.type == "cuda"
        self.pool = torch.empty((n_slots, self.numel), dtype=dtype, device=device)
        # The last n_staging slots are the staging buffer (streamed experts); the rest the cache.
        self.free = list(range(n_slots - n_staging - 1, -1, -1))
        self.staging = list(range(n_slots - 1, n_slots - n_staging - 1, -1))
        self.slot_of: dict[tuple[int, int], int] = {}
        self.copy_of: dict[tuple[int, int], Copy] = {}   # the latest copy of each expert with a slot
        self.in_use: dict[int, object] = {}         # slot -> compute-done event
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._n_staging = n_staging
        # Per-layer events for `emoe timeline --layers`: (kind, layer, expert, start, end), with
        # start and end stamps (stamp()): time.monotonic() (the replay clock's) on CPU; on CUDA,
        # (anchor, timing event) on the stream that did the work (the host runs ahead of the
        # device), the anchor pinned to time.monotonic() (reanchor()), turned into seconds by settle().
        self.events: list = []
        self._unsettled: list[int] = []             # CUDA: events whose stamps are still events
        self._settled_to = 0                        # ... and where the events not yet looked at start
        self._anchor = None
        # On CUDA each stamp is an event recorded and later queried on the host (a few µs each,
        # four a layer), which would slow every replayed step by some percent: only the first
        # CUDA_LAYER_STEPS steps are recorded (`emoe timeline --layers` draws the first 20).
        self.recording = True
        self._steps_to_record = CUDA_LAYER_STEPS if self.cuda else None
        self.reanchor()
        self.layer = None                           # the layer computing now (its stalls)
        self.link = HostLink(self)
        self.lock = self.link.cond                  # one lock for the link's queues and the slots
        self.stall_s = 0.0                          # time layers waited for copies (CPU: measured here)
        self.streamed = 0                           # demand copies streamed through the staging slots
        self._stall_events: list = []               # CUDA: (before, after) waits on the compute stream

    # ---- per-layer events --------------------------------------------------------------------------
    def stamp(self, stream=None):
        """Now, for an event: time.monotonic() on CPU; on CUDA (anchor, a timing event recorded
        on `stream`, the compute stream by default): when the device gets there. The anchor is
        read first, so the device reaches the event after the anchor. None when not recording."""
        if not self.cuda:
            return time.monotonic()
        if not self.recording:
            return None
        anchor = self._anchor
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return anchor, ev

    def reanchor(self) -> None:
        """CUDA: pin the device's clock to time.monotonic with an event the device reaches
        while the host waits for it. Taken once a step (ReplayEngine.execute), so stamps are
        read against an anchor a step old at most: elapsed_time is float32 milliseconds, whose
        resolution from one anchor at the run's start would grow to tens of microseconds
        within minutes, and the two clocks drift."""
        if not self.cuda:
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        ev.synchronize()
        self._anchor = (ev, time.monotonic())

    def step_done(self) -> None:
        """CUDA, once a step has synchronised: settle its events, take a fresh anchor, and stop
        recording after CUDA_LAYER_STEPS steps."""
        if not (self.cuda and self.recording):
            return
        self.settle()
        self.reanchor()
        self._steps_to_record -= 1
        self.recording = self._steps_to_record > 0

    def settle(self, wait: bool = False) -> None:
        """CUDA: turn the stamps of events the device has finished into seconds on
        time.monotonic (the start: its anchor's time plus the device's elapsed time since; the
        end: the start plus the event's own duration), dropping the CUDA events; those not
        finished stay for a later call (wait: synchronise first). Called once a step, so a
        long replay does not hold millions of CUDA events."""
        if not self.cuda:
            return
        if wait:
            torch.cuda.synchronize(self.device)
        pending, n = [], len(self.events)          # the link thread may append meanwhile
        for i in self._unsettled + list(range(self._settled_to, n)):
            kind, layer, e, (anchor, a), (_, b) = self.events[i]
            if not (a.query() and b.query()):
                pending.append(i)
                continue
            start = anchor[1] + anchor[0].elapsed_time(a) / 1e3
            self.events[i] = (kind, layer, e, start, start + a.elapsed_time(b) / 1e3)
        self._unsettled, self._settled_to = pending, n

    @property
    def slot_bytes(self) -> int:
        return self.numel * self.pool.element_size()

    @property
    def copies(self) -> int:
        return self.link.landed

    @property
    def bytes_copied(self) -> int:
        return self.link.landed * self.slot_bytes

    @property
    def copy_s(self) -> float:
        return self.link.copy_s

    def resident(self) -> int:
        return len(self.slot_of)

    # ---- issuing copies (compute thread) ---------------------------------------------------------
    def issue_point(self):
        """CUDA: an event on the compute stream marking where copies are issued (the host runs
        ahead of the device; a copy starts only once the device has reached it). CPU: None."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def prefetch(self, layer: int, expert: int, after=None) -> None:
        self._issue(layer, expert, "prefetch", after)

    def fetch(self, layer: int, expert: int, after=None) -> None:
        """A demand copy into the cache, issued now (once the layer's router has run)."""
        self._issue(layer, expert, "demand", after)

    def load(self, layer: int, expert: int) -> None:
        """Copy an expert in on demand and wait for it (the starting set, profiling)."""
        self.fetch(layer, expert)
        self.link.wait(self.copy_of[(layer, expert)])

    def _issue(self, layer, expert, kind, after):
        key = (layer, expert)
        if key in self.slot_of:
            return
        slot = self._take_slot()
        self.slot_of[key] = slot
        self.copy_of[key] = self.link.issue(Copy(layer, expert, slot, kind, after))

    def stream_in(self, layer: int, expert: int, after=None) -> Copy:
        """A demand copy of an expert that does not fit the cache: a staging slot when it starts."""
        self.streamed += 1
        return self.link.issue(Copy(layer, expert, None, "demand", after))

    def evict(self, layer: int, expert: int) -> None:
        """Free an expert's slot: a copy not started is dropped, one in flight frees it on landing."""
        slot = self.slot_of.pop((layer, expert), None)
        if slot is None:
            return
        copy = self.copy_of.pop((layer, expert), None)
        with self.lock:
            if copy is not None and copy.state != LANDED and not self.link.drop(copy):
                copy.evicted = True      # in flight: the link thread frees the slot when it lands
                return
            self._release(slot)

    # ---- slots (both threads) ----------------------------------------------------------------------
    def _take_slot(self, staging: bool = False) -> int:
        """A free cache slot (or staging slot); waits while one is being freed (a copy of an
        evicted expert landing; for a streamed copy, a streamed expert still in use)."""
        deadline = time.perf_counter() + 60.0
        with self.lock:
            pool = self.staging if staging and self._staged else self.free
            while not pool:
                self.link.check()
                if time.perf_counter() > deadline or not (self.link.demand or self.link.prefetch
                                                          or self.link._busy):
                    raise RuntimeError("expert cache has no free slot: a policy exceeded its capacity, or "
                                       "a layer needs a copy queued behind a streamed one")
                self.lock.wait(0.01)
            return pool.pop()

    @property
    def _staged(self) -> bool:
        return self._n_staging > 0

    def _release(self, slot: int) -> None:
        with self.lock:
            (self.staging if slot >= len(self.pool) - self._n_staging else self.free).append(slot)
            self.lock.notify_all()

    release_slot = _release

    def run_copy(self, copy: Copy) -> float | None:
        """The link thread's copy of one expert; returns its seconds (CUDA: from events)."""
        streamed = copy.slot is None
        if streamed:                               # streamed: a staging slot, once one is free
            copy.slot = self._take_slot(staging=True)
        dst, src = self.pool[copy.slot], self.host[copy.layer][copy.expert]
        if not self.cuda:
            m0, t0 = time.monotonic(), time.perf_counter()
            dst.copy_(src)
            took = time.perf_counter() - t0
            self.events.append(("streamed copy" if streamed else f"{copy.kind} copy", copy.layer, copy.expert,
                                m0, time.monotonic()))
            return took
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            with self.lock:
                in_use = self.in_use.pop(copy.slot, None)
            if in_use is not None:              # never overwrite a slot still being read
                self.stream.wait_event(in_use)
            anchor = self._anchor                   # read before the copy's events are recorded
            start = torch.cuda.Event(enable_timing=True)
            done = torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            dst.copy_(src, non_blocking=True)
            done.record(self.stream)
        if self.recording:
            self.events.append(("streamed copy" if streamed else f"{copy.kind} copy", copy.layer, copy.expert,
                                (anchor, start), (anchor, done)))
        copy.done = done
        copy.submitted.set()
        done.synchronize()                      # one copy at a time on the link
        return start.elapsed_time(done) / 1e3

    # ---- the layer's side of the copy rule ------------------------------------------------------------
    def promote(self, layer: int, experts) -> None:
        """The layer's router has run: queued prefetches of its experts become demand copies."""
        for e in experts:
            copy = self.copy_of.get((layer, e))
            if copy is not None and copy.state == QUEUED:
                self.link.promote(copy)

    def wait(self, copies) -> None:
        """Block the layer until every copy has landed (promoting queued prefetches to demand);
        the time it waited is the replay's stall."""
        pending = [c for c in copies if c is not None and not c.landed.is_set()]
        if not pending:
            return
        for c in pending:
            if c.state == QUEUED:
                self.link.promote(c)
        if not self.cuda:
            m0, t0 = time.monotonic(), time.perf_counter()
            for c in pending:
                self.link.wait(c)
            self.stall_s += time.perf_counter() - t0
            self.events.append(("stall", self.layer, None, m0, time.monotonic()))
            return
        compute = torch.cuda.current_stream(self.device)
        anchor = self._anchor
        before = torch.cuda.Event(enable_timing=True)
        before.record(compute)
        for c in pending:
            while not c.submitted.wait(0.5):
                self.link.check()
            self.link.check()
            if c.done is not None:
                compute.wait_event(c.done)
        after = torch.cuda.Event(enable_timing=True)
        after.record(compute)
        self._stall_events.append((before, after))
        if self.recording:
            self.events.append(("stall", self.layer, None, (anchor, before), (anchor, after)))

    def collect_stall(self) -> None:
        """CUDA: add up the compute stream's waits (call once it has synchronised)."""
        for before, after in self._stall_events:
            self.stall_s += before.elapsed_time(after) / 1e3
        self._stall_events.clear()

    def weights(self, layer: int, expert: int, hidden: int, ffn: int, slot: int | None = None):
        """(w1, w3, w2) views of a resident expert (or of the staging slot given)."""
        flat = self.pool[self.slot_of[(layer, expert)] if slot is None else slot]
        n = hidden * ffn
        return flat[:n].view(hidden, ffn), flat[n:2 * n].view(hidden, ffn), flat[2 * n:].view(ffn, hidden)

    def mark_used(self, slot: int) -> None:
        """Record that compute has been queued on this slot (it may not be overwritten before)."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            with self.lock:
                self.in_use[slot] = ev

    def drain(self) -> None:
        """Wait for every copy issued so far (end of a replay: the counters are final)."""
        self.link.drain()


class ReplayModel:
    def __init__(self, spec, device: str = "cpu", dtype=torch.float32, seed: int = 0, n_slots: int = 0,
                 host_experts=None, rope_theta: float = 1e6, rms_eps: float = 1e-5):
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.rms_eps = rms_eps
        hd = spec.hd
        self.inv_freq = 1.0 / (rope_theta ** (torch.arange(0, hd - hd % 2, 2, dtype=torch.float32) / hd))
        self.inv_freq = self.inv_freq.to(self.device)
        g = torch.Generator().manual_seed(seed)
        H, hd, nh, nkv = spec.hidden, spec.hd, spec.n_heads, spec.n_kv_heads
        std = 0.02
        # Values do not change time or memory: above a billion parameters, skip the random fill.
        fill = spec.total_params < 1e9
        pin = self.device.type == "cuda"

        def w(*shape, host=False):
            if host:
                t = torch.empty(*shape, dtype=dtype, pin_memory=pin)
                return t.copy_(torch.randn(*shape, generator=g) * std) if fill else t.zero_()
            if fill:
                return (torch.randn(*shape, generator=g) * std).to(dtype).to(self.device)
            return torch.empty(*shape, dtype=dtype, device=self.device).normal_(0, std)
        self.embed = w(spec.vocab, H)
        # Tied embeddings (the small MoE, Qwen3's small models): the LM head is the embedding matrix.
        self.head = self.embed if spec.tied_embeddings else w(spec.vocab, H)
        self.norm = torch.ones(H, dtype=dtype, device=self.device)
        self.layers = []
        # Shared experts (Qwen-MoE, DeepSeek) serve every token: one dense FFN on the device.
        S = spec.n_shared_experts * (spec.shared_ffn or spec.expert_ffn)
        for _ in range(spec.n_moe_layers):
            layer = dict(wq=w(H, nh * hd), wk=w(H, nkv * hd), wv=w(H, nkv * hd), wo=w(nh * hd, H),
                         router=w(H, spec.n_experts),
                         n1=torch.ones(H, dtype=dtype, device=self.device),
                         n2=torch.ones(H, dtype=dtype, device=self.device))
            if S:
                layer.update(s1=w(H, S), s3=w(H, S), s2=w(S, H))
            self.layers.append(layer)
        numel = 3 * H * spec.expert_ffn
        # Host experts can be shared between replays of one model (pinning 90 GB takes a while).
        self.host_experts = host_experts or [[w(numel, host=True) for _ in range(spec.n_experts)]
                                             for _ in range(spec.n_moe_layers)]
        self.cache = ExpertCache(self.host_experts, n_slots, self.device, dtype,
                                 n_staging=min(spec.top_k, max(n_slots - 1, 0)))
        elt = torch.tensor([], dtype=dtype).element_size()
        self.dense_bytes = sum(t.numel() for layer in self.layers for t in layer.values()) * elt \
            + (self.embed.numel() + (0 if self.head is self.embed else self.head.numel()) + self.norm.numel()) * elt
        self.miss_mode = "fetch"        # router routing: what a router's pick of an absent expert gets
        self.norm_topk = True           # router routing: renormalise the top-k weights (Mixtral)
        self.qk_norm = None             # real weights: RMSNorm of q and k, "full" (OLMoE) or "head" (Qwen3)
        self.router_stats = dict(routes=0, misses=0, reroutes=0)
        self.kv: dict[int, list] = {}    # request index -> per layer [k, v] buffers
        self._kv_bytes = 0               # kept as buffers come and go: read every step

    # ---- KV cache ----------------------------------------------------------------------------
    def kv_alloc(self, rid: int, tokens: int) -> None:
        """Hold room for a request's first `tokens` tokens, in whole blocks of KV_BLOCK_TOKENS (as a
        paged KV cache holds them: a request's KV grows with its tokens, not reserved for its whole
        output up front). A request that outgrows its blocks gets a larger buffer, its KV copied over."""
        held = self.kv.get(rid)
        have = held[0][0].shape[0] if held else 0
        if tokens <= have:
            return
        s, n = self.spec, -(-tokens // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
        grown = []
        for li in range(s.n_moe_layers):
            kv = [torch.empty(n, s.n_kv_heads, s.hd, dtype=self.dtype, device=self.device) for _ in range(2)]
            if held:
                kv[0][:have], kv[1][:have] = held[li]
            grown.append(tuple(kv))
        if held:
            self._kv_bytes -= self._request_kv_bytes(rid)
        self.kv[rid] = grown
        self._kv_bytes += self._request_kv_bytes(rid)

    def kv_free(self, rid: int) -> None:
        if rid in self.kv:
            self._kv_bytes -= self._request_kv_bytes(rid)
            del self.kv[rid]

    def _request_kv_bytes(self, rid: int) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv[rid])

    def kv_bytes(self) -> int:
        return self._kv_bytes

    # ---- the parts of a layer (timed separately by `emoe profile`) -------------------------------
    def attention(self, li: int, x, segments, rope=None):
        """Pre-norm attention of layer li over the step's tokens, appending to each request's KV.
        rope: the step's rotary tables (rope_tables), computed here if not given."""
        s, layer, dev = self.spec, self.layers[li], self.device
        nh, nkv, hd = s.n_heads, s.n_kv_heads, s.hd
        h = _rms(x, layer["n1"], self.rms_eps)
        q, k = h @ layer["wq"], h @ layer["wk"]
        if self.qk_norm == "full":
            q, k = _rms(q, layer["qn"], self.rms_eps), _rms(k, layer["kn"], self.rms_eps)
        q, k = q.view(-1, nh, hd), k.view(-1, nkv, hd)
        if self.qk_norm == "head":
            q, k = _rms(q, layer["qn"], self.rms_eps), _rms(k, layer["kn"], self.rms_eps)
        v = (h @ layer["wv"]).view(-1, nkv, hd)
        cos, sin = rope if rope is not None else self.rope_tables(segments)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        att = torch.empty_like(q)
        for rid, start, n, pos in segments:
            kb, vb = self.kv[rid][li]
            kb[pos:pos + n] = k[start:start + n]
            vb[pos:pos + n] = v[start:start + n]
            kk = kb[:pos + n].transpose(0, 1).repeat_interleave(nh // nkv, dim=0)
            vv = vb[:pos + n].transpose(0, 1).repeat_interleave(nh // nkv, dim=0)
            qq = q[start:start + n].transpose(0, 1)
            mask = None
            if n > 1:   # causal within the chunk, full view of earlier context
                mask = torch.ones(n, pos + n, dtype=torch.bool, device=dev).tril(diagonal=pos)
            att[start:start + n] = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask).transpose(0, 1)
        x = x + att.reshape(-1, nh * hd) @ layer["wo"]
        h = _rms(x, layer["n2"], self.rms_eps)
        logits = h @ layer["router"]     # the router always runs (with forced routing its choice is unused)
        return x, h, logits

    def rope_tables(self, segments):
        """cos, sin of the rotary embedding at each token's position (once per step, shared by layers)."""
        pos = torch.cat([torch.arange(p, p + n) for _, _, n, p in segments]).to(self.device)
        ang = pos[:, None].float() * self.inv_freq[None, :]
        ang = torch.cat([ang, ang], dim=-1)[:, None, :]
        return ang.cos().to(self.dtype), ang.sin().to(self.dtype)

    def route(self, li: int, logits, planned=None):
        """The real router's choice (Mixtral: softmax, top-k, renormalised), served from the
        cache: a pick the policy neither keeps resident nor planned for (planned: (E,) bool)
        is a miss, fetched (streamed) or, under miss='reroute', replaced by the most
        probable resident expert."""
        k = self.spec.top_k
        probs = torch.softmax(logits.float(), dim=-1)
        g, r = probs.topk(k, dim=-1)
        resident = torch.zeros(probs.shape[-1], dtype=torch.bool, device=probs.device)
        resident[[e for (layer, e) in self.cache.slot_of if layer == li]] = True
        available = resident if planned is None or self.miss_mode == "reroute" \
            else resident | torch.as_tensor(planned, device=probs.device)
        absent = ~available[r]
        st = self.router_stats
        st["routes"] += r.numel()
        st["misses"] += int(absent.sum())
        if self.miss_mode == "reroute" and absent.any():
            st["reroutes"] += int(absent.any(dim=-1).sum())
            g, r = probs.masked_fill(~resident, -1.0).topk(k, dim=-1)
        if self.norm_topk:
            g = g / g.sum(dim=-1, keepdim=True)
        return r, g.to(self.dtype)

    def shared(self, li: int, h):
        """Layer li's shared experts (every token), or 0 where the model has none."""
        layer = self.layers[li]
        if "s1" not in layer:
            return 0
        return (F.silu(h @ layer["s1"]) * (h @ layer["s3"])) @ layer["s2"]

    def experts(self, li: int, h, r_l, g_l, after=None, streamed=None):
        """Routed experts of layer li: r_l, g_l (n, k) experts and gates. By the copy rule the
        layer computes once all its cached experts have landed; experts the cache does not
        hold (no room, or router routing: picked, not planned) stream through the staging
        slots as demand copies (`streamed`: [(expert, copy)] issued at the router, else
        here), each computed as it lands and its slot freed after use."""
        cache = self.cache
        out = torch.zeros_like(h)
        experts = torch.unique(r_l).tolist()
        if streamed is None:
            streamed = self.stream_missing(li, experts, after)
        held = [e for e in experts if (li, e) in cache.slot_of]
        cache.wait([cache.copy_of.get((li, e)) for e in held])
        for e in held:
            self._expert(li, e, h, r_l, g_l, out, cache.slot_of[(li, e)])
        for e, copy in streamed:
            cache.wait([copy])
            self._expert(li, e, h, r_l, g_l, out, copy.slot)
            cache.release_slot(copy.slot)
        return out

    def stream_missing(self, li: int, experts, after=None) -> list:
        """Demand copies of the layer's experts the cache does not hold, through staging slots."""
        return [(e, self.cache.stream_in(li, e, after)) for e in experts if (li, e) not in self.cache.slot_of]

    def _expert(self, li, e, h, r_l, g_l, out, slot):
        s, cache = self.spec, self.cache
        tok, k = (r_l == e).nonzero(as_tuple=True)
        w1, w3, w2 = cache.weights(li, e, s.hidden, s.expert_ffn, slot)
        he = h[tok]
        y = (F.silu(he @ w1) * (he @ w3)) @ w2
        out.index_add_(0, tok, y * g_l[tok, k].unsqueeze(1))
        cache.mark_used(slot)

    # ---- one engine step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, token_ids, segments, routes, gates, sampled, load_plan, planned=None):
        """Run the stack on a step's tokens.

        segments: [(request index, start, n, position)] token ranges per request;
        routes/gates: (n, L, k) forced routing, or None for the model's own router;
        sampled: token positions that produce logits; load_plan: `at` (issue point ->
        prefetch copies, sim.policies.base: step start, as layer j starts, once its router
        has run), `demand` (per layer: copies into the cache issued once its router has
        run); experts used but not in the cache stream through a staging slot; planned:
        (L, E) experts the policy served this step (router routing counts picks outside it
        as misses). Copies go over the cache's link (replay/link.py). Returns (greedy next
        tokens of the sampled positions, (n, L, k) routes computed)."""
        dev = self.device
        x = self.embed[token_ids.to(dev)]
        forced = routes is not None
        if forced:
            routes_t = torch.as_tensor(routes, device=dev, dtype=torch.long)
            gates_t = torch.as_tensor(gates.astype("float32"), device=dev).to(self.dtype)
        taken = []
        rope = self.rope_tables(segments)
        cache = self.cache
        at = load_plan["at"]

        def issue(point, after):
            for layer, e in at.get(point, ()):
                cache.prefetch(layer, e, after)
        issue(-1, cache.issue_point() if -1 in at else None)
        for li in range(len(self.layers)):
            if 2 * li in at:
                issue(2 * li, cache.issue_point())
            cache.layer, a0 = li, cache.stamp()
            x, h, logits = self.attention(li, x, segments, rope)
            if a0 is not None:
                cache.events.append(("attention", li, None, a0, cache.stamp()))
            router = cache.issue_point()      # CUDA: demand copies start once the router has run
            for le in load_plan["demand"][li]:
                cache.fetch(*le, after=router)
            if forced:
                r_l, g_l = routes_t[:, li, :], gates_t[:, li, :]
            else:
                r_l, g_l = self.route(li, logits, None if planned is None else planned[li])
                taken.append(r_l)
            experts = torch.unique(r_l).tolist()
            cache.promote(li, experts)      # queued prefetches it needs: demand, ahead of the streamed copies
            streamed = self.stream_missing(li, experts, router)                  # demand, before prefetches
            issue(2 * li + 1, router)
            e0 = cache.stamp()
            x = x + self.experts(li, h, r_l, g_l, router, streamed) + self.shared(li, h)
            if e0 is not None:
                cache.events.append(("experts", li, None, e0, cache.stamp()))
        next_tokens = None
        if len(sampled):
            next_tokens = (_rms(x[sampled], self.norm, self.rms_eps) @ self.head.T).argmax(dim=-1)
        return next_tokens, (torch.stack(taken, dim=1) if taken else None)


def _rotate(t, cos, sin):
    """Rotary position embedding, rotate-half form (Mixtral, Llama), on the first cos.shape[-1] dims."""
    r = cos.shape[-1]
    t1, t2 = t[..., : r // 2], t[..., r // 2: r]
    rotated = t[..., :r] * cos + torch.cat([-t2, t1], dim=-1) * sin
    return rotated if r == t.shape[-1] else torch.cat([rotated, t[..., r:]], dim=-1)


def _rms(x, w, eps: float = 1e-5):
    xf = x.float()       # in float32, as Hugging Face's RMSNorm
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
