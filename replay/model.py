"""An MoE decoder stack in PyTorch at a scenario's dimensions, with experts offloaded.

Dense weights (embeddings, attention, norms, routers, shared experts, LM head) live on
the device. (Not modelled: DeepSeek's dense first layers and MLA attention.)
Every routed expert lives in host memory (pinned on CUDA) as one flat tensor
(w1 | w3 | w2), so a load is one copy. The device holds an ExpertCache: a pool of
slots the policy's resident experts occupy, plus a staging slot per top-k for
experts streamed through a full cache. Weights are random unless real ones are
loaded (replay/weights.py): memory and time do not depend on the values. Routing
is forced from the trace, or with real weights decided by the model's own router
as each layer runs (`step(..., routes=None)`).
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F


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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ExpertCache:
    """Device slots for experts; copies on a dedicated stream guarded by events."""

    def __init__(self, host_experts, n_slots: int, device, dtype):
        self.host = host_experts                    # [layer][expert] flat tensors
        self.numel = host_experts[0][0].numel()
        self.device = device
        self.cuda = device.type == "cuda"
        self.pool = torch.empty((n_slots, self.numel), dtype=dtype, device=device)
        self.free = list(range(n_slots - 1, -1, -1))
        self.slot_of: dict[tuple[int, int], int] = {}
        self.ready: dict[int, object] = {}          # slot -> copy-done event
        self.in_use: dict[int, object] = {}         # slot -> compute-done event
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.bytes_copied = 0
        self.copy_s = 0.0                           # CPU: timed copies; CUDA: from events
        self.copies = 0
        self._timing: list = []

    @property
    def slot_bytes(self) -> int:
        return self.numel * self.pool.element_size()

    def resident(self) -> int:
        return len(self.slot_of)

    def load(self, layer: int, expert: int, after=None) -> None:
        """Copy an expert into a free slot; `after`: an event the copy must wait for."""
        if (layer, expert) in self.slot_of:
            return
        if not self.free:
            raise RuntimeError("expert cache has no free slot: a policy exceeded its capacity")
        slot = self.free.pop()
        self.slot_of[(layer, expert)] = slot
        src = self.host[layer][expert]
        if self.cuda:
            with torch.cuda.stream(self.stream):
                if after is not None:
                    self.stream.wait_event(after)
                if slot in self.in_use:             # never overwrite a slot still being read
                    self.stream.wait_event(self.in_use.pop(slot))
                start = torch.cuda.Event(enable_timing=True)
                done = torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
                self.pool[slot].copy_(src, non_blocking=True)
                done.record(self.stream)
            self.ready[slot] = done
            self._timing.append((start, done))
        else:
            t0 = time.perf_counter()
            self.pool[slot].copy_(src)
            self.copy_s += time.perf_counter() - t0
        self.bytes_copied += self.slot_bytes
        self.copies += 1

    def evict(self, layer: int, expert: int) -> None:
        slot = self.slot_of.pop((layer, expert), None)
        if slot is not None:
            self.ready.pop(slot, None)
            self.free.append(slot)

    def weights(self, layer: int, expert: int, hidden: int, ffn: int):
        """(w1, w3, w2) views; on CUDA the compute stream first waits for the copy."""
        slot = self.slot_of[(layer, expert)]
        if self.cuda and slot in self.ready:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        flat = self.pool[slot]
        n = hidden * ffn
        return flat[:n].view(hidden, ffn), flat[n:2 * n].view(hidden, ffn), flat[2 * n:].view(ffn, hidden)

    def mark_used(self, layer: int, expert: int) -> None:
        """Record that compute has been queued on this slot (it may not be overwritten before)."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.in_use[self.slot_of[(layer, expert)]] = ev

    def collect_copy_time(self) -> None:
        """CUDA: add up finished copies' event times (call after a synchronize)."""
        for start, done in self._timing:
            self.copy_s += start.elapsed_time(done) / 1e3
        self._timing.clear()


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
        self.head = w(spec.vocab, H)
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
        self.cache = ExpertCache(self.host_experts, n_slots, self.device, dtype)
        elt = torch.tensor([], dtype=dtype).element_size()
        self.dense_bytes = sum(t.numel() for layer in self.layers for t in layer.values()) * elt \
            + (self.embed.numel() + self.head.numel() + self.norm.numel()) * elt
        self.miss_mode = "fetch"        # router routing: what a router's pick of an absent expert gets
        self.norm_topk = True           # router routing: renormalise the top-k weights (Mixtral)
        self.qk_norm = None             # real weights: RMSNorm of q and k, "full" (OLMoE) or "head" (Qwen3)
        self.router_stats = dict(routes=0, misses=0, reroutes=0)
        self.kv: dict[int, list] = {}    # request index -> per layer [k, v] buffers
        self._kv_bytes = 0               # kept as buffers come and go: read every step

    # ---- KV cache ----------------------------------------------------------------------------
    def kv_alloc(self, rid: int, max_tokens: int) -> None:
        if rid in self.kv:
            return
        s = self.spec
        self.kv[rid] = [(torch.empty(max_tokens, s.n_kv_heads, s.hd, dtype=self.dtype, device=self.device),
                         torch.empty(max_tokens, s.n_kv_heads, s.hd, dtype=self.dtype, device=self.device))
                        for _ in range(s.n_moe_layers)]
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

    def experts(self, li: int, h, r_l, g_l, after=None):
        """Routed experts of layer li: r_l, g_l (n, k) forced experts and gates."""
        s, cache = self.spec, self.cache
        out = torch.zeros_like(h)
        for e in torch.unique(r_l).tolist():
            streamed = (li, e) not in cache.slot_of   # (router routing: picked, not predicted)
            if streamed:     # did not fit the cache: through a staging slot, dropped after use
                cache.load(li, e, after=after)
            tok, slot = (r_l == e).nonzero(as_tuple=True)
            w1, w3, w2 = cache.weights(li, e, s.hidden, s.expert_ffn)
            he = h[tok]
            y = (F.silu(he @ w1) * (he @ w3)) @ w2
            out.index_add_(0, tok, y * g_l[tok, slot].unsqueeze(1))
            cache.mark_used(li, e)
            if streamed:
                cache.evict(li, e)
        return out

    # ---- one engine step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, token_ids, segments, routes, gates, sampled, load_plan, planned=None):
        """Run the stack on a step's tokens.

        segments: [(request index, start, n, position)] token ranges per request;
        routes/gates: (n, L, k) forced routing, or None for the model's own router;
        sampled: token positions that produce logits; load_plan: `at` (issue point ->
        prefetch copies, sim.policies.base), `demand` (per layer, issued once its router
        ran); experts used but not in the cache stream through a staging slot; planned:
        (L, E) experts the policy served this step (router routing counts picks outside it
        as misses). Returns (greedy next tokens of the sampled positions, (n, L, k) routes
        computed)."""
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
        for le in at.get(-1, ()):
            cache.load(*le)
        for li in range(len(self.layers)):
            for le in at.get(2 * li, ()):
                cache.load(*le)
            x, h, logits = self.attention(li, x, segments, rope)
            after = None
            if cache.cuda and (load_plan["demand"][li] or at.get(2 * li + 1)):
                after = torch.cuda.Event()
                after.record(torch.cuda.current_stream(dev))   # demand copies start once the router ran
            for le in load_plan["demand"][li]:
                cache.load(*le, after=after)
            for le in at.get(2 * li + 1, ()):
                cache.load(*le, after=after)
            if forced:
                r_l, g_l = routes_t[:, li, :], gates_t[:, li, :]
            else:
                r_l, g_l = self.route(li, logits, None if planned is None else planned[li])
                taken.append(r_l)
            x = x + self.experts(li, h, r_l, g_l, after) + self.shared(li, h)
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
