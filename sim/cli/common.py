"""What several `emoe` subcommands share: registry-backed choices, model presets and scenarios
named on the command line, output writes, progress bars and the run summary."""
from __future__ import annotations

import argparse
import math
import re

import importlib
import os
import shutil
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from traces.errors import UserError, message


class Registry:
    """argparse choices read from a registry the first time argparse asks: the names stay where they
    are defined, and a slow module (pandas, torch) loads only when its command runs or shows help.
    Give each such option a metavar: without one argparse lists the choices as it builds the parser."""

    def __init__(self, module: str, attr: str, first=(), where=None):
        self.module, self.attr, self.first, self.where = module, attr, tuple(first), where
        self._names = None

    def names(self) -> list[str]:
        if self._names is None:
            registry = getattr(importlib.import_module(self.module), self.attr)
            self._names = list(self.first) + [k for k in registry if self.where is None or self.where(registry[k])]
        return self._names

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name):
        return name in self.names()

    def __len__(self):
        return len(self.names())


def preset(name: str, option: str = "--model"):
    """A model preset named on the command line."""
    from traces.model_shape import get_model
    try:
        return get_model(name)
    except (KeyError, ValueError, TypeError) as e:   # get_model's own input checks
        raise UserError(f"{option}: {message(e)}") from None


def write_text(path, text: str, option: str) -> Path:
    """Write an output file atomically (a crash leaves the old file or the new one, never half);
    an unwritable path is the user's to fix, named by its option."""
    from traces.atomic import write_text
    if Path(path).is_dir():
        raise UserError(f"{option} {path}: is a directory; give a file name")
    try:
        return write_text(path, text)
    except (PermissionError, NotADirectoryError, FileExistsError) as e:   # the place, not the program
        raise UserError(f"{option} {path}: cannot write there ({e.strerror}); choose another path") from None


def progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="req", disable=None, leave=False)


def add_set(s, help=None):
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help=help)


def scenario(a):
    """A scenario YAML, or a directory holding one (a sweep point, a results directory)."""
    from sim.scenario import load_scenario
    path = Path(a.scenario)
    if path.is_dir():
        if not (path / "scenario.yaml").exists():
            raise UserError(f"'{path}' is a directory without scenario.yaml; give a scenario YAML, a sweep "
                            "point directory (SWEEP/points/HASH) or a results directory")
        path = path / "scenario.yaml"
    return load_scenario(path, a.set or [])


def add_force(s):
    s.add_argument("--force", action="store_true", help="overwrite outputs that exist (never done without it)")


def output_file(path, option: str, force: bool) -> Path:
    """The one overwrite rule for a file, checked before anything runs: one that exists is
    replaced only with --force."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option} {p}: is a directory; give a file name")
    if p.exists() and not force:
        raise UserError(f"{option} {p}: exists; choose another path or add --force to overwrite it "
                        "(nothing was overwritten)")
    return p


def output_dir(path, option: str, force: bool) -> Path:
    """The same rule for a directory of figures: one with anything in it is written into only with
    --force (its files of the same names are replaced, its others kept)."""
    p = Path(path)
    if p.is_dir() and any(p.iterdir()) and not force:
        raise UserError(f"{option} {p}: exists and is not empty; choose another directory or add --force to "
                        "overwrite its figures (nothing was overwritten)")
    return p


# Files only emoe writes into a results directory (run, replay: summary.json, meta.json; confirm:
# verdict.txt, comparison.json): --force replaces a directory holding one, never any other.
RESULTS_MARKERS = ("summary.json", "meta.json", "verdict.txt", "comparison.json")


def results_dir(out: Path, force: bool = False) -> Path:
    """Refuse, before anything runs, a results directory that is taken or cannot be made:
    a long run must not end by failing to write its results. With --force an earlier results
    directory is taken: `replacing` swaps it for the new one."""
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: a file of that name exists; give a directory for the results")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"results directory '{out}' exists and is not empty; choose another -o or add --force "
                            "to replace it (nothing was overwritten)")
        cwd = Path.cwd()
        if not any((out / m).exists() for m in RESULTS_MARKERS) or out.resolve() in (cwd, *cwd.parents):
            raise UserError(f"-o {out}: not a results directory emoe wrote (none of {', '.join(RESULTS_MARKERS)}); "
                            "--force replaces only those; choose another -o")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"-o {out}: '{parent}' is a file, not a directory; choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"-o {out}: cannot write in '{parent}' (permission denied); choose another -o")
    return out


@contextmanager
def replacing(out: Path):
    """Write a results directory in place of an earlier one (--force): the earlier one is set aside
    while the command writes, deleted once it has, and put back if it fails."""
    if not (out.is_dir() and any(out.iterdir())):
        yield
        return
    aside = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
    os.replace(out, aside)
    try:
        yield
    except BaseException:
        if out.exists():
            shutil.rmtree(out)
        os.replace(aside, out)
        raise
    shutil.rmtree(aside)


def default_results_dir(name: str, kind: str = "") -> Path:
    """runs/NAME[-KIND]-TIMESTAMP-TOKEN: the random token keeps two runs started in the same
    second (or on two machines sharing runs/) out of each other's directory."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    # A scenario's name is a label, not a path: '../x' or 'a/b' must not leave runs/.
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(name)).strip(".-") or "run"
    return Path("runs") / f"{safe}{'-' + kind if kind else ''}-{stamp}-{uuid.uuid4().hex[:6]}"


SUMMARY_ROWS = [("requests_completed", "requests completed", "{:.0f}"), ("requests_rejected", "rejected", "{:.0f}"),
                ("peak_memory_bytes", "peak memory (GB)", "gb"), ("peak_experts_bytes", "  experts (GB)", "gb"),
                ("peak_kv_bytes", "  KV cache (GB)", "gb"), ("ttft_mean_s", "TTFT mean (s)", "{:.3f}"),
                ("ttft_p99_s", "TTFT p99 (s)", "{:.3f}"), ("tpot_mean_s", "TPOT mean (s)", "{:.4f}"),
                ("e2e_mean_s", "end-to-end mean (s)", "{:.3f}"), ("e2e_p99_s", "end-to-end p99 (s)", "{:.3f}"),
                ("throughput_tokens_per_s", "throughput (tok/s)", "{:.1f}"),
                ("slo_attainment", "SLO attainment", "{:.1%}"), ("expert_hit_rate", "expert hit rate", "{:.1%}"),
                ("bytes_loaded", "bytes loaded (GB)", "gb"), ("routing_fidelity", "routing fidelity", "{:.2%}"),
                ("routing_fidelity_sensitive", "  in sensitive layers", "{:.2%}"),
                ("estimated_quality", "est. quality (agreement)", "{:.1%}"),
                ("engine_steps", "engine steps", "{:.0f}")]


def print_summary(s: dict, title: str = ""):
    if title:
        print(title)
    for key, label, fmt in SUMMARY_ROWS:
        v = s.get(key)
        if v is None:
            continue
        print(f"  {label:24s} {v / 1e9:.2f}" if fmt == "gb" else f"  {label:24s} " + fmt.format(v))


@contextmanager
def needs(command: str, extra: str):
    """Around the imports of an optional dependency: missing, it is the user's to install (one line)."""
    try:
        yield
    except ImportError as e:
        raise UserError(f"{command} needs the '{extra}' extra ({e}); install with: pip install torch==2.13.0 && "
                        f"pip install -e '.[{extra}]'") from None


# ---- option values: checked as they are read, so a zero, negative or NaN never passes silently ----
def _number(text: str, kind):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'a whole' if kind is int else 'a'} number, got {text!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def positive_whole(text: str) -> int:
    v = _number(text, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return v


def count(text: str) -> int:
    """A whole number >= 0 (seeds)."""
    v = _number(text, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return v


def positive(text: str) -> float:
    v = _number(text, float)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def share(text: str) -> float:
    """A fraction in [0, 1]."""
    v = _number(text, float)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be a share between 0 and 1, got {text!r}")
    return v


def open_share(text: str) -> float:
    """A fraction strictly between 0 and 1 (a held-out share)."""
    v = _number(text, float)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be a share strictly between 0 and 1, got {text!r}")
    return v
