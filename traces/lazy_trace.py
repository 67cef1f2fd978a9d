"""Synthetic traces whose routing is generated as it is read.

A million-request synthetic workload cannot be held whole (1M Mixtral requests of 768
tokens are ~147 GB of routing). `lazy_synthesize` draws what is small up front (each
request's task and lengths: traces.synth.plan_synthesis) and returns a Trace whose
`experts`, `gates` and `router_probs` are LazyRows: reading a row generates the chunk of
whole requests that holds it, exactly as synthesize would, so every row is byte for byte
synthesize's.

The random stream is sequential, so chunks are first generated in order (reading chunk j
generates the chunks before it). Each chunk's starting point (the stream's state and the
recurrence state) is kept, so a chunk dropped from memory can be generated again alone.
A chunk is dropped once every request in it is released (Trace.release, called by the
engine when a request finishes or is rejected) and, beyond `cache_bytes`, the least
recently read chunks are dropped: memory holds the chunks of in-flight requests. Whether a
chunk is held only changes speed, never the rows read.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from traces.format import Trace, expert_dtype
from traces.synth import SynthPlan, plan_synthesis

CACHE_BYTES = 2 << 30   # chunks held beyond those in use (a default chunk of Mixtral routing: ~80 MB)


def lazy_synthesize(model, tasks, n_requests: int, *, first: int | None = None, cache_bytes: int = CACHE_BYTES,
                    **kw) -> Trace:
    """synthesize(model, tasks, n_requests, **kw) with routing generated on demand; `first`:
    only the first requests (the same as synthesize(...).subset(range(first)), generating no more).
    With `rate`, arrivals are drawn after all routing, so all of it is generated once up
    front (and, beyond cache_bytes, dropped)."""
    plan = plan_synthesis(model, tasks, n_requests, **kw)
    n = plan.n_requests if first is None else min(int(first), plan.n_requests)
    src = LazySource(plan, n, cache_bytes)
    arrival = src.draw_arrivals()
    m = plan.model
    L, E, k = m.n_moe_layers, m.n_experts, m.top_k
    probs = LazyRows(src, 2, (L, E), np.float16) if plan.router_probs else None
    return plan.trace(LazyRows(src, 0, (L, k), expert_dtype(E)), LazyRows(src, 1, (L, k), np.float16), probs,
                      arrival, source=src, n_requests=n)


def materialise(t: Trace) -> Trace:
    """The trace with its routing in memory (the whole of it: only for traces that fit)."""
    if t.source is None:
        return t
    return t.subset(np.arange(t.n_requests))


class LazySource:
    """The routing of the first n requests of a SynthPlan, generated chunk by chunk."""

    def __init__(self, plan: SynthPlan, n: int, cache_bytes: int = CACHE_BYTES):
        self.plan = plan
        self.n_rows = int(plan.offsets[n])
        n_chunks = int(np.searchsorted(plan.chunk_starts, n, side="left"))   # chunks holding requests < n
        self.row_starts = np.minimum(plan.offsets[plan.chunk_starts[:n_chunks + 1]], self.n_rows)
        self.rows_left = np.diff(self.row_starts)   # per chunk: rows not yet released
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[int, tuple] = OrderedDict()   # chunk -> (experts, gates, probs), oldest first
        self._rng = plan.rng
        self._last_dev: dict = {}
        self._starts: list = []   # per chunk generated: (stream state, recurrence state) where it starts
        self.generated = 0        # chunk generations, first and repeated
        self.peak_cached = 0

    @property
    def n_chunks(self) -> int:
        return len(self.rows_left)

    @property
    def cached(self) -> list[int]:
        return list(self._cache)

    def chunk_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.row_starts, rows, side="right") - 1

    def chunk(self, j: int) -> tuple:
        """Chunk j's (experts, gates, probs), generating it (and, the first time, those before it)."""
        got = self._cache.get(j)
        if got is not None:
            self._cache.move_to_end(j)
            return got
        if j < len(self._starts):
            got = self._regenerate(j)
        else:
            while len(self._starts) <= j:
                i, got = len(self._starts), self._next()
                if i < j and self.rows_left[i] > 0:   # read soon, if ever (reads follow arrivals)
                    self._keep(i, got)
        self._keep(j, got)
        return got

    def release_rows(self, lo: int, hi: int) -> None:
        """Rows lo:hi (one request) will not be read again: a chunk all released is dropped."""
        if hi <= lo or lo >= self.n_rows:
            return
        j = int(self.chunk_of(lo))
        self.rows_left[j] -= min(hi, int(self.row_starts[j + 1])) - lo
        if self.rows_left[j] <= 0:
            self._cache.pop(j, None)

    def draw_arrivals(self) -> np.ndarray | None:
        """The plan's arrivals; `rate` arrivals come after all routing on the stream, so generate it all."""
        if self.plan.draws_arrivals():
            while len(self._starts) < self.plan.n_chunks:
                i, got = len(self._starts), self._next()
                if i < self.n_chunks:
                    self._keep(i, got)
        return self.plan.arrivals(self._rng)

    def _next(self) -> tuple:
        """The next chunk in stream order; its starting point is kept for a later regeneration
        (the recurrence arrays copied: they are views into the chunk's deviations)."""
        self._starts.append((self._rng.bit_generator.state, {t: d.copy() for t, d in self._last_dev.items()}))
        self.generated += 1
        return self.plan.route_chunk(len(self._starts) - 1, self._rng, self._last_dev)

    def _regenerate(self, j: int) -> tuple:
        state, last_dev = self._starts[j]
        rng = np.random.Generator(type(self._rng.bit_generator)())
        rng.bit_generator.state = state
        self.generated += 1
        return self.plan.route_chunk(j, rng, dict(last_dev))

    def _keep(self, j: int, arrays: tuple) -> None:
        self._cache[j] = arrays
        self._cache.move_to_end(j)
        size = lambda a: sum(x.nbytes for x in a if x is not None)
        total = sum(size(a) for a in self._cache.values())
        while total > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            total -= size(old)
        self.peak_cached = max(self.peak_cached, len(self._cache))


class LazyRows:
    """One routing array (experts, gates or router_probs) of a LazySource, read like an ndarray
    by rows: an int, a slice, an int or boolean array of rows (any shape), or such a row key
    followed by more indices. Reads return plain ndarrays."""
    ndim = 3

    def __init__(self, src: LazySource, part: int, row_shape: tuple, dtype):
        self.src, self.part, self.row_shape, self.dtype = src, part, tuple(row_shape), np.dtype(dtype)

    @property
    def shape(self) -> tuple:
        return (self.src.n_rows,) + self.row_shape

    def __len__(self) -> int:
        return self.src.n_rows

    def __array__(self, dtype=None, copy=None):
        """All rows: the whole array in memory (np.asarray of a lazy trace's routing)."""
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            head = self[key[0]]
            return head[key[1:]] if isinstance(key[0], (int, np.integer)) else head[(slice(None),) + key[1:]]
        n = self.src.n_rows
        if isinstance(key, (int, np.integer)):
            r = int(key) + n if key < 0 else int(key)
            if not 0 <= r < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            j = int(self.src.chunk_of(r))
            return self.src.chunk(j)[self.part][r - self.src.row_starts[j]]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1 and stop > start:
                j = int(self.src.chunk_of(start))
                lo, hi = int(self.src.row_starts[j]), int(self.src.row_starts[j + 1])
                if stop <= hi:   # within one chunk: a view of it
                    return self.src.chunk(j)[self.part][start - lo:stop - lo]
            key = np.arange(start, stop, step, dtype=np.int64)
        key = np.asarray(key)
        if key.dtype == bool:
            if key.shape != (n,):
                raise IndexError(f"boolean row mask of shape {key.shape} for {n} rows")
            key = np.flatnonzero(key)
        if not np.issubdtype(key.dtype, np.integer):
            raise IndexError(f"rows must be integers, a slice or a boolean mask, got {key.dtype}")
        return self._gather(key)

    def _gather(self, key: np.ndarray) -> np.ndarray:
        n = self.src.n_rows
        rows = key.ravel().astype(np.int64)
        rows = np.where(rows < 0, rows + n, rows)
        out = np.empty((len(rows),) + self.row_shape, dtype=self.dtype)
        if len(rows):
            if rows.min() < 0 or rows.max() >= n:
                raise IndexError(f"row index out of range for {n} rows")
            cid = self.src.chunk_of(rows)
            for j in np.unique(cid).tolist():
                sel = cid == j
                out[sel] = self.src.chunk(j)[self.part][rows[sel] - self.src.row_starts[j]]
        return out.reshape(key.shape + self.row_shape)
