"""`emoe profile`: measure what the simulator's cost model needs, on this device.

- host-to-device copies by size, pinned and pageable: bandwidth and per-copy
  latency (t = latency + bytes / bandwidth, fitted on pinned copies);
- for one model shape (the replayed one): expert FFN time by tokens
  (a + b * tokens per active expert), one layer's attention block by tokens,
  context and requests (a + b * tokens + c * context + d * requests), using the
  replayer's own code;
- per-step overhead (engine, policy, embedding, LM head): a short replay whose
  step times minus the modelled layers are fitted to a + b * sampled + c * tokens.

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


def _timeit(fn, device, reps: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def copy_profile(device, max_bytes: int) -> dict:
    sizes = [2 ** p for p in range(12, int(np.log2(max_bytes)) + 1, 2)]
    rows = []
    for nbytes in sizes:
        n = nbytes // 4
        dst = torch.empty(n, dtype=torch.float32, device=device)
        for pinned in (True, False):
            src = torch.randn(n)
            if pinned and device.type == "cuda":
                src = src.pin_memory()
            t = _timeit(lambda: dst.copy_(src, non_blocking=pinned and device.type == "cuda"), device)
            rows.append(dict(bytes=nbytes, pinned=pinned and device.type == "cuda", seconds=t,
                             bytes_per_s=nbytes / t))
    pinned = [r for r in rows if r["pinned"]] or [r for r in rows if not r["pinned"]]
    x = np.array([r["bytes"] for r in pinned], dtype=float)
    y = np.array([r["seconds"] for r in pinned])
    slope, icpt = np.polyfit(x, y, 1)
    return dict(table=rows, latency_s=max(float(icpt), 1e-7), bytes_per_s=float(1 / slope) if slope > 0
                else float(x[-1] / y[-1]))


def model_profile(spec, device, dtype) -> dict:
    # One layer times like any other: build just one (a full model's host experts take minutes).
    one = replace(spec, n_layers=1, n_moe_layers=1)
    rt = ReplayModel(one, str(device), dtype, seed=0, n_slots=1)
    rt.cache.load(0, 0)
    H = spec.hidden
    k = spec.top_k
    # Expert FFN by tokens (the replayer's own code path).
    ex_x, ex_y = [], []
    for t in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        h = torch.randn(t, H, dtype=dtype, device=device)
        r = torch.zeros(t, k, dtype=torch.long, device=device)
        r[:, 1:] = -1     # one expert, each token once
        g = torch.ones(t, k, dtype=dtype, device=device)
        ex_x.append(t)
        ex_y.append(_timeit(lambda: rt.experts(0, h, r[:, :1], g[:, :1]), device))
    b, a = np.polyfit(ex_x, ex_y, 1)
    expert = dict(a=max(float(a), 0.0), b=max(float(b), 0.0))
    shared = None
    if spec.n_shared_experts:   # shared experts by tokens (every token, every MoE layer)
        sh_y = [_timeit(lambda: rt.shared(0, torch.randn(t, H, dtype=dtype, device=device)), device)
                for t in ex_x]
        b, a = np.polyfit(ex_x, sh_y, 1)
        shared = dict(a=max(float(a), 0.0), b=max(float(b), 0.0))
    # One layer's attention block by tokens, context and requests.
    rows, ys = [], []
    for n_req, n, ctx in [(1, 1, 16), (1, 1, 256), (1, 1, 1024), (4, 1, 256), (8, 1, 256), (16, 1, 128),
                          (1, 16, 0), (1, 64, 0), (1, 256, 0), (2, 128, 128), (8, 1, 1024)]:
        for rid in range(n_req):
            rt.kv_free(rid)
            rt.kv_alloc(rid, ctx + n + 1)
        segs = [(rid, rid * n, n, ctx) for rid in range(n_req)]
        x = torch.randn(n_req * n, H, dtype=dtype, device=device)
        with torch.no_grad():   # rotary tables are made once per step, not per layer: not timed here
            rope = rt.rope_tables(segs)
            t = _timeit(lambda: rt.attention(0, x, segs, rope), device)
        ctx_sum = n_req * (n * ctx + n * (n + 1) / 2)
        rows.append([1.0, n_req * n, ctx_sum, n_req])
        ys.append(t)
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)
    coef = np.maximum(coef, 0.0)
    attention = dict(a=float(coef[0]), b=float(coef[1]), c=float(coef[2]), d=float(coef[3]))
    shape = {f: getattr(spec, f) for f in ("name", "hidden", "expert_ffn", "n_moe_layers", "n_experts", "top_k",
                                           "n_heads", "n_kv_heads", "dtype_bytes", "n_shared_experts")}
    out = dict(model=shape, expert_s=expert, attention_s=attention)
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
    base = float(np.median(resid[decode])) if decode.any() else float(np.median(resid))
    pre = ~decode
    per_token = float(np.median((resid[pre] - base) / timeline.prefill_tokens.to_numpy()[pre])) if pre.any() else 0.0
    return dict(a=max(base, 0.0), b=0.0, c=max(per_token, 0.0))


def run_profile(device: str, spec, dtype, calibration_scenario: dict | None, max_copy_bytes: int,
                scale: int = 1, host_experts: dict | None = None) -> dict:
    dev = torch.device(device)
    t0 = time.time()
    copies = copy_profile(dev, max_copy_bytes)
    measured = model_profile(spec, dev, dtype)
    measured["step_s"] = dict(a=0.0, b=0.0, c=0.0)
    if calibration_scenario is not None:
        from replay.run import replay_scenario
        res = replay_scenario(calibration_scenario, device, scale, str(dtype).replace("torch.", ""),
                              host_experts=host_experts)
        measured["step_s"] = fit_step_overhead(measured, res.timeline, spec.n_moe_layers)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    mem = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else _host_memory()
    hw = dict(name=f"profile:{name}", memory_bytes=float(mem), hbm_bytes_per_s=float(copies["bytes_per_s"]),
              flops_per_s=1e12, h2d_bytes_per_s=copies["bytes_per_s"], h2d_latency_s=copies["latency_s"],
              count=1, flops_efficiency=1.0, hbm_efficiency=1.0, layer_overhead_s=0.0,
              step_overhead_s=measured["step_s"]["a"])
    return dict(hardware=hw, measured=measured, copies=copies["table"],
                info=dict(device=name, torch=str(torch.__version__), seconds=round(time.time() - t0, 1),
                          measured_at=time.strftime("%Y-%m-%d %H:%M:%S")))


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
