"""Trace format version 2: written in chunks, mapped on load, its pages released; version 1
(np.savez, plain or deflated) still read; `emoe trace convert` between them, streaming."""
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import traces.format as fmt
from conftest import make_trace
from sim.cli import main
from traces.format import Trace, TraceError, convert_trace, load_trace, read_meta, save_trace
from traces.npz import RELEASE_BLOCK, MappedRows, NpzReader

ARRAYS = ("request_id", "task", "prompt_tokens", "output_tokens", "experts", "gates", "arrival_s", "prompt_text",
          "router_probs", "offsets")


def same(a: Trace, b: Trace) -> None:
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert (a.model, a.n_layers, a.n_experts, a.top_k, a.n_shared_experts, a.extra, a.model_shape) == \
        (b.model, b.n_layers, b.n_experts, b.top_k, b.n_shared_experts, b.extra, b.model_shape)


def save_v1(t: Trace, path, compress=False) -> Path:
    """A trace in the version-1 layout, written as emoe wrote it before version 2: np.savez."""
    arrays = dict(meta=np.array(json.dumps({**t.meta(), "version": 1})), request_id=t.request_id,
                  task=t.task.astype(str),   # (held as fixed-width strings then; now as shared objects)
                  prompt_tokens=t.prompt_tokens, output_tokens=t.output_tokens,
                  experts=t.experts.astype(fmt.expert_dtype(t.n_experts)), gates=t.gates.astype(np.float16))
    for name in ("arrival_s", "prompt_text", "router_probs"):
        if getattr(t, name) is not None:
            arrays[name] = getattr(t, name)
    (np.savez_compressed if compress else np.savez)(path, **arrays)
    return Path(path)


def test_v2_round_trip_is_mapped_aligned_and_read_only(tmp_path, tiny_trace):
    p = save_trace(tiny_trace, tmp_path / "t.npz")
    meta = read_meta(p)
    assert meta["version"] == 2 and meta["routing_validated"] is True
    with NpzReader(p) as z:
        for name in ("experts", "gates", "router_probs"):
            assert not z.infos[name].compress_type and z.data_offset(name)[0] % 64 == 0
    back = load_trace(p)
    same(back, tiny_trace)
    assert isinstance(back.source, MappedRows)
    for name in ("experts", "gates", "router_probs"):
        assert not getattr(back, name).flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        back.experts[0, 0, 0] = 1
    mem = load_trace(p, mmap=False)
    same(mem, tiny_trace)
    assert mem.source is None and mem.experts.flags.writeable
    # np.load still reads the file: it is an ordinary .npz.
    np.testing.assert_array_equal(np.load(p)["gates"], tiny_trace.gates)
    assert (p.stat().st_mode & 0o777) == 0o666 & ~_umask()
    assert save_trace(tiny_trace, tmp_path / "again.npz").read_bytes() == p.read_bytes()   # deterministic


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


@pytest.mark.parametrize("compress", [False, True])
def test_version_1_files_still_load(tmp_path, tiny_trace, compress):
    p = save_v1(tiny_trace, tmp_path / "v1.npz", compress)
    back = load_trace(p)
    same(back, tiny_trace)
    # An uncompressed v1 file is mapped like v2 (np.savez stores members as they are); a deflated one is read.
    assert isinstance(back.source, MappedRows) is (not compress)
    assert back.experts.flags.writeable is compress


def test_only_unvalidated_files_get_the_routing_scan(tmp_path, tiny_trace, monkeypatch):
    calls = []
    real = fmt.check_routing_rows
    monkeypatch.setattr(fmt, "check_routing_rows", lambda *a: calls.append(1) or real(*a))
    p = save_trace(tiny_trace, tmp_path / "v2.npz")
    calls.clear()                                        # save_trace's own check
    load_trace(p)
    assert calls == []                                   # the writer validated it
    load_trace(save_v1(tiny_trace, tmp_path / "v1.npz"))
    assert calls


def test_chunked_scan_names_a_bad_id_in_the_last_chunk(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    prompt, output = [30] * 8, [20] * 8
    T = sum(prompt) + sum(output)
    first = rng.integers(0, 8, (T, 3))
    experts = np.stack([first, (first + 1 + rng.integers(0, 7, (T, 3))) % 8], axis=2).astype(np.uint8)
    experts[T - 2, 1, 1] = 11                            # request r7, the one before its last token
    t = make_trace(experts, prompt, output, n_experts=8)
    p = save_v1(t, tmp_path / "bad.npz")
    monkeypatch.setattr(fmt, "SCAN_TOKEN_LAYERS", 3 * 16)   # 16 rows a chunk: 25 chunks
    with pytest.raises(TraceError, match=rf"expert id 11 out of range 0\.\.7 \(request 'r7', token row {T - 2}\)"):
        load_trace(p)
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 2 * 3 * 16)    # convert streams in chunks and checks the same way
    with pytest.raises(TraceError, match=rf"expert id 11 .*request 'r7', token row {T - 2}"):
        convert_trace(p, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists() and sorted(f.name for f in tmp_path.iterdir()) == ["bad.npz"]
    experts[T - 2, 1, 1] = experts[T - 2, 1, 0]          # now a repeated expert, named the same way
    with pytest.raises(TraceError, match=rf"same expert twice in one layer \(request 'r7', token row {T - 2}\)"):
        load_trace(save_v1(make_trace(experts, prompt, output, n_experts=8), tmp_path / "rep.npz"))


def test_convert_both_ways_through_the_cli(tmp_path, tiny_trace, capsys):
    v2 = save_trace(tiny_trace, tmp_path / "v2.npz")
    assert main(["trace", "convert", str(v2), "-o", str(tmp_path / "v1.npz"), "--to-version", "1"]) == 0
    assert "12 requests" in capsys.readouterr().out
    assert read_meta(tmp_path / "v1.npz")["version"] == 1 and "routing_validated" not in read_meta(tmp_path / "v1.npz")
    assert main(["trace", "convert", str(tmp_path / "v1.npz"), "-o", str(tmp_path / "c.npz"), "--compress"]) == 0
    assert main(["trace", "convert", str(tmp_path / "c.npz"), "-o", str(tmp_path / "back.npz")]) == 0
    for name in ("v1.npz", "c.npz", "back.npz"):
        same(load_trace(tmp_path / name), tiny_trace)
    assert (tmp_path / "back.npz").read_bytes() == v2.read_bytes()   # v2 -> v1 -> compressed v1 -> v2
    assert load_trace(tmp_path / "c.npz").source is None
    capsys.readouterr()
    # The overwrite rule: an existing output is refused, untouched, unless --force.
    before = (tmp_path / "c.npz").read_bytes()
    assert main(["trace", "convert", str(v2), "-o", str(tmp_path / "c.npz")]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "c.npz").read_bytes() == before
    assert main(["trace", "convert", str(v2), "-o", str(tmp_path / "c.npz"), "--force"]) == 0
    assert (tmp_path / "c.npz").read_bytes() == v2.read_bytes()
    capsys.readouterr()
    assert main(["trace", "convert", str(tmp_path / "none.npz"), "-o", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert main(["trace", "convert", str(v2), "-o", str(tmp_path / "x.npz"), "--to-version", "2", "--compress"]) == 2
    assert "never compressed" in capsys.readouterr().err and not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("keep", [0.5, 0.9, -10])
def test_truncated_file_is_one_trace_error(tmp_path, tiny_trace, capsys, keep):
    p = save_trace(tiny_trace, tmp_path / "t.npz")
    data = p.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[:int(len(data) * keep)] if keep > 0 else data[:keep])
    with pytest.raises(TraceError, match="cut.npz"):
        load_trace(cut)
    assert main(["trace", "info", str(cut)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("emoe: error:")


def test_compressed_trace_notes_and_errors_suggest_convert(tmp_path, tiny_trace, monkeypatch, capsys):
    p = save_trace(tiny_trace, tmp_path / "c.npz", compress=True)
    assert read_meta(p)["version"] == 1
    monkeypatch.setattr(fmt, "COMPRESSED_NOTICE_BYTES", 0)
    load_trace(p)
    err = capsys.readouterr().err
    assert "is compressed" in err and "emoe trace convert" in err
    load_trace(p, mmap=False)
    assert capsys.readouterr().err == ""                  # asked for memory: no note
    real = NpzReader.read

    def read(self, name):
        if name == "experts":
            raise MemoryError
        return real(self, name)
    monkeypatch.setattr(NpzReader, "read", read)
    with pytest.raises(TraceError, match="does not fit in memory; it is compressed: `emoe trace convert"):
        load_trace(p)


def _rss() -> int:
    """The file-backed part of the process's RSS (VmRSS = RssAnon + RssFile + RssShmem): mapped
    trace pages, without the anonymous memory the test's own arrays take and give back."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_released_requests_leave_memory(tmp_path):
    R, n, L, E = 1000, 1000, 16, 8                      # 1 M tokens: 32 MB experts + 64 MB gates
    rng = np.random.default_rng(1)
    first = rng.integers(0, E, (R * n, L))
    experts = np.stack([first, (first + 1 + rng.integers(0, E - 1, (R * n, L))) % E], axis=2).astype(np.uint8)
    t = make_trace(experts, [n // 2] * R, [n // 2] * R, n_experts=E)
    p = save_trace(t, tmp_path / "big.npz")
    del t, experts, first
    tr = load_trace(p)
    size = tr.experts.nbytes + tr.gates.nbytes
    read = lambda tr, r: float(tr.experts[tr.token_slice(r)].sum()) + float(tr.gates[tr.token_slice(r)].sum())
    base = _rss()
    for r in range(R):
        read(tr, r)
    assert _rss() - base > 0.8 * size                   # every page read is in the process's memory
    for r in range(R):
        tr.release(r)
    assert _rss() - base < 0.05 * size                   # released, it is gone
    # As an engine reads: 16 requests in flight, each read again at every step, released when done.
    tr, peak = load_trace(p), 0
    base = _rss()
    for r in range(R + 16):
        for q in range(max(0, r - 16), min(r, R)):
            tr.experts[tr.token_slice(q)][: r - q].sum()
        if r >= 16:
            read(tr, r - 16)
            tr.release(r - 16)
        peak = max(peak, _rss() - base)
    # Pages are dropped by 2 MiB blocks once all their rows are released: what stays is the
    # requests in flight and, in each mapped array (experts, gates, request ids), the partly
    # released blocks around them.
    assert tr.request_source is not None and len(tr.request_source.arrays) == 1
    slack = 3 * 2 * RELEASE_BLOCK
    assert peak < 16 * size / R + slack and _rss() - base < 0.05 * size
    # A workload's first requests stay mapped (views with the same release hook, rows shifted).
    tr = load_trace(p)
    head = tr.subset(np.arange(100, 400))
    assert isinstance(head.source, MappedRows) and np.shares_memory(head.experts, tr.experts)
    before = _rss()
    for r in range(head.n_requests):
        read(head, r)
    assert _rss() - before > 0.25 * size                 # 30% of the requests
    for r in range(head.n_requests):
        head.release(r)
    assert _rss() - before <= slack                      # the blocks shared with requests 99 and 400
    np.testing.assert_array_equal(head.experts, tr.experts[tr.offsets[100]:tr.offsets[400]])
    # Any other selection is a copy in memory.
    assert tr.subset([3, 1]).source is None


def test_simulation_on_a_mapped_trace_equals_one_in_memory(tmp_path, tiny_trace_path):
    from simhelpers import tiny_scenario
    from sim.run import run_scenario
    sc = tiny_scenario(tiny_trace_path, workload__requests=12)
    p = convert_trace(tiny_trace_path, tmp_path / "v2.npz")["path"]
    mapped, memory = load_trace(p), load_trace(p, mmap=False)
    assert isinstance(mapped.source, MappedRows)
    a = run_scenario(sc, trace=mapped.subset(np.arange(12)))
    b = run_scenario(sc, trace=memory.subset(np.arange(12)))
    assert a.summary == b.summary
    assert a.requests.equals(b.requests) and a.timeline.equals(b.timeline)


SHAPES = st.tuples(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), max_size=5),
                   st.integers(1, 3), st.sampled_from([2, 5, 300]), st.integers(1, 3), st.booleans(), st.booleans())


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(shape=SHAPES, seed=st.integers(0, 2 ** 16))
def test_round_trip_of_any_small_shape(shape, seed):
    lengths, L, E, k, probs, arrivals = shape
    k = min(k, E)
    rng = np.random.default_rng(seed)
    T = sum(p + o for p, o in lengths)
    experts = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :k]         # k distinct ids per token
    gates = rng.random((T, L, k)).astype(np.float16)
    t = Trace(model="m", n_layers=L, n_experts=E, top_k=k, request_id=[f"q{i}" for i in range(len(lengths))],
              task=["a"] * len(lengths), prompt_tokens=[p for p, _ in lengths], output_tokens=[o for _, o in lengths],
              experts=experts.astype(fmt.expert_dtype(E)), gates=gates,
              router_probs=rng.random((T, L, E)).astype(np.float16) if probs else None,
              arrival_s=np.arange(len(lengths), dtype=float) if arrivals else None)
    with tempfile.TemporaryDirectory() as d:
        p = save_trace(t, Path(d) / "t.npz")
        same(load_trace(p), t)
        same(load_trace(p, mmap=False), t)
        convert_trace(p, Path(d) / "v1.npz", version=1, compress=bool(seed % 2))
        same(load_trace(Path(d) / "v1.npz"), t)
        assert convert_trace(Path(d) / "v1.npz", Path(d) / "v2.npz")["path"].read_bytes() == p.read_bytes()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_overlap_digests_read_a_mapped_trace_without_keeping_it(tmp_path, monkeypatch):
    """The predictor-overlap check hashes every request's routing before a run: on a mapped
    trace its pages are dropped as it goes, and the digests are those of the trace in memory."""
    from sim.predictors import overlap
    R, n, L, E = 400, 1000, 16, 8                       # 400 k tokens: 12.8 MB of experts
    rng = np.random.default_rng(2)
    first = rng.integers(0, E, (R * n, L))
    experts = np.stack([first, (first + 1) % E], axis=2).astype(np.uint8)
    t = make_trace(experts, [n // 2] * R, [n // 2] * R, n_experts=E)
    p = save_trace(t, tmp_path / "big.npz")
    monkeypatch.setattr(overlap, "DROP_ROWS", 50_000)
    tr = load_trace(p)
    base = _rss()
    assert overlap.request_digests(tr) == overlap.request_digests(t)
    assert _rss() - base < 0.2 * tr.experts.nbytes


def test_task_labels_are_shared_strings_that_read_and_write_as_strings(tmp_path, tiny_trace):
    """A loaded trace holds one Python string per task, shared by its requests (a million
    requests' fixed-width labels cost 52 MB), and they behave as the strings they were; the
    file holds a plain string array (no pickled objects), so np.load reads it as before."""
    p = save_trace(tiny_trace, tmp_path / "t.npz")
    t = load_trace(p)
    assert t.task.dtype == object and len({id(x) for x in t.task}) == len(t.tasks)
    want = np.asarray(tiny_trace.task).astype(str)
    assert t.task.tolist() == want.tolist() and t.tasks == sorted(set(want.tolist()))
    first = t.tasks[0]
    assert np.array_equal(t.task == first, want == first) and np.array_equal(np.isin(t.task, [first]), want == first)
    sub = t.subset(np.flatnonzero(t.task == first))
    assert sub.tasks == [first] and all(x is t.task[np.flatnonzero(t.task == first)[0]] for x in sub.task)
    with np.load(p, allow_pickle=False) as z:
        assert z["task"].dtype.kind == "U" and z["task"].tolist() == want.tolist()


@pytest.mark.parametrize("writer", ["v2", "v1 uncompressed"])
def test_request_ids_and_prompt_texts_stay_in_the_file_until_read(tmp_path, writer):
    """Per-request strings of a mapped trace are read as requests are built and leave memory as
    they finish (a million requests' ids as fixed-width strings are 32 MB, long ones or prompt
    texts far more). A file nobody validated has its ids checked unique at load, then dropped."""
    from dataclasses import replace
    R = 20_000                                           # ids of 100 characters: 8 MB, texts 16 MB
    experts = np.zeros((R, 1, 1), np.uint8)
    t = make_trace(experts, [1] * R, [0] * R, n_experts=2)
    t = replace(t, request_id=np.array([f"{i:0100d}" for i in range(R)]),
                prompt_text=np.array([f"{i:0200d}" for i in range(R)]))
    p = save_trace(t, tmp_path / "t.npz") if writer == "v2" else save_v1(t, tmp_path / "t.npz")
    size = t.request_id.nbytes + t.prompt_text.nbytes
    del t
    base = _rss()
    tr = load_trace(p)
    assert not tr.request_id.flags.writeable and not tr.prompt_text.flags.writeable   # mapped, not read
    assert _rss() - base < 0.1 * size                    # the load (and a v1 file's id check) left none in memory
    got = [str(tr.request_id[r]) + str(tr.prompt_text[r]) for r in range(R)]
    assert got == [f"{r:0100d}{r:0200d}" for r in range(R)]
    assert _rss() - base > 0.8 * size
    for r in range(R):
        tr.release(r)
    assert _rss() - base < 0.1 * size                    # released, they are gone
    head = tr.subset(np.arange(5, 105))                  # a workload's first requests: still mapped, shifted
    assert np.shares_memory(head.request_id, tr.request_id) and head.request_id[0] == f"{5:0100d}"
    assert head.request_source.row0 == 5
    if writer == "v1 uncompressed":                      # nobody checked this file: its ids are
        save_v1(replace(tr, request_id=np.array(["same"] * R)), tmp_path / "dup.npz")
        with pytest.raises(TraceError, match="not unique"):
            load_trace(tmp_path / "dup.npz")


def test_task_labels_are_converted_in_chunks_sharing_one_string_per_task(monkeypatch):
    """Fixed-width labels are converted a chunk at a time (no full-size copy and sort of a
    million labels), every chunk sharing the same strings; a scalar is one label, which
    validation counts against the requests like any other wrong length."""
    monkeypatch.setattr(fmt, "LABEL_CHUNK", 7)
    want = np.array(["qa", "summarization", "code"])[np.random.default_rng(0).integers(0, 3, 50)]
    got = fmt.task_labels(want)
    assert got.tolist() == want.tolist() and len({id(x) for x in got}) == 3
    with pytest.raises(TraceError, match="'task' has 1 entries but there are 2 requests"):
        make_trace(np.zeros((2, 1, 1)), [1, 1], [0, 0], tasks="qa").validate()
