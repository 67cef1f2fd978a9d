"""`emoe profile`: measure what the simulator's cost model needs, on this device.

- host-to-device copies by size, pinned and pageable: bandwidth and per-copy
  latency (t = latency + bytes / bandwidth, fitted on pinned copies);
- for one model shape (the replayed one): expert FFN time by tokens
  (a + b * tokens per active expert), one layer's attention block by tokens,
  context and requests (a + b * tokens + c * context + d * requests), using the
  replayer's own code;
- per-step overhead (engine, policy, embedding, LM head): a short replay whose
  step times minus the modelled layers are fitted to a + b * sampled + c * tokens.

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
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from replay.model import ReplayModel


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


def copy_profile(device, max_bytes: int) -> dict:
    sizes = [2 ** p for p in range(12, int(np.log2(max_bytes)) + 1, 2)]
    cases, fns = [], []
    for nbytes in sizes:
        n = nbytes // 4
        dst = torch.empty(n, dtype=torch.float32, device=device)
        for pinned in (True, False):
            src = torch.randn(n)
            if pinned and device.type == "cuda":
                src = src.pin_memory()
            cases.append((nbytes, pinned and device.type == "cuda"))
            fns.append(lambda dst=dst, src=src, nb=pinned and device.type == "cuda": dst.copy_(src, non_blocking=nb))
    times, spreads = interleaved(fns, device)
    rows = [dict(bytes=nb, pinned=pin, seconds=t, bytes_per_s=nb / t, spread=sp)
            for (nb, pin), t, sp in zip(cases, times, spreads)]
    pinned = [r for r in rows if r["pinned"]] or [r for r in rows if not r["pinned"]]
    x = np.array([r["bytes"] for r in pinned], dtype=float)
    y = np.array([r["seconds"] for r in pinned])
    slope, icpt = np.polyfit(x, y, 1)
    return dict(table=rows, latency_s=max(float(icpt), 1e-7), bytes_per_s=float(1 / slope) if slope > 0
                else float(x[-1] / y[-1]), spread=float(np.median([r["spread"] for r in pinned])))


def model_profile(spec, device, dtype) -> dict:
    # One layer times like any other: build just one (a full model's host experts take minutes).
    one = replace(spec, n_layers=1, n_moe_layers=1)
    rt = ReplayModel(one, str(device), dtype, seed=0, n_slots=1)
    rt.cache.load(0, 0)
    H = spec.hidden
    k = spec.top_k
    # Expert FFN by tokens (the replayer's own code path).
    ex_x = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    fns = []
    for t in ex_x:
        h = torch.randn(t, H, dtype=dtype, device=device)
        r = torch.zeros(t, 1, dtype=torch.long, device=device)      # one expert, each token once
        g = torch.ones(t, 1, dtype=dtype, device=device)
        fns.append(lambda h=h, r=r, g=g: rt.experts(0, h, r, g))
    ex_y, ex_sp = interleaved(fns, device)
    b, a = np.polyfit(ex_x, ex_y, 1)
    expert = dict(a=max(float(a), 0.0), b=max(float(b), 0.0))
    spreads = dict(expert_s=float(np.median(ex_sp)))
    shared = None
    if spec.n_shared_experts:   # shared experts by tokens (every token, every MoE layer)
        hs = [torch.randn(t, H, dtype=dtype, device=device) for t in ex_x]
        sh_y, sh_sp = interleaved([lambda h=h: rt.shared(0, h) for h in hs], device)
        b, a = np.polyfit(ex_x, sh_y, 1)
        shared = dict(a=max(float(a), 0.0), b=max(float(b), 0.0))
        spreads["shared_s"] = float(np.median(sh_sp))
    # One layer's attention block by tokens, context and requests.
    # Each case's requests get their own ids, so every case's KV stays allocated while all
    # cases are timed interleaved.
    rows, fns, rid0 = [], [], 0
    for n_req, n, ctx in [(1, 1, 16), (1, 1, 256), (1, 1, 1024), (4, 1, 256), (8, 1, 256), (16, 1, 128),
                          (1, 16, 0), (1, 64, 0), (1, 256, 0), (2, 128, 128), (8, 1, 1024)]:
        for rid in range(rid0, rid0 + n_req):
            rt.kv_alloc(rid, ctx + n + 1)
        segs = [(rid, (rid - rid0) * n, n, ctx) for rid in range(rid0, rid0 + n_req)]
        rid0 += n_req
        x = torch.randn(n_req * n, H, dtype=dtype, device=device)
        with torch.no_grad():   # rotary tables are made once per step, not per layer: not timed here
            rope = rt.rope_tables(segs)
        fns.append(lambda x=x, segs=segs, rope=rope: rt.attention(0, x, segs, rope))
        ctx_sum = n_req * (n * ctx + n * (n + 1) / 2)
        rows.append([1.0, n_req * n, ctx_sum, n_req])
    with torch.no_grad():
        ys, at_sp = interleaved(fns, device)
    spreads["attention_s"] = float(np.median(at_sp))
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)
    coef = np.maximum(coef, 0.0)
    attention = dict(a=float(coef[0]), b=float(coef[1]), c=float(coef[2]), d=float(coef[3]))
    shape = {f: getattr(spec, f) for f in ("name", "hidden", "expert_ffn", "n_moe_layers", "n_experts", "top_k",
                                           "n_heads", "n_kv_heads", "dtype_bytes", "n_shared_experts")}
    out = dict(model=shape, expert_s=expert, attention_s=attention, spread=spreads)
    if shared:
        out["shared_s"] = shared
    return out


def fit_step_overhead(measured: dict, timeline, n_layers: int) -> dict:
    """Per-step time the layers do not explain, from a calibration replay's timeline.

    Robust medians, not least squares: decode-only steps give the fixed overhead
    (engine, policy, embedding, LM head), steps with prompt chunks the extra cost
    per prefill token. (A free regression over noisy CPU timings swings wildly.)"""
    a, e = measured["attention_s"], measured["expert_s"]
    layers = n_layers * (a["a"] + a["b"] * timeline.tokens + a["c"] * timeline.attn_ctx
                         + a["d"] * timeline.batch_requests) + e["a"] * timeline.active_experts \
        + e["b"] * timeline.tokens * measured["model"]["top_k"]
    if "shared_s" in measured:
        layers = layers + n_layers * (measured["shared_s"]["a"] + measured["shared_s"]["b"] * timeline.tokens)
    # Wall time from one step's start to the next covers the engine's own work too.
    wall = timeline.t_s.diff().shift(-1).fillna(timeline.step_s)
    resid = (wall - layers).to_numpy()
    decode = (timeline.prefill_tokens == 0).to_numpy()
    base, _ = robust(resid[decode]) if decode.any() else robust(resid)
    pre = ~decode
    per_token = float(np.median((resid[pre] - base) / timeline.prefill_tokens.to_numpy()[pre])) if pre.any() else 0.0
    # How steady the calibration replay ran: the unexplained part's spread relative to a step.
    spread = 0.0
    if decode.sum() > 2:
        r = resid[decode]
        spread = float(np.median(np.abs(r - np.median(r))) * 1.4826 / np.median(wall.to_numpy()[decode]))
    return dict(a=max(base, 0.0), b=0.0, c=max(per_token, 0.0), spread=spread)


def run_profile(device: str, spec, dtype, calibration_scenario: dict | None, max_copy_bytes: int,
                scale: int = 1, host_experts: dict | None = None, threads: int | None = None) -> dict:
    dev = torch.device(device)
    t0 = time.time()
    # CPU timings depend on the thread count: fix it, record it, and the replay uses the same.
    before = torch.get_num_threads()
    threads = int(threads or before)
    torch.set_num_threads(threads)
    try:
        return _profile(dev, spec, dtype, calibration_scenario, max_copy_bytes, scale, host_experts, threads, t0)
    finally:
        torch.set_num_threads(before)


def _profile(dev, spec, dtype, calibration_scenario, max_copy_bytes, scale, host_experts, threads, t0) -> dict:
    device = str(dev)
    copies = copy_profile(dev, max_copy_bytes)
    measured = model_profile(spec, dev, dtype)
    measured["step_s"] = dict(a=0.0, b=0.0, c=0.0)
    if calibration_scenario is not None:
        from replay.run import replay_scenario
        res = replay_scenario(calibration_scenario, device, scale, str(dtype).replace("torch.", ""),
                              host_experts=host_experts)
        measured["step_s"] = fit_step_overhead(measured, res.timeline, spec.n_moe_layers)
        measured["spread"]["step_s"] = measured["step_s"].pop("spread")
    measured["threads"] = threads
    measured["spread"]["copies"] = copies["spread"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
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
