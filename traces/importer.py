"""Import routing that serving engines record into an emoe trace: `emoe trace import`.

Formats (detected from the first record where unambiguous, or `--format`):

- `rows`: per-(request, layer, token) JSONL written by vLLM-based profilers
  (traces/import_rows.py);
- `vllm`: responses or offline outputs of vLLM with `--enable-return-routed-experts`,
  one JSON object per line (traces/import_vllm.py);
- `megatron`: Megatron-core's router trace (`--moe-routing-trace-path`), one record
  per (step, layer) (traces/import_megatron.py).

Strict by default: the first problem is raised with its file and line and, where it
can be fixed, how. With repair=True what can be fixed is fixed, and every repair is
counted in an ImportReport, printed by the CLI and kept in the trace's metadata
(`extra["import"]`). Every format ends in `assemble`, which builds the Trace and
runs the format's one validation path (traces/format.py).
"""
from __future__ import annotations

import importlib

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from traces.format import Trace, TraceError, expert_dtype, validate
from traces.model_shape import ModelSpec, get_model

# Format -> its reader, "module:function", imported when used. A reader takes
# (path, model, report, task, progress) and returns the requests' RequestRouting.
FORMATS = {"rows": "traces.import_rows:read_rows", "vllm": "traces.import_vllm:read_vllm",
           "megatron": "traces.import_megatron:read_megatron"}
MISSING = -1          # an expert id a record did not give (a dropped row, vLLM's missing-route sentinel)
DEFAULT_TASK = "unlabelled"


@dataclass
class RequestRouting:
    """One request's routing as read: experts (tokens, L, k) with MISSING where unknown."""
    request_id: str
    task: str
    experts: np.ndarray
    gates: np.ndarray | None
    n_prompt: int
    arrival_s: float = float("nan")
    prompt_text: str | None = None


@dataclass
class ImportReport:
    """What was read and every repair made (kind -> list of {request, detail, routes})."""
    format: str
    source: str
    repair: bool
    repairs: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def add(self, kind: str, request: str, detail: str, routes: int = 0):
        self.repairs.setdefault(kind, []).append(dict(request=request, detail=detail, routes=int(routes)))

    @property
    def filled_routes(self) -> int:
        return sum(r["routes"] for items in self.repairs.values() for r in items)

    def as_extra(self) -> dict:
        return dict(format=self.format, source=self.source, repaired=self.repair, notes=list(self.notes),
                    filled_routes=self.filled_routes,
                    repairs={k: dict(count=len(v), items=v) for k, v in self.repairs.items()})

    def lines(self) -> list[str]:
        out = [f"imported {self.source} as {self.format}" + ("" if self.repair else " (strict)")]
        out += [f"  note: {n}" for n in self.notes]
        for kind, items in self.repairs.items():
            routes = sum(i["routes"] for i in items)
            out.append(f"  repaired {kind}: {len(items)} case(s)" + (f", {routes} (token, layer) routes filled"
                                                                       if routes else ""))
            for i in items[:5]:
                out.append(f"    request '{i['request']}': {i['detail']}")
            if len(items) > 5:
                out.append(f"    ... {len(items) - 5} more (all in the trace's extra.import)")
        if not self.repairs and self.repair:
            out.append("  nothing needed repair")
        return out


def read_jsonl(path: Path):
    """(line number, object) for every non-empty line; a bad line is an error naming it."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{path}:{lineno}: expected a JSON object per line")
            yield lineno, obj


def detect_format(path) -> str:
    path = Path(path)
    for lineno, obj in read_jsonl(path):
        if "top_indices" in obj:
            return "megatron"
        completions = obj.get("choices") or obj.get("outputs") or []
        if "prompt_routed_experts" in obj or "routed_experts" in obj or any(
                isinstance(c, dict) and "routed_experts" in c for c in completions):
            return "vllm"
        if "layer" in obj and "experts" in obj:
            return "rows"
        raise TraceError(f"{path}:{lineno}: cannot tell the format of this record (keys {sorted(obj)[:8]}); "
                         f"give --format {'|'.join(FORMATS)}")
    raise TraceError(f"{path}: no records found")


def import_trace(path, model: str | ModelSpec, format: str = "auto", repair: bool = False,
                 task: str | None = None, progress=None) -> tuple[Trace, ImportReport]:
    """Read a routing dump in one of FORMATS; returns the validated trace and the report."""
    model = get_model(model)
    path = Path(path)
    if not path.exists():
        raise TraceError(f"routing file '{path}' does not exist")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise TraceError(f"unknown import format '{format}'; choose auto or one of {', '.join(FORMATS)}")
    report = ImportReport(fmt, path.name, repair)
    module, _, function = FORMATS[fmt].partition(":")
    reqs = getattr(importlib.import_module(module), function)(path, model, report, task, progress)
    return assemble(reqs, model, report, path), report


def import_jsonl(path, model: str | ModelSpec, progress=None) -> Trace:
    """Profiler rows, strict (the importer's original entry point)."""
    return import_trace(path, model, "rows", progress=progress)[0]


def fill_missing(experts: np.ndarray, gates: np.ndarray | None) -> int:
    """Give every MISSING (token, layer) route the routing of the nearest earlier token at
    that layer (the next one for a request's first tokens); returns how many were filled."""
    miss = (experts == MISSING).any(axis=2)
    n = int(miss.sum())
    if not n:
        return 0
    T, L, _ = experts.shape
    for layer in np.flatnonzero(miss.any(axis=0)):
        have = ~miss[:, layer]
        if not have.any():
            raise TraceError(f"layer {layer} has no routing at all for this request; it cannot be filled")
        idx = np.where(have, np.arange(T), -1)
        prev = np.maximum.accumulate(idx)
        nxt = np.minimum.accumulate(np.where(have, np.arange(T), T)[::-1])[::-1]
        src = np.where(prev >= 0, prev, nxt)
        experts[:, layer] = experts[src, layer]
        if gates is not None:
            gates[:, layer] = gates[src, layer]
    return n


def assemble(reqs: list[RequestRouting], model: ModelSpec, report: ImportReport, path: Path) -> Trace:
    """Build and validate the trace; MISSING routes are an error unless repairing (then filled)."""
    if not reqs:
        raise TraceError(f"{path}: no routing records found")
    L, E, k = model.n_moe_layers, model.n_experts, model.top_k
    have_gates = [r.gates is not None for r in reqs]
    if any(have_gates) and not all(have_gates):
        raise TraceError(f"{path}: some requests give gate weights and some do not; give them for all or none")
    for r in reqs:
        if r.experts.shape[1:] != (L, k):
            raise TraceError(f"{path}: request '{r.request_id}' has routing of shape {r.experts.shape[1:]} "
                             f"(layers, top_k); model '{model.name}' has ({L}, {k})")
        miss = (r.experts == MISSING).any(axis=2)
        if miss.any():
            tok, layer = (int(x) for x in np.argwhere(miss)[0])
            if not report.repair:
                raise TraceError(f"{path}: request '{r.request_id}' token {tok} lacks layer(s) "
                                 f"{np.flatnonzero(miss[tok]).tolist()[:5]} ({int(miss.sum())} routes missing); "
                                 "every token needs all MoE layers - rerun with --repair to fill them from "
                                 "the neighbouring tokens")
            n = fill_missing(r.experts, r.gates)
            report.add("missing routes", r.request_id, f"{n} (token, layer) routes filled from neighbouring tokens",
                       n)
    ids = [r.request_id for r in reqs]
    arrival = np.array([r.arrival_s for r in reqs], dtype=float)
    texts = [r.prompt_text for r in reqs]
    extra = dict(imported_from=path.name, source=path.name, **{"import": report.as_extra()})
    if not all(have_gates):
        extra["gates"] = "absent"     # gates below are uniform placeholders; stats leave them out
    experts = np.concatenate([r.experts for r in reqs])
    gates = np.concatenate([r.gates for r in reqs]).astype(np.float16) if all(have_gates) \
        else np.full(experts.shape, 1.0 / k, dtype=np.float16)
    t = Trace(model=model.name, n_layers=L, n_experts=E, top_k=k, request_id=np.array(ids),
              task=np.array([r.task for r in reqs]), prompt_tokens=[r.n_prompt for r in reqs],
              output_tokens=[len(r.experts) - r.n_prompt for r in reqs], experts=experts.astype(expert_dtype(E)),
              gates=gates, arrival_s=arrival if np.isfinite(arrival).any() else None,
              prompt_text=np.array([x or "" for x in texts]) if any(x is not None for x in texts) else None,
              router_probs=None, n_shared_experts=model.n_shared_experts, extra=extra)
    validate(t, str(path))
    return t


def check_expert_ids(ids: np.ndarray, model: ModelSpec, where: str, allow_missing: bool):
    """Expert ids in range (MISSING allowed when repairing), and no token repeating an expert."""
    bad = (ids >= model.n_experts) | ((ids < 0) & (ids != MISSING)) | ((ids == MISSING) & (not allow_missing))
    if bad.any():
        if ids.ndim == 1:
            what = f"expert ids {ids.tolist()}"
        else:
            at = np.argwhere(bad)[0]
            what = f"expert id {int(ids[tuple(at)])} (token {int(at[0])})"
        hint = " (-1 marks a missing route: rerun with --repair to fill it from the neighbouring tokens)" \
            if (ids[bad] == MISSING).any() else ""
        raise TraceError(f"{where}: {what} out of range 0..{model.n_experts - 1} for model '{model.name}'{hint}")
