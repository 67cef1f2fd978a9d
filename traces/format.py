"""The emoe routing trace: what a trace holds, how it is written, read and checked.

On disk a trace is one `.npz` (a ZIP of `.npy` files: numpy arrays, no pickling).
Version 2 (what save_trace writes) is uncompressed (ZIP_STORED) with each routing
array's data 64-byte aligned in the file, so that load_trace maps it instead of
reading it: a trace larger than memory runs, the pages of requests in flight in
memory and those of finished requests dropped (Trace.release). Version 1 (np.savez,
possibly deflated; `compress=True` still writes it) stays readable; a compressed
file's routing is read into memory. `emoe trace convert` rewrites one as the other,
streaming.

    meta                 JSON string: format, version, model, n_layers, n_experts,
                         top_k, n_shared_experts, has_router_probs, extra (free dict),
                         model_shape (optional: the model's full shape, the fields of
                         traces.model_shape.ModelSpec as plain values, e.g. from `emoe capture`;
                         a scenario's `model: from_trace` runs it; traces without it,
                         written before it existed, read as before),
                         routing_validated (version 2: true when the writer checked every
                         expert id and that request ids are unique, as save_trace and convert
                         do; loading then checks shapes only)
    request_id  (R,)     str      unique per request
    task        (R,)     str      task label (e.g. "qa", "code"); in memory an object array
                                  of one shared Python string per task (task_labels)
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
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from traces.errors import UserError
from traces.npz import CHUNK_BYTES, MappedRows, NpzError, NpzReader, NpzWriter

FORMAT_NAME = "emoe-trace"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)

REQUIRED_ARRAYS = ("request_id", "task", "prompt_tokens", "output_tokens", "experts", "gates")
OPTIONAL_ARRAYS = ("arrival_s", "prompt_text", "router_probs")
PER_REQUEST_ARRAYS = ("request_id", "task", "prompt_tokens", "output_tokens")
ROUTING_ARRAYS = ("experts", "gates", "router_probs")
SCAN_TOKEN_LAYERS = 8 << 20          # validation checks this many (token, layer) routes at a time
COMPRESSED_NOTICE_BYTES = 1 << 30    # a compressed trace this large read into memory gets a note
LABEL_CHUNK = 1 << 16                # task labels are converted (and read from a file) this many at a time


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
    # The same for per-request strings mapped from the file (request_id, prompt_text), by request.
    request_source: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.prompt_tokens = np.asarray(self.prompt_tokens, dtype=np.int32)
        self.output_tokens = np.asarray(self.output_tokens, dtype=np.int32)
        self.request_id = np.asarray(self.request_id).astype(str, copy=False)   # (a day: millions)
        self.task = task_labels(self.task)
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
        return sorted(set(self.task.tolist()))   # (a list of shared strings, not one string per request)

    def release(self, r: int) -> None:
        """Hint from an engine: request r's routing will not be read again, so a streamed
        trace may drop it from memory. In-memory arrays ignore it."""
        if self.source is not None:
            self.source.release_rows(int(self.offsets[r]), int(self.offsets[r + 1]))
        if self.request_source is not None:
            self.request_source.release_rows(r, r + 1)

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
        """A new trace holding the requests `idx` (in that order). Of a mapped trace, a contiguous
        ascending range (a workload's first N requests) stays mapped: views, not copies."""
        idx = np.asarray(idx, dtype=np.int64)
        source = request_source = None
        strings = idx   # how request_id and prompt_text are picked: a slice of mapped ones stays mapped
        if isinstance(self.source, MappedRows) and len(idx) and 0 <= idx[0] and idx[-1] < self.n_requests \
                and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
            lo, hi = int(self.offsets[idx[0]]), int(self.offsets[idx[-1] + 1])
            rows, source = slice(lo, hi), self.source.shifted(lo)
            if isinstance(self.request_source, MappedRows):
                strings, request_source = slice(int(idx[0]), int(idx[-1]) + 1), self.request_source.shifted(int(idx[0]))
        else:
            rows = np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in idx]) \
                if len(idx) else np.zeros(0, dtype=np.int64)
        pick = lambda a: None if a is None else a[idx]
        return Trace(model=self.model, n_layers=self.n_layers, n_experts=self.n_experts, top_k=self.top_k,
                     request_id=self.request_id[strings], task=self.task[idx], prompt_tokens=self.prompt_tokens[idx],
                     output_tokens=self.output_tokens[idx], experts=self.experts[rows], gates=self.gates[rows],
                     arrival_s=pick(self.arrival_s),
                     prompt_text=None if self.prompt_text is None else self.prompt_text[strings],
                     router_probs=None if self.router_probs is None else self.router_probs[rows],
                     n_shared_experts=self.n_shared_experts, extra=dict(self.extra),
                     model_shape=None if self.model_shape is None else dict(self.model_shape), source=source,
                     request_source=request_source)

    def meta(self) -> dict:
        m = dict(format=FORMAT_NAME, version=FORMAT_VERSION, model=self.model, n_layers=self.n_layers,
                 n_experts=self.n_experts, top_k=self.top_k, n_shared_experts=self.n_shared_experts,
                 has_router_probs=self.router_probs is not None, extra=self.extra)
        if self.model_shape is not None:   # optional: absent, a trace is written byte for byte as before
            m["model_shape"] = self.model_shape
        return m

    def validate(self, source: str = "trace", scan_routing: bool = True) -> Trace:
        validate(self, source, scan_routing)
        return self


def task_labels(a, known: dict | None = None) -> np.ndarray:
    """Task labels as an object array holding one Python string per task, shared by its requests.
    A trace has a few tasks and may have millions of requests: as fixed-width unicode their
    labels cost 4 bytes a character ('summarization': 52 bytes a request), as shared strings
    8. Indexing, `==`, np.isin and np.unique work as on a string array. known: name -> the
    string already used for it (a file read in chunks shares one set)."""
    a = np.atleast_1d(np.asarray(a))   # (a scalar: one label, which validate counts against the requests)
    known = {} if known is None else known
    if a.dtype == object:
        objects = {id(x): x for x in a.ravel().tolist()}   # distinct objects
        if all(type(x) is str and known.setdefault(x, x) is x for x in objects.values()):
            return a   # one object per task already (an index into a labels array)
    out = np.empty(a.shape, dtype=object)
    flat, step = out.reshape(-1), LABEL_CHUNK   # 64 Ki at a time: no full-size copy or sort of the input
    for lo in range(0, a.size, step):
        names, codes = np.unique(a.reshape(-1)[lo:lo + step].astype(str, copy=False), return_inverse=True)
        flat[lo:lo + step] = np.array([known.setdefault(n, n) for n in names.tolist()], dtype=object)[codes]
    return out


def expert_dtype(n_experts: int):
    return np.uint8 if n_experts <= 256 else np.int16


def validate(t: Trace, source: str = "trace", scan_routing: bool = True, unique_ids: bool = True) -> None:
    """Raise TraceError naming the first inconsistency found. The shapes are checked first (cheap);
    then, with scan_routing, every expert id in chunks of rows (memory stays bounded, and a mapped
    trace's pages are released after each chunk). scan_routing=False trusts the ids: a version-2
    file whose writer validated them (meta routing_validated) is loaded so, and with
    unique_ids=False its request ids (the one per-request check that reads, and sorts a copy
    of, every id) too."""
    R = t.n_requests
    for name in ("request_id", "task", "output_tokens"):
        if len(getattr(t, name)) != R:
            raise TraceError(f"{source}: '{name}' has {len(getattr(t, name))} entries but there are {R} requests "
                             "(prompt_tokens); every per-request array needs one entry per request")
    for name in ("arrival_s", "prompt_text"):
        a = getattr(t, name)
        if a is not None and len(a) != R:
            raise TraceError(f"{source}: '{name}' has {len(a)} entries for {R} requests")
    if unique_ids and len(np.unique(t.request_id)) != R:   # (a set of Python strings: ~100 bytes a request)
        raise TraceError(f"{source}: request ids are not unique")
    if (t.prompt_tokens < 0).any() or (t.output_tokens < 0).any():
        raise TraceError(f"{source}: negative token counts")
    if t.top_k < 1 or t.n_experts < 1 or t.n_layers < 1:
        raise TraceError(f"{source}: routing shape must be positive (n_layers={t.n_layers}, "
                         f"n_experts={t.n_experts}, top_k={t.top_k})")
    _check_routing_shapes(t, source)
    if scan_routing:
        drop = t.source.drop_rows if isinstance(t.source, MappedRows) else None
        step = _scan_rows(t.experts.shape)
        for lo in range(0, t.n_tokens, step):
            hi = min(t.n_tokens, lo + step)
            check_routing_rows(t, t.experts[lo:hi], lo, source)
            if drop is not None:
                drop(lo, hi)   # checked: these pages need not stay in memory
    _check_model_shape(t, source)


def _check_routing_shapes(t: Trace, source: str) -> None:
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
    if t.router_probs is not None and t.router_probs.shape != (T, L, t.n_experts):
        raise TraceError(f"{source}: 'router_probs' shape {t.router_probs.shape}, expected {(T, L, t.n_experts)}")


def _scan_rows(shape) -> int:
    """Token rows checked at a time: SCAN_TOKEN_LAYERS token-layers."""
    return max(1, SCAN_TOKEN_LAYERS // max(1, int(np.prod(shape[1:-1], dtype=np.int64))))


def check_routing_rows(t: Trace, e: np.ndarray, row0: int, source: str) -> None:
    """Expert ids of token rows row0.. (a chunk of t's routing): in range, distinct within a token."""
    if not len(e):
        return
    lo, hi = int(e.min()), int(e.max())
    if lo < 0 or hi >= t.n_experts:
        bad = (e < 0) | (e >= t.n_experts)
        row = int(np.flatnonzero(bad.any(axis=(1, 2)))[0])
        raise TraceError(f"{source}: expert id {int(e[row][bad[row]][0])} out of range 0..{t.n_experts - 1} "
                         f"({_where(t, row0 + row)}); does the trace match the model?")
    if e.shape[2] > 1 and _has_repeat(e):
        srt = np.sort(e, axis=2)
        row = int(np.flatnonzero((srt[:, :, 1:] == srt[:, :, :-1]).any(axis=(1, 2)))[0])
        raise TraceError(f"{source}: a token lists the same expert twice in one layer ({_where(t, row0 + row)}); "
                         "top-k ids must differ")


def _where(t: Trace, row: int) -> str:
    req = int(np.searchsorted(t.offsets, row, side="right") - 1)
    return f"request '{t.request_id[req]}', token row {row}"


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
    """Validate, then write atomically (a crash never leaves a half-written trace): version 2,
    uncompressed so that it can be mapped, each routing array written in chunks (no second copy
    of it in memory) with its data 64-byte aligned, and meta routing_validated (this check).
    compress=True writes version 1 deflated instead: smaller, but loaded whole into memory."""
    validate(t, str(path))
    version = 1 if compress else FORMAT_VERSION
    small = {name: getattr(t, name) for name in PER_REQUEST_ARRAYS}
    small["arrival_s"] = None if t.arrival_s is None else np.asarray(t.arrival_s, dtype=np.float64)
    small["prompt_text"] = None if t.prompt_text is None else np.asarray(t.prompt_text).astype(str)
    routing = {}
    for name, dtype in (("experts", expert_dtype(t.n_experts)), ("gates", np.float16), ("router_probs", np.float16)):
        a = getattr(t, name)
        if a is not None:
            routing[name] = (a.shape, dtype, _row_chunks(a, dtype, t.source))
    return _write(trace_path(path), _file_meta(t.meta(), version), small, routing, compress)


def _row_chunks(a: np.ndarray, dtype, source):
    """An array's rows CHUNK_BYTES at a time, converted to dtype; a mapped trace's rows are
    released once written."""
    step = max(1, CHUNK_BYTES // max(1, a[:1].nbytes))
    for lo in range(0, len(a), step):
        yield a[lo:lo + step].astype(dtype, copy=False)
        if isinstance(source, MappedRows):
            source.drop_rows(lo, min(len(a), lo + step))


def _file_meta(meta: dict, version: int) -> dict:
    meta = {**meta, "version": version}
    if version >= 2:
        meta["routing_validated"] = True   # every writer of a file validates its routing first
    else:
        meta.pop("routing_validated", None)
    return meta


def _write(path: Path, meta: dict, small: dict, routing: dict, compress: bool) -> Path:
    """Write a trace's members through a temporary sibling renamed into place; routing:
    name -> (shape, dtype, chunks of rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; a trace is a normal shared file
        with os.fdopen(fd, "wb") as f, NpzWriter(f, compress) as w:
            w.add("meta", np.array(json.dumps(meta)))
            for name in ("request_id", "task", "prompt_tokens", "output_tokens"):
                w.add(name, small[name] if name != "task" else np.asarray(small[name]).astype(str))
            for name, (shape, dtype, chunks) in routing.items():
                w.add_chunks(name, shape, dtype, chunks, align=not compress)
                if name == "gates":   # the v1 member order np.savez wrote: optional per-request arrays here
                    for opt in ("arrival_s", "prompt_text"):
                        if small.get(opt) is not None:
                            w.add(opt, small[opt])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _open(path) -> NpzReader:
    path = Path(path)
    if not path.exists():
        raise TraceError(f"trace file '{path}' does not exist; make one with `emoe trace synth` "
                         "or `emoe trace import`")
    try:
        return NpzReader(path)
    except NpzError as e:
        raise TraceError(f"{path}: not a readable emoe trace (.npz): {e}") from None
    except OSError as e:   # a directory, no permission: the path is the user's to fix
        raise TraceError(f"{path}: not a readable emoe trace (.npz): {e.strerror}") from None


def _meta(z: NpzReader, path) -> dict:
    """An open trace file's checked meta."""
    if "meta" not in z.names:
        raise TraceError(f"{path}: missing 'meta'; this is not an emoe trace")
    meta = json.loads(str(_read(z, "meta", path)))
    if meta.get("format") != FORMAT_NAME:
        raise TraceError(f"{path}: format is {meta.get('format')!r}, expected '{FORMAT_NAME}'")
    if meta.get("version") not in SUPPORTED_VERSIONS:
        raise TraceError(f"{path}: unknown trace version {meta.get('version')!r}; this emoe reads "
                         f"versions {list(SUPPORTED_VERSIONS)} (upgrade emoe, or re-export the trace)")
    for key in ("model", "n_layers", "n_experts", "top_k"):
        if key not in meta:
            raise TraceError(f"{path}: meta lacks '{key}'")
    return meta


def _check_fields(z: NpzReader, path) -> None:
    missing = [a for a in REQUIRED_ARRAYS if a not in z.names]
    if missing:
        raise TraceError(f"{path}: missing field(s) {missing}; a trace needs {list(REQUIRED_ARRAYS)}")


def _read(z: NpzReader, name: str, path):
    try:
        return z.read(name)
    except NpzError as e:
        raise TraceError(f"{path}: {e}; the file is damaged, write it again") from None


def read_meta(path) -> dict:
    """A trace's meta alone (model, routing shape, model_shape if recorded), without loading its
    arrays: cheap even for a trace of gigabytes."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"trace file '{path}' does not exist")
    with _open(path) as z:
        return _meta(z, path)


def _trace(meta: dict, small: dict, routing: dict, source=None, request_source=None) -> Trace:
    return Trace(model=meta["model"], n_layers=int(meta["n_layers"]), n_experts=int(meta["n_experts"]),
                 top_k=int(meta["top_k"]), **small, **routing, n_shared_experts=int(meta.get("n_shared_experts", 0)),
                 extra=meta.get("extra", {}), model_shape=meta.get("model_shape"), source=source,
                 request_source=request_source)


def _read_small(z: NpzReader, path, mapped: dict | None = None) -> dict:
    """The per-request arrays; those in `mapped` (name -> array) are taken from there, not read."""
    mapped = mapped or {}
    small = {a: mapped[a] if a in mapped else _read(z, a, path) if a in z.names else None
             for a in PER_REQUEST_ARRAYS + ("arrival_s", "prompt_text") if a != "task"}
    return {**small, "task": _read_labels(z, "task", path)}


def _mapped(z: NpzReader, names, path) -> tuple[dict, list]:
    """Stored members mapped from the file: name -> read-only array, and their spans (data
    offset, bytes a row, rows) for MappedRows."""
    arrays, spans = {}, []
    for a in names:
        try:
            arrays[a], offset = z.map(a)
        except NpzError as e:
            raise TraceError(f"{path}: {e}; the file is damaged, write it again") from None
        row_bytes = int(np.prod(arrays[a].shape[1:], dtype=np.int64)) * arrays[a].itemsize
        spans.append((offset, row_bytes, len(arrays[a]) if arrays[a].ndim else 0))
    return arrays, spans


def _read_labels(z: NpzReader, name: str, path) -> np.ndarray:
    """A member of labels read 64 Ki at a time into shared strings (task_labels): a million
    requests' fixed-width labels are never in memory at once."""
    known: dict = {}
    try:
        parts = [task_labels(chunk, known) for chunk in z.chunks(name, LABEL_CHUNK)]
    except NpzError as e:
        raise TraceError(f"{path}: {e}; the file is damaged, write it again") from None
    return np.concatenate(parts) if parts else task_labels(z.read(name))


def load_trace(path, validate_routing: bool = True, mmap: bool = True) -> Trace:
    """Read a trace. Its routing arrays (experts, gates, router_probs) are mapped from an uncompressed
    file: read-only arrays whose pages are read when first used and dropped by Trace.release;
    a compressed file's are read into memory. mmap=False reads them into writable memory.
    The routing is checked as validate() says: a version-2 file whose writer validated it
    (meta routing_validated) only for its shapes; any other file id by id, in chunks."""
    path = Path(path)
    with _open(path) as z:
        meta = _meta(z, path)
        _check_fields(z, path)
        names = [a for a in ROUTING_ARRAYS if a in z.names]
        source = request_source = None
        if mmap and all(z.stored(a) for a in names):
            routing, spans = _mapped(z, names, path)
            # Per-request strings stay in the file too: read as requests are built and dropped as
            # they finish (a million ids are 32 MB as fixed-width strings; prompt texts, gigabytes).
            strings, string_spans = _mapped(z, [a for a in ("request_id", "prompt_text") if a in z.names
                                                and z.stored(a) and _is_text(z, a)], path)
            small = _read_small(z, path, mapped=strings)
            if z.mapping is not None:
                source, request_source = MappedRows.sharing(z.mapping, spans, string_spans)
        else:
            small = _read_small(z, path)
            routing = _read_routing(z, names, path, notice=mmap)
    t = _trace(meta, small, {a: routing.get(a) for a in ROUTING_ARRAYS}, source, request_source)
    if validate_routing:
        trusted = meta["version"] >= 2 and meta.get("routing_validated") is True
        validate(t, str(path), scan_routing=not trusted, unique_ids=not trusted)
        if request_source is not None and not trusted:
            request_source.drop_rows(0, t.n_requests)   # checked: the ids' pages need not stay in memory
    return t


def _is_text(z: NpzReader, name: str) -> bool:
    try:
        shape, dtype = z.header(name)
    except NpzError:
        return False   # (read, and named as damaged, by _read_small)
    return dtype.kind == "U" and len(shape) == 1


def _read_routing(z: NpzReader, names: list[str], path, notice: bool) -> dict:
    """Routing arrays read whole into memory (a compressed file, or mmap=False)."""
    size = sum(z.infos[a].file_size for a in names)
    compressed = not all(z.stored(a) for a in names)
    convert = f"`emoe trace convert {path} -o OUT.npz` writes an uncompressed copy that is mapped instead"
    if compressed and notice and size > COMPRESSED_NOTICE_BYTES:
        print(f"emoe: note: {path} is compressed: its routing ({size / 1e9:.1f} GB) is read into memory; {convert}",
              file=sys.stderr)
    try:
        return {a: _read(z, a, path) for a in names}
    except MemoryError:
        raise TraceError(f"{path}: its routing ({size / 1e9:.1f} GB) does not fit in memory"
                         + (f"; it is compressed: {convert}" if compressed else "; load it mapped")) from None


def convert_trace(src, dst, version: int = FORMAT_VERSION, compress: bool = False) -> dict:
    """Rewrite a trace in another version or compression, streaming: every routing array is read
    and written CHUNK_BYTES at a time, the expert ids checked on the way (validate's checks).
    Returns what was converted: requests, tokens, bytes read and written, seconds."""
    if version not in SUPPORTED_VERSIONS:
        raise TraceError(f"version {version}: this emoe writes versions {list(SUPPORTED_VERSIONS)}")
    if compress and version >= 2:
        raise TraceError("version 2 is never compressed (it is mapped, not loaded); compress with version 1")
    t0 = time.perf_counter()
    src, dst = Path(src), trace_path(dst)
    with _open(src) as z:
        meta = _meta(z, src)
        _check_fields(z, src)
        small = _read_small(z, src)
        names = [a for a in ROUTING_ARRAYS if a in z.names]
        try:
            headers = {a: z.header(a) for a in names}
        except NpzError as e:
            raise TraceError(f"{src}: {e}; the file is damaged") from None
        # The shapes checked before anything is written, against arrays of those shapes that hold nothing.
        shell = _trace(meta, small, {a: np.broadcast_to(np.zeros((), dtype), shape)
                                     for a, (shape, dtype) in headers.items()})
        validate(shell, str(src), scan_routing=False)
        routing = {a: (shape, dtype, _checked_chunks(z, a, shell, src)) for a, (shape, dtype) in headers.items()}
        _write(dst, _file_meta(meta, version), small, routing, compress)
    return dict(requests=shell.n_requests, tokens=shell.n_tokens, bytes_in=src.stat().st_size,
                bytes_out=dst.stat().st_size, seconds=time.perf_counter() - t0, path=dst,
                version_in=meta["version"], version_out=version)


def _checked_chunks(z: NpzReader, name: str, shell: Trace, path):
    """A member's rows, chunk by chunk; expert ids checked as they pass."""
    shape, dtype = z.header(name)
    rows = max(1, CHUNK_BYTES // max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize))
    row0 = 0
    try:
        for chunk in z.chunks(name, rows):
            if name == "experts":
                check_routing_rows(shell, chunk, row0, str(path))
            row0 += len(chunk)
            yield chunk
    except NpzError as e:
        raise TraceError(f"{path}: {e}; the file is damaged") from None


def check_matches_model(t: Trace, model, source: str = "trace") -> None:
    """A trace can only drive a model of the same routing shape."""
    if (t.n_layers, t.n_experts, t.top_k) != (model.n_moe_layers, model.n_experts, model.top_k):
        raise TraceError(
            f"{source}: routing shape (layers={t.n_layers}, experts={t.n_experts}, top_k={t.top_k}) of trace "
            f"model '{t.model}' does not match model '{model.name}' (layers={model.n_moe_layers}, "
            f"experts={model.n_experts}, top_k={model.top_k}); use a trace captured from or synthesised for "
            f"this model (`emoe trace synth --model {model.name}`)")
