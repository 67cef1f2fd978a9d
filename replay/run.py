"""Replay one scenario on real hardware: the simulator's scenario, policy and scheduler,
the real model and clock; results in the simulator's schema."""
from __future__ import annotations

import json
import time
from dataclasses import asdict

import torch

from replay.engine import ReplayEngine
from replay.model import ReplayModel, scaled_spec
from replay.options import DTYPE_NAMES
from traces.model_shape import get_model
from sim.results import code_version
from sim.run import RunResult, build, outcome
from sim.workload import build_requests, load_workload_trace

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
LAYER_COLUMNS = ["kind", "layer", "expert", "start_s", "end_s"]


class ReplayOOM(RuntimeError):
    """The device ran out of memory; partial results are kept."""


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def replay_scenario(sc: dict, device: str = "cpu", scale: int = 1, dtype: str | None = None,
                    progress=None, host_experts: dict | None = None, weights: str | None = None) -> RunResult:
    """host_experts: a dict kept by the caller to reuse one model's host-side experts across replays.
    weights: a Hugging Face checkpoint directory: real weights, real prompt tokens, the model's
    own router and greedy generation (generations.jsonl beside the results)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}")
    if scale < 1:
        raise ValueError("--scale must be a positive integer")
    base = get_model(sc["model"])
    # whole (not generated lazily): it is saved beside the results, and replays are small
    trace = load_workload_trace(sc, base, lazy=False)
    tdt = DTYPES[dtype]
    cfg = None
    if weights:
        from replay import weights as hf
        if scale != 1:
            raise hf.WeightsError("--weights runs the checkpoint at its real size; drop --scale")
        cfg = hf.read_config(weights)
        hf.check_spec(base, cfg, weights)
        ids = hf.prompt_ids(weights, trace, range(trace.n_requests))
    spec = scaled_spec(base, scale, torch.tensor([], dtype=tdt).element_size())
    # The resolved scenario names the model actually run, so `emoe run` on it simulates the same thing.
    # ... and the trace it replayed, saved beside the results (requests already selected).
    sc = dict(sc)
    sc["model"] = {k: v for k, v in asdict(spec).items()}
    sc["workload"] = {**sc["workload"], "trace": "trace.npz", "synthetic": None, "requests": None, "tasks": None}
    parts = build(sc, trace=trace, model=spec)    # what the simulator builds, at the replayed shape
    hw, policy, scheduler = parts.hw, parts.policy, parts.scheduler
    if hw.measured and hw.measured.get("threads") and not device.startswith("cuda"):
        torch.set_num_threads(int(hw.measured["threads"]))   # CPU timings as the profile measured them
    requests = build_requests(sc, trace)
    n_slots = policy.cache_experts + spec.top_k
    t0 = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        shared = host_experts.get(spec.name) if host_experts is not None else None
        if cfg is None:
            rt = ReplayModel(spec, device, tdt, sc["seed"], n_slots, host_experts=shared)
        else:
            rt = ReplayModel(spec, device, tdt, sc["seed"], n_slots, rope_theta=hf.rope_theta(cfg),
                             rms_eps=float(cfg.get("rms_norm_eps", 1e-5)))
            hf.load_into(rt, weights, cfg)
            rt.miss_mode = policy.miss_mode
        if host_experts is not None and cfg is None:
            host_experts[spec.name] = rt.host_experts
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not _is_oom(e):
            raise
        fitted = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
        raise ReplayOOM(f"out of memory building {spec.name} with {n_slots} expert slots on {device}; the "
                        f"largest allocation that fitted was {fitted / 1e9:.2f} GB. Use --scale or a smaller "
                        "policy.capacity") from None
    eng = ReplayEngine(spec, hw, trace, requests, policy, scheduler, sc["limits"], progress, model_rt=rt,
                       prompt_ids=ids if cfg is not None else None)
    error = ""
    try:
        eng.run()
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not _is_oom(e):
            raise
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else eng.mem.peak_total
        error = (f"out of memory at engine step {eng.steps} with {len(eng.running)} requests running; the "
                 f"largest size that fitted: {peak / 1e9:.2f} GB peak allocated. Lower limits.max_running "
                 "or limits.max_batch_tokens")
    wall = time.perf_counter() - t0
    cache = rt.cache
    extra = dict(weights_plus_cache_bytes=float(rt.dense_bytes + n_slots * cache.slot_bytes),
                 h2d_bytes=float(cache.bytes_copied), h2d_copies=cache.copies, h2d_time_s=cache.copy_s,
                 h2d_bytes_per_s=cache.bytes_copied / cache.copy_s if cache.copy_s else None)
    if device.startswith("cuda"):
        extra.update(cuda_max_allocated_bytes=float(torch.cuda.max_memory_allocated()),
                     cuda_max_reserved_bytes=float(torch.cuda.max_memory_reserved()))
    files = {}
    if cfg is not None:
        extra.update(eng.router_summary())
        files["generations.jsonl"] = "".join(
            json.dumps(dict(request_id=r.rid, task=r.task, generated_ids=r.generated_ids or [])) + "\n"
            for r in requests)
    events = eng.layer_events()
    if events:   # `emoe timeline --layers` reads them
        import pandas as pd
        files["layers.csv"] = pd.DataFrame(events, columns=LAYER_COLUMNS).to_csv(index=False)
    if error:
        extra["error"] = error
    summary, req, tl = outcome(eng, sc, extra)
    meta = dict(engine="replay", device=device, device_name=torch.cuda.get_device_name() if device.startswith("cuda")
                else "cpu", dtype=dtype, scale=scale, weights=str(weights) if weights else None,
                routing="router" if weights else "trace", torch=torch.__version__, code_version=code_version(),
                threads=torch.get_num_threads(),
                seed=sc["seed"], wall_time_s=wall, stopped_early=eng.stopped_early or error,
                model=spec.describe(), hardware=hw.__dict__)
    return RunResult(summary, req, tl, meta, sc, trace=trace, files=files)
