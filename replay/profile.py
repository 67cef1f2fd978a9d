"""`emoe profile`: measure what the simulator's cost model needs, on this device.

- host-to-device copies by size through the replay's own link (replay/link.py: a
  demand copy issued, copied by the link thread, waited for; pinned host memory on
  CUDA): t = latency + bytes / bandwidth, fitted in relative error and then moved to
  pass through the measured copy of one of the model's experts, the one size the
  simulator copies;
- for one model shape (the replayed one), using the replayer's own code: a layer's
  routed experts by active experts and token-expert pairs (layer + a * active +
  b * pairs; the per-layer part joins the attention block's constant, since both
  are paid once per layer), one layer's attention block by tokens, context and
  requests, prompt chunks' context apart (a + b * tokens + c * context + d * requests
  + e * prefill context: a chunk's scores cost more per element than a decode token's);
- per-step overhead: a short calibration replay whose step times, less the modelled
  layers and the measured waits for copies, are fitted in the cost model's form
  a + b * sampled + c * tokens (engine, policy, embedding; per request sampled; per
  token); its prompt chunks also give the part of the prefill-context coefficient e
  the one-layer cases miss (the cost of a chunk's scores jumps once they leave the cache).
  The policy's own host work per step is part of it, so `emoe confirm`
  calibrates with the scenario's own policy and scheduler.

Measured to hold on a busy machine: the thread count is fixed (and recorded, so the
replay uses the same), every set of cases is timed in interleaved rounds (a slow spell
spreads over all cases instead of biasing one), each case is the median of its rounds
after dropping delays beyond 3 MADs, and every part records its relative spread; a
profile whose spread exceeds NOISY says so (`info.noisy`) and `emoe profile` warns.

The YAML it writes is a hardware profile: `hardware: {profile: PROFILE.yaml}` in a
scenario. Its `measured` section applies to the model shape it names.
"""
from __future__ import annotations

import platform
from dataclasses import replace
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from replay.model import KV_BLOCK_TOKENS, ReplayModel


NOISY = 0.10   # relative spread (MAD / median) above which a profile is not trusted


def _once(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def robust(samples) -> tuple[float, float]:
    """(median after rejecting outliers, relative spread MAD / median) of repeated timings.

    A busy machine adds delays, never removes them: samples beyond median + 3 scaled MADs
    (a burst of other work) are dropped before the median."""
    x = np.asarray(samples, dtype=float)
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med))) * 1.4826
    kept = x[x <= med + 3 * mad] if mad > 0 else x
    med = float(np.median(kept))
    spread = float(np.median(np.abs(kept - med)) * 1.4826 / med) if med > 0 else 0.0
    return med, spread


def interleaved(fns: list, device, rounds: int = 9, warmup: int = 2) -> tuple[list[float], list[float]]:
    """Time every function `rounds` times, interleaved (round r runs each once, in a rotated
    order), so a slow spell of the machine spreads over all of them instead of biasing one.
    Returns (robust medians, relative spreads), one per function."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples = [[] for _ in fns]
    n = len(fns)
    for r in range(rounds):
        for j in range(n):
            i = (j + r) % n
            samples[i].append(_once(fns[i], device))
    out = [robust(s) for s in samples]
    return [m for m, _ in out], [sp for _, sp in out]


def _link_copy(cache, n_sources: int):
    """One demand copy through the replay's own link (replay/link.py), as a layer sees it:
    issued, copied by the link thread, waited for. Sources alternate, as experts do."""
    state = {"i": 0}

    def fn():
        e = state["i"] % n_sources
        state["i"] += 1
        cache.load(0, e)
        cache.evict(0, e)
    return fn


def copy_profile(device, max_bytes: int) -> dict:
    """Copies by size through the replay's link (pinned host memory on CUDA, as the replay
    keeps its experts), and on CUDA also plain pageable copies for reference. The line
    latency + bytes / bandwidth is fitted to the link copies in relative terms (a least-squares
    fit in seconds is decided by the largest copies alone and leaves the latency to noise)."""
    from replay.model import ExpertCache
    sizes = [2 ** p for p in range(12, int(np.log2(max_bytes)) + 1, 2)]
    cuda = device.type == "cuda"
    cases, fns, caches = [], [], []
    for nbytes in sizes:
        n = nbytes // 4
        srcs = [torch.randn(n).pin_memory() if cuda else torch.randn(n) for _ in range(2)]
        cache = ExpertCache([srcs], 1, device, torch.float32)
        caches.append(cache)
        cases.append((nbytes, cuda, "link"))
        fns.append(_link_copy(cache, 2))
        if cuda:
            dst, src = torch.empty(n, dtype=torch.float32, device=device), torch.randn(n)
            cases.append((nbytes, False, "direct"))
            fns.append(lambda dst=dst, src=src: dst.copy_(src))
    times, spreads = interleaved(fns, device)
    rows = [dict(bytes=nb, pinned=pin, via=via, seconds=t, bytes_per_s=nb / t, spread=sp)
            for (nb, pin, via), t, sp in zip(cases, times, spreads)]
    for c in caches:
        c.link.close()
    latency, bw = fit_copy_line([r["bytes"] for r in rows if r["via"] == "link"],
                                [r["seconds"] for r in rows if r["via"] == "link"])
    return dict(table=rows, latency_s=latency, bytes_per_s=bw,
                spread=float(np.median([r["spread"] for r in rows if r["via"] == "link"])))


def fit_copy_line(nbytes, seconds) -> tuple[float, float]:
    """(latency, bandwidth) of t = latency + bytes / bandwidth, least squares in relative error."""
    x, y = np.asarray(nbytes, dtype=float), np.asarray(seconds, dtype=float)
    slope, icpt = np.polyfit(x, y, 1, w=1 / y)
    if slope <= 0:
        return max(float(y.min()), 1e-7), float(x[-1] / y[-1])
    return max(float(icpt), 1e-7), float(1 / slope)


def through_expert_copy(latency: float, bw: float, nbytes: float, seconds: float) -> tuple[float, float]:
    """The copy line moved to pass through the measured copy of one expert (the only size the
    simulator copies): keep the fitted bandwidth and set the latency, or, where that would be
    negative, keep the smallest latency and set the bandwidth."""
    lat = seconds - nbytes / bw
    if lat >= 1e-7:
        return lat, bw
    lat = min(latency, seconds / 2)
    return lat, nbytes / (seconds - lat)


def expert_cases(n_experts: int, top_k: int) -> list[tuple[int, int]]:
    """(active experts, tokens) of the expert profile: tokens spread over the active experts."""
    actives = sorted({1, min(2, n_experts), min(4, n_experts), n_experts})
    return [(a, t) for a in actives for t in (1, 4, 16, 64, 256) if t * min(top_k, a) >= a]


def model_profile(spec, device, dtype) -> dict:
    # One layer times like any other: build just one (a full model's host experts take minutes).
    one = replace(spec, n_layers=1, n_moe_layers=1)
    E = spec.n_experts
    rt = ReplayModel(one, str(device), dtype, seed=0, n_slots=E + spec.top_k)   # as the replay: + top_k staging
    H = spec.hidden
    k = spec.top_k
    # A demand copy of one expert, through the replay's link (evicted again, the slot reused).
    rt.cache.load(0, 0)
    rt.cache.evict(0, 0)
    (copy_s,), (copy_sp,) = interleaved([_link_copy(rt.cache, E)], device, rounds=15)
    for e in range(E):
        rt.cache.load(0, e)
    # A layer's routed experts (the replayer's own code path) by active experts and token-expert
    # pairs: t = layer + a * active + b * pairs. `layer` is paid once per MoE layer whatever the
    # routing (it goes to the attention block's constant); a and b per expert and per pair.
    fns, rows = [], []
    for active, t in expert_cases(E, k):
        kk = min(k, active)
        h = torch.randn(t, H, dtype=dtype, device=device)
        r = (torch.arange(t * kk, device=device) % active).view(t, kk)
        g = torch.full((t, kk), 1.0 / kk, dtype=dtype, device=device)
        fns.append(lambda h=h, r=r, g=g: rt.experts(0, h, r, g))
        rows.append([1.0, active, t * kk])
    ex_y, ex_sp = interleaved(fns, device)
    coef = _nonnegative_lstsq(np.array(rows), np.array(ex_y))
    expert = dict(a=float(coef[1]), b=float(coef[2]), layer=float(coef[0]))
    spreads = dict(expert_s=float(np.median(ex_sp)), expert_copy_s=float(copy_sp))
    shared = None
    if spec.n_shared_experts:   # shared experts by tokens (every token, every MoE layer)
        ex_x = [1, 4, 16, 64, 256]
        hs = [torch.randn(t, H, dtype=dtype, device=device) for t in ex_x]
        sh_y, sh_sp = interleaved([lambda h=h: rt.shared(0, h) for h in hs], device)
        b, a = np.polyfit(ex_x, sh_y, 1)
        shared = dict(a=max(float(a), 0.0), b=max(float(b), 0.0))
        spreads["shared_s"] = float(np.median(sh_sp))
    # One layer's attention block by tokens, context and requests, and the context prompt chunks
    # attend to apart (a chunk's scores, tokens x context, cost more per element than a decode
    # token's once they leave the cache: the prefill-heavy steps). Each case's requests get their
    # own ids, so every case's KV stays allocated while all cases are timed interleaved.
    rows, fns, rid0 = [], [], 0
    for n_req, n, ctx in [(1, 1, 16), (1, 1, 256), (1, 1, 1024), (4, 1, 256), (8, 1, 256), (16, 1, 128),
                          (8, 1, 1024), (1, 16, 0), (1, 64, 0), (1, 128, 0), (1, 256, 0), (1, 512, 0),
                          (2, 128, 128), (3, 192, 0), (1, 128, 384)]:
        for rid in range(rid0, rid0 + n_req):
            rt.kv_alloc(rid, ctx + n + 1)
        segs = [(rid, (rid - rid0) * n, n, ctx) for rid in range(rid0, rid0 + n_req)]
        rid0 += n_req
        x = torch.randn(n_req * n, H, dtype=dtype, device=device)
        with torch.no_grad():   # rotary tables are made once per step, not per layer: not timed here
            rope = rt.rope_tables(segs)
        fns.append(lambda x=x, segs=segs, rope=rope: rt.attention(0, x, segs, rope))
        ctx_sum = n_req * (n * ctx + n * (n + 1) / 2)
        rows.append([1.0, n_req * n, ctx_sum, n_req, ctx_sum if n > 1 else 0.0])
    with torch.no_grad():
        ys, at_sp = interleaved(fns, device)
    spreads["attention_s"] = float(np.median(at_sp))
    coef = _nonnegative_lstsq(np.array(rows), np.array(ys))
    # The experts' per-layer part rides with the attention block's constant: both once per layer.
    attention = dict(a=float(coef[0]) + expert["layer"], b=float(coef[1]), c=float(coef[2]), d=float(coef[3]),
                     e=float(coef[4]))
    rt.cache.link.close()
    shape = {f: getattr(spec, f) for f in ("name", "hidden", "expert_ffn", "n_moe_layers", "n_experts", "top_k",
                                           "n_heads", "n_kv_heads", "dtype_bytes", "n_shared_experts")}
    out = dict(model=shape, expert_s=expert, attention_s=attention, expert_copy_s=float(copy_s), spread=spreads)
    if shared:
        out["shared_s"] = shared
    return out


def _nonnegative_lstsq(X: np.ndarray, y: np.ndarray, relative: bool = True) -> np.ndarray:
    """Least squares (in relative error, or in y's units) with every coefficient >= 0 (a negative
    cost is noise): refit without the columns that came out negative."""
    keep = np.ones(X.shape[1], dtype=bool)
    w = 1 / y if relative else np.ones_like(y)
    while True:
        coef = np.zeros(X.shape[1])
        sol, *_ = np.linalg.lstsq(X[:, keep] * w[:, None], y * w, rcond=None)
        coef[keep] = sol
        if (coef >= 0).all() or keep.sum() == 1:
            return np.maximum(coef, 0.0)
        keep &= coef > 0


def layer_seconds(measured: dict, timeline, n_layers: int):
    """What the profile's layer functions charge for each step of a timeline (attention and
    routed experts of every MoE layer, shared experts where the model has them)."""
    a, e = measured["attention_s"], measured["expert_s"]
    layers = n_layers * attention_seconds(a, timeline) + e["a"] * timeline.active_experts \
        + e["b"] * timeline.tokens * measured["model"]["top_k"]
    if "shared_s" in measured:
        layers = layers + n_layers * (measured["shared_s"]["a"] + measured["shared_s"]["b"] * timeline.tokens)
    return layers


def attention_seconds(a: dict, timeline):
    """One layer's attention for each step of a timeline, as sim/costmodel.py attention_s charges
    it (e: prompt chunks' context, absent from older profiles and timelines)."""
    t = a["a"] + a["b"] * timeline.tokens + a["c"] * timeline.attn_ctx + a["d"] * timeline.batch_requests
    if a.get("e") and "prefill_ctx" in timeline:
        t = t + a["e"] * timeline.prefill_ctx
    return t


def step_wall(timeline):
    """Each step's wall time, from its start to the next step's (the engine's own work between
    steps included); the last step's own duration."""
    return timeline.t_s.diff().shift(-1).fillna(timeline.step_s)


def busy_steps(timeline) -> np.ndarray:
    """Steps the next one followed at once: not those after which the engine idled until an
    arrival (their gap is far beyond the engine's usual work between steps)."""
    gap = (step_wall(timeline) - timeline.step_s).to_numpy()
    return gap <= 5 * np.median(gap) + 1e-3


def _trimmed_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) >= 0 of y = intercept + slope * x, least squares in y's units after
    dropping points more than 3 MADs off the line (a step a burst of other work delayed)."""
    intercept, slope = _trimmed_fit(np.stack([np.ones(len(x)), x], axis=1), y)
    return intercept, slope


def fit_step_overhead(measured: dict, timeline, n_layers: int) -> dict:
    """Per-step time the layers do not explain, from a calibration replay's timeline, in the cost
    model's own form (sim/costmodel.py, fixed_s): a + b * sampled + c * tokens, where tokens are
    all the step's tokens (decode tokens count too, as the cost model charges them).

    a: the engine, policy and scheduler, embedding; b: per request that samples a token (its LM
    head row, the engine's per-request work, and on a busy machine the preemptions a request's
    share of the layers suffers, which the layer medians leave out); c: per token (prompt chunks
    carry most). On a decode-only step of D requests the form is a + (b + c) * D, so decode steps
    give a and b + c (a line through them, the steps a burst delayed left out); steps with prompt
    chunks then give c and prefill_e (least squares on per token and on per layer and unit of
    prompt-chunk context, the steps a burst delayed left out; with under 3 such steps c alone, a
    median), and b = (b + c) - c. prefill_e is attention the profile's chunk cases did not price
    (added to attention_s's e). The first step (warming up) and steps after which the engine
    idled until an arrival are left out."""
    if len(timeline) > 4:   # the first step warms up (first use of every layer, allocations): not typical
        timeline = timeline.iloc[1:]
    layers = layer_seconds(measured, timeline, n_layers).to_numpy()
    # Wall time from one step's start to the next covers the engine's own work too; the measured
    # wait for expert copies is the copy rule's, which the simulator charges itself.
    wall = (step_wall(timeline) - timeline.stall_s).to_numpy()
    busy = busy_steps(timeline)
    tl, resid, wall = timeline[busy], (wall - layers)[busy], wall[busy]
    decode = (tl.prefill_tokens == 0).to_numpy()
    if decode.sum() >= 2:
        a, per_request = _trimmed_line(tl.sampled.to_numpy(float)[decode], resid[decode])
    else:
        a, per_request = max(float(np.median(resid)), 0.0), 0.0
    c = e = 0.0
    pre = ~decode
    if pre.any():
        p = tl[pre]
        d = p.tokens.to_numpy(float) - p.prefill_tokens.to_numpy(float)          # decode tokens in the step
        done = p.sampled.to_numpy(float) - d                                      # prompts finishing
        y = resid[pre] - a - per_request * d - per_request * done
        per_token = np.maximum(p.prefill_tokens.to_numpy(float) - done, 1.0)
        if pre.sum() >= 3 and "prefill_ctx" in p:
            # The scenario's own prompt chunks: per token (c) and, per layer, per unit of the context
            # they attend to (e, beyond what the attention cases priced: a chunk's scores out of cache).
            c, e = _trimmed_fit(np.stack([per_token, n_layers * p.prefill_ctx.to_numpy(float)], axis=1), y)
            c = min(c, per_request) if per_request > 0 else c
        else:
            c = float(np.clip(np.median(y / per_token), 0.0, per_request)) if per_request > 0 \
                else max(float(np.median(y / p.prefill_tokens.to_numpy(float))), 0.0)
    b = max(per_request - c, 0.0)
    # How steady the calibration replay ran: the unexplained part's spread relative to a step.
    r = resid - (a + b * tl.sampled.to_numpy(float) + c * tl.tokens.to_numpy(float)
                 + e * n_layers * (tl.prefill_ctx.to_numpy(float) if "prefill_ctx" in tl else 0.0))
    spread = float(np.median(np.abs(r - np.median(r))) * 1.4826 / np.median(wall)) if len(r) > 2 else 0.0
    return dict(a=a, b=b, c=c, spread=spread, prefill_e=e)


def _trimmed_fit(X: np.ndarray, y: np.ndarray) -> tuple[float, ...]:
    """Coefficients >= 0 of y = X @ coef (no intercept), least squares in y's units after dropping
    points more than 3 MADs off (a step a burst of other work delayed)."""
    keep = np.ones(len(y), dtype=bool)
    coef = _nonnegative_lstsq(X, y, relative=False)
    for _ in range(3):
        r = y - X @ coef
        mad = float(np.median(np.abs(r[keep] - np.median(r[keep])))) * 1.4826
        if mad <= 0 or len(y) < 8:
            break
        keep = np.abs(r - np.median(r[keep])) <= 3 * mad
        coef = _nonnegative_lstsq(X[keep], y[keep], relative=False)
    return tuple(float(v) for v in coef)


def run_profile(device: str, spec, dtype, calibration_scenario: dict | None, max_copy_bytes: int,
                scale: int = 1, host_experts: dict | None = None, threads: int | None = None,
                say=lambda message: None) -> dict:
    """say: told each stage as it starts (a profile takes minutes on a CPU)."""
    dev = torch.device(device)
    t0 = time.time()
    # CPU timings depend on the thread count: fix it, record it, and the replay uses the same.
    before = torch.get_num_threads()
    threads = int(threads or before)
    torch.set_num_threads(threads)
    try:
        return _profile(dev, spec, dtype, calibration_scenario, max_copy_bytes, scale, host_experts, threads, t0,
                        say)
    finally:
        torch.set_num_threads(before)


def _profile(dev, spec, dtype, calibration_scenario, max_copy_bytes, scale, host_experts, threads, t0,
             say) -> dict:
    device = str(dev)
    n = 2 if calibration_scenario is None else 3        # stages
    say(f"profile 1/{n}: host-to-device copies up to {max_copy_bytes / 2 ** 20:.0f} MiB on {device}")
    copies = copy_profile(dev, max_copy_bytes)
    say(f"profile 2/{n}: {spec.name}'s layers (attention, experts, shared experts, copies through the link)")
    measured = model_profile(spec, dev, dtype)
    # The simulator copies one size, an expert: the copy line goes through its measured copy.
    copies["latency_s"], copies["bytes_per_s"] = through_expert_copy(
        copies["latency_s"], copies["bytes_per_s"], spec.bytes_per_expert, measured["expert_copy_s"])
    measured["step_s"] = dict(a=0.0, b=0.0, c=0.0)
    if calibration_scenario is not None:
        say(f"profile 3/{n}: replaying the calibration scenario for the step overhead "
            f"({time.time() - t0:.0f} s so far)")
        from replay.run import replay_scenario
        res = replay_scenario(calibration_scenario, device, scale, str(dtype).replace("torch.", ""),
                              host_experts=host_experts)
        measured["step_s"] = fit_step_overhead(measured, res.timeline, spec.n_moe_layers)
        measured["spread"]["step_s"] = measured["step_s"].pop("spread")
        # Prompt chunks' attention beyond what the attention cases priced (their scores leave the cache).
        measured["attention_s"]["e"] += measured["step_s"].pop("prefill_e")
    measured["threads"] = threads
    measured["kv_block_tokens"] = KV_BLOCK_TOKENS   # how the replay holds KV: the simulator's ledger counts the same
    measured["spread"]["copies"] = copies["spread"]
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()})")
    mem = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else _host_memory()
    hw = dict(name=f"profile:{name}", memory_bytes=float(mem), hbm_bytes_per_s=float(copies["bytes_per_s"]),
              flops_per_s=1e12, h2d_bytes_per_s=copies["bytes_per_s"], h2d_latency_s=copies["latency_s"],
              count=1, flops_efficiency=1.0, hbm_efficiency=1.0, layer_overhead_s=0.0,
              step_overhead_s=measured["step_s"]["a"])
    noisy = {k: round(v, 3) for k, v in measured["spread"].items() if v > NOISY}
    return dict(hardware=hw, measured=measured, copies=copies["table"],
                info=dict(device=name, torch=str(torch.__version__), seconds=round(time.time() - t0, 1),
                          measured_at=time.strftime("%Y-%m-%d %H:%M:%S"), threads=threads,
                          load_average=_load_average(), noisy=noisy))


def _load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load when the profile was taken (others' work skews timings)."""
    try:
        import os
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _host_memory() -> int:
    try:
        return int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        return 16 * 2 ** 30


def write_profile(profile: dict, path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(profile, sort_keys=False))
    tmp.replace(p)
    return p
