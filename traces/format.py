"""The emoe routing trace: what a trace holds, how it is written, read and checked.

On disk a trace is one uncompressed (or, with compress=True, deflated) `.npz`:
columnar numpy arrays that load with `np.load` and no pickling.

    meta                 JSON string: format, version, model, n_layers, n_experts,
                         top_k, n_shared_experts, has_router_probs, extra (free dict),
                         model_shape (optional: the model's full shape, the fields of
                         traces.model_shape.ModelSpec as plain values, e.g. from `emoe capture`;
                         a scenario's `model: from_trace` runs it; traces without it,
                         written before it existed, read as before)
    request_id  (R,)     str      unique per request
    task        (R,)     str      task label (e.g. "qa", "code")
    prompt_tokens (R,)   int32
    output_tokens (R,)   int32
    arrival_s   (R,)     float64  optional: NaN where unknown
    prompt_text (R,)     str      optional
    experts   (T, L, k)  uint8 (int16 above 255 experts)  chosen expert ids, rank order
    gates     (T, L, k)  float16  gate weights of those experts
    router_probs (T, L, E) float16 optional: full router softmax

T is the total token count, sum(prompt_tokens + output_tokens); request r's
tokens are rows offsets[r]:offsets[r+1], prompt tokens first, then generated
tokens in order. L is the number of MoE layers, in model order.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from traces.errors import UserError

FORMAT_NAME = "emoe-trace"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

REQUIRED_ARRAYS = ("request_id", "task", "prompt_tokens", "output_tokens", "experts", "gates")
OPTIONAL_ARRAYS = ("arrival_s", "prompt_text", "router_probs")


class TraceError(UserError):
    """A trace that cannot be used; the message names the problem and the fix."""


@dataclass(kw_only=True)
class Trace:
    model: str
    n_layers: int          # MoE layers
    n_experts: int
    top_k: int
    request_id: np.ndarray
    task: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    experts: np.ndarray
    gates: np.ndarray
    arrival_s: np.ndarray | None = None
    prompt_text: np.ndarray | None = None
    router_probs: np.ndarray | None = None
    n_shared_experts: int = 0
    extra: dict = field(default_factory=dict)
    model_shape: dict | None = None   # the whole model's shape, when the trace's source knew it
    # Where streamed routing comes from (a memory-mapped file, a lazy generator): it is told
    # which rows will not be read again (release_rows(lo, hi)); None for in-memory arrays.
    source: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.prompt_tokens = np.asarray(self.prompt_tokens, dtype=np.int32)
        self.output_tokens = np.asarray(self.output_tokens, dtype=np.int32)
        self.request_id = np.asarray(self.request_id).astype(str)
        self.task = np.asarray(self.task).astype(str)
        self.offsets = np.zeros(len(self.prompt_tokens) + 1, dtype=np.int64)
        np.cumsum(self.prompt_tokens.astype(np.int64) + self.output_tokens, out=self.offsets[1:])

    # ---- convenience ------------------------------------------------------
    @property
    def n_requests(self) -> int:
        return len(self.prompt_tokens)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def tasks(self) -> list[str]:
        return sorted(set(self.task.tolist()))

    def release(self, r: int) -> None:
        """Hint from an engine: request r's routing will not be read again, so a streamed
        trace may drop it from memory. In-memory arrays ignore it."""
        if self.source is not None:
            self.source.release_rows(int(self.offsets[r]), int(self.offsets[r + 1]))

    def token_slice(self, r: int) -> slice:
        return slice(int(self.offsets[r]), int(self.offsets[r + 1]))

    def decode_mask(self) -> np.ndarray:
        """Boolean per token: True for generated tokens."""
        mask = np.ones(self.n_tokens, dtype=bool)
        starts = self.offsets[:-1]
        for s, p in zip(starts, self.prompt_tokens):
            mask[s:s + p] = False
        return mask

    def token_request(self) -> np.ndarray:
        """Request index of every token row."""
        return np.repeat(np.arange(self.n_requests), np.diff(self.offsets))

    def subset(self, idx) -> Trace:
        """A new trace holding the requests `idx` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        rows = np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in idx]) \
            if len(idx) else np.zeros(0, dtype=np.int64)
        pick = lambda a: None if a is None else a[idx]
        return Trace(model=self.model, n_layers=self.n_layers, n_experts=self.n_experts, top_k=self.top_k,
                     request_id=self.request_id[idx], task=self.task[idx], prompt_tokens=self.prompt_tokens[idx],
                     output_tokens=self.output_tokens[idx], experts=self.experts[rows], gates=self.gates[rows],
                     arrival_s=pick(self.arrival_s), prompt_text=pick(self.prompt_text),
                     router_probs=None if self.router_probs is None else self.router_probs[rows],
                     n_shared_experts=self.n_shared_experts, extra=dict(self.extra),
                     model_shape=None if self.model_shape is None else dict(self.model_shape))

    def meta(self) -> dict:
        m = dict(format=FORMAT_NAME, version=FORMAT_VERSION, model=self.model, n_layers=self.n_layers,
                 n_experts=self.n_experts, top_k=self.top_k, n_shared_experts=self.n_shared_experts,
                 has_router_probs=self.router_probs is not None, extra=self.extra)
        if self.model_shape is not None:   # optional: absent, a trace is written byte for byte as before
            m["model_shape"] = self.model_shape
        return m

    def validate(self, source: str = "trace") -> Trace:
        validate(self, source)
        return self


def expert_dtype(n_experts: int):
    return np.uint8 if n_experts <= 256 else np.int16


def validate(t: Trace, source: str = "trace") -> None:
    """Raise TraceError naming the first inconsistency found."""
    R = t.n_requests
    for name in ("request_id", "task", "output_tokens"):
        if len(getattr(t, name)) != R:
            raise TraceError(f"{source}: '{name}' has {len(getattr(t, name))} entries but there are {R} requests "
                             "(prompt_tokens); every per-request array needs one entry per request")
    for name in ("arrival_s", "prompt_text"):
        a = getattr(t, name)
        if a is not None and len(a) != R:
            raise TraceError(f"{source}: '{name}' has {len(a)} entries for {R} requests")
    if len(set(t.request_id.tolist())) != R:
        raise TraceError(f"{source}: request ids are not unique")
    if (t.prompt_tokens < 0).any() or (t.output_tokens < 0).any():
        raise TraceError(f"{source}: negative token counts")
    if t.top_k < 1 or t.n_experts < 1 or t.n_layers < 1:
        raise TraceError(f"{source}: routing shape must be positive (n_layers={t.n_layers}, "
                         f"n_experts={t.n_experts}, top_k={t.top_k})")
    if t.experts.ndim != 3:
        raise TraceError(f"{source}: 'experts' must be (tokens, layers, top_k), got shape {t.experts.shape}")
    T, L, k = t.experts.shape
    if T != t.n_tokens:
        raise TraceError(f"{source}: routing arrays hold {T} tokens but the token counts add up to {t.n_tokens} "
                         "(sum of prompt_tokens + output_tokens); every token needs one routing row")
    if L != t.n_layers:
        raise TraceError(f"{source}: routing arrays have {L} layers but the trace says n_layers={t.n_layers}")
    if k != t.top_k:
        raise TraceError(f"{source}: routing arrays hold {k} experts per token but the trace says top_k={t.top_k}")
    if t.gates.shape != t.experts.shape:
        raise TraceError(f"{source}: 'gates' shape {t.gates.shape} differs from 'experts' shape {t.experts.shape}")
    if T:
        lo, hi = int(t.experts.min()), int(t.experts.max())
        if lo < 0 or hi >= t.n_experts:
            bad = lo if lo < 0 else hi
            row = int(np.argwhere((t.experts < 0) | (t.experts >= t.n_experts))[0][0])
            req = int(np.searchsorted(t.offsets, row, side="right") - 1)
            raise TraceError(f"{source}: expert id {bad} out of range 0..{t.n_experts - 1} "
                             f"(request '{t.request_id[req]}', token row {row}); does the trace match the model?")
        if k > 1 and _has_repeat(t.experts):
            raise TraceError(f"{source}: a token lists the same expert twice in one layer; top-k ids must differ")
    if t.router_probs is not None and t.router_probs.shape != (T, L, t.n_experts):
        raise TraceError(f"{source}: 'router_probs' shape {t.router_probs.shape}, expected {(T, L, t.n_experts)}")
    _check_model_shape(t, source)


def _check_model_shape(t: Trace, source: str) -> None:
    """The recorded model shape must be the model that routed this trace."""
    ms = t.model_shape
    if ms is None:
        return
    if not isinstance(ms, dict):
        raise TraceError(f"{source}: meta 'model_shape' must be a mapping of model fields, got {type(ms).__name__}")
    routing = dict(n_moe_layers=t.n_layers, n_experts=t.n_experts, top_k=t.top_k)
    bad = [f"{k} {ms.get(k)!r} vs {v}" for k, v in routing.items() if ms.get(k) != v]
    if bad:
        raise TraceError(f"{source}: meta 'model_shape' is not the model that routed this trace ("
                         + ", ".join(bad) + " in the routing arrays); re-capture the trace or drop 'model_shape'")


def _has_repeat(experts: np.ndarray) -> bool:
    k = experts.shape[2]
    if k <= 8:   # pairwise compares stream through memory; sorting (T, L, k) is much slower
        return any(np.any(experts[:, :, i] == experts[:, :, j]) for i in range(k) for j in range(i + 1, k))
    srt = np.sort(experts, axis=2)
    return bool((srt[:, :, 1:] == srt[:, :, :-1]).any())


def trace_path(path) -> Path:
    """Where save_trace writes `path`: with .npz added unless it ends so."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
    return path


def save_trace(t: Trace, path, compress: bool = False) -> Path:
    """Validate, then write atomically (a crash never leaves a half-written trace)."""
    validate(t, str(path))
    path = trace_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(meta=np.array(json.dumps(t.meta())), request_id=t.request_id, task=t.task,
                  prompt_tokens=t.prompt_tokens, output_tokens=t.output_tokens,
                  experts=t.experts.astype(expert_dtype(t.n_experts), copy=False),
                  gates=t.gates.astype(np.float16, copy=False))
    if t.arrival_s is not None:
        arrays["arrival_s"] = np.asarray(t.arrival_s, dtype=np.float64)
    if t.prompt_text is not None:
        arrays["prompt_text"] = np.asarray(t.prompt_text).astype(str)
    if t.router_probs is not None:
        arrays["router_probs"] = t.router_probs.astype(np.float16, copy=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; a trace is a normal shared file
    try:
        (np.savez_compressed if compress else np.savez)(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _meta(z, path) -> dict:
    """An open trace file's checked meta."""
    if "meta" not in z.files:
        raise TraceError(f"{path}: missing 'meta'; this is not an emoe trace")
    meta = json.loads(str(z["meta"]))
    if meta.get("format") != FORMAT_NAME:
        raise TraceError(f"{path}: format is {meta.get('format')!r}, expected '{FORMAT_NAME}'")
    if meta.get("version") not in SUPPORTED_VERSIONS:
        raise TraceError(f"{path}: unknown trace version {meta.get('version')!r}; this emoe reads "
                         f"versions {list(SUPPORTED_VERSIONS)} (upgrade emoe, or re-export the trace)")
    for key in ("model", "n_layers", "n_experts", "top_k"):
        if key not in meta:
            raise TraceError(f"{path}: meta lacks '{key}'")
    return meta


def read_meta(path) -> dict:
    """A trace's meta alone (model, routing shape, model_shape if recorded), without loading its
    arrays: cheap even for a trace of gigabytes."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"trace file '{path}' does not exist")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - zip/npz errors come in many types
        raise TraceError(f"{path}: not a readable emoe trace (.npz): {e}") from None
    with z:
        return _meta(z, path)


def load_trace(path, validate_routing: bool = True) -> Trace:
    path = Path(path)
    if not path.exists():
        raise TraceError(f"trace file '{path}' does not exist; make one with `emoe trace synth` "
                         "or `emoe trace import`")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - zip/npz errors come in many types
        raise TraceError(f"{path}: not a readable emoe trace (.npz): {e}") from None
    with z:
        meta = _meta(z, path)
        missing = [a for a in REQUIRED_ARRAYS if a not in z.files]
        if missing:
            raise TraceError(f"{path}: missing field(s) {missing}; a trace needs {list(REQUIRED_ARRAYS)}")
        get = lambda a: z[a] if a in z.files else None
        t = Trace(model=meta["model"], n_layers=int(meta["n_layers"]), n_experts=int(meta["n_experts"]),
                  top_k=int(meta["top_k"]), request_id=z["request_id"], task=z["task"],
                  prompt_tokens=z["prompt_tokens"], output_tokens=z["output_tokens"], experts=z["experts"],
                  gates=z["gates"], arrival_s=get("arrival_s"), prompt_text=get("prompt_text"),
                  router_probs=get("router_probs"), n_shared_experts=int(meta.get("n_shared_experts", 0)),
                  extra=meta.get("extra", {}), model_shape=meta.get("model_shape"))
    if validate_routing:
        validate(t, str(path))
    return t


def check_matches_model(t: Trace, model, source: str = "trace") -> None:
    """A trace can only drive a model of the same routing shape."""
    if (t.n_layers, t.n_experts, t.top_k) != (model.n_moe_layers, model.n_experts, model.top_k):
        raise TraceError(
            f"{source}: routing shape (layers={t.n_layers}, experts={t.n_experts}, top_k={t.top_k}) of trace "
            f"model '{t.model}' does not match model '{model.name}' (layers={model.n_moe_layers}, "
            f"experts={model.n_experts}, top_k={model.top_k}); use a trace captured from or synthesised for "
            f"this model (`emoe trace synth --model {model.name}`)")
