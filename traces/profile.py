"""A routing profile: the knobs of the synthetic generator, built in or fitted to a real trace.

Built-in profiles are named (`real`, `paper`); a fitted profile is a YAML file
written by `emoe trace fit` that also carries the routing shape it was fitted on,
each task's request share, lengths and expert popularity (per phase and layer),
and how the fit went. Per-layer knobs are a number (every layer) or a list: of
length n_layers, or of any other length read as knots spread evenly over depth
(so one list serves models of any depth).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import yaml

from traces.errors import UserError
from traces import yamlio

PROFILE_FORMAT = "emoe-routing-profile"
PROFILE_VERSION = 1


@dataclass(frozen=True)
class RoutingProfile:
    name: str
    layer_skew: float           # sd of per-layer log-popularity (layers without measured data)
    task_specialisation: float  # sd of a task's log-popularity offset per layer
    request_deviation: float | tuple   # sd of a request's log-popularity offset (per layer, or one for all)
    temporal_copy: float        # probability a token keeps the previous token's experts (paper's recurrence)
    cross_layer: float          # strength of the layer l-1 top-1 -> layer l affinity (a one-step chain)
    gate_temperature: float = 1.0
    recurrence: float = 0.0     # AR(1) coefficient of request deviations along a task's request order
    # A token's latent, scaled by path_strength: a share 1 - w is its path (new at every token,
    # projected by matrices that drift across layers by path_persistence, so dependence
    # decays slowly with layer distance), a share w its context (an AR(1) across the
    # request's tokens, context_persistence, so reuse decays with token distance; its
    # projections drift across layers by context_layer_persistence).
    path_strength: float | tuple = 0.0
    context_share: float | tuple = 0.0
    context_persistence: float = 0.0
    path_persistence: float = 1.0
    context_layer_persistence: float = 0.5
    latent_dim: int = 8
    phase_shift: float = 0.0    # sd of the prompt tokens' log-popularity offset from generated tokens'
    gate_power: float = 1.0     # gates ~ exp(-(gap to the top-1 logit)^power / temperature)
    # Fitted profiles only: routing shape, per-task tables, fit report.
    shape: dict | None = None
    tasks: dict | None = field(default=None, compare=False)
    fit: dict | None = field(default=None, compare=False)

    def knobs(self) -> dict:
        """The scalar and per-layer knobs (what `--knob` may override)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("name", "shape", "tasks", "fit")}

    def has_path(self) -> bool:
        return bool(np.any(np.asarray(self.path_strength, dtype=float) > 0))


# `real`: fitted (traces/fit.py, `fit_mixtral_real`) to real Mixtral-8x7B-Instruct decode
# routing of code and math prompts (REAL_MIXTRAL_STRUCTURE in traces/realdata.py) and to
# routing-stats' per-domain popularity; see README "Synthetic traces and their calibration".
# `paper`: reaches PAPER.md's recurrence - consecutive prompts 0.75-0.95, a prompt and its
# 20th successor ~0.5 - through request deviations that drift slowly along a task's requests.
PROFILES = {
    "real": RoutingProfile("real",
                           layer_skew=0.1099, task_specialisation=0.2404, request_deviation=0.5157,
                           temporal_copy=0, cross_layer=0, gate_temperature=1.713, recurrence=0,
                           path_strength=(1.987, 3.369, 3.501, 3.272, 3.494, 3.209, 3.499, 3.668, 3.565, 3.633,
                           3.399, 3.447, 3.46, 3.287, 3.272, 3.267, 3.371, 2.939, 3.367, 3.287, 3.18, 3.368,
                           3.428, 3.659, 3.318, 3.433, 3.33, 3.122, 2.16, 2.101, 2.046, 2.134),
                           context_share=(0.0091, 0.6554, 0.6809, 0.6346, 0.6797, 0.6201, 0.6805, 0.7092,
                           0.6922, 0.7036, 0.6615, 0.6708, 0.6732, 0.638, 0.6346, 0.6334, 0.6557, 0.5472,
                           0.6549, 0.638, 0.6131, 0.655, 0.6671, 0.7079, 0.6447, 0.6682, 0.6473, 0.5986, 0.1618,
                           0.1136, 0.0658, 0.1411), context_persistence=0.5708, path_persistence=1,
                           context_layer_persistence=0.9175, latent_dim=8, phase_shift=0.4072, gate_power=0.874),
    "paper": RoutingProfile("paper", layer_skew=1.0, task_specialisation=0.6, request_deviation=1.6,
                            temporal_copy=0.04, cross_layer=4.0, recurrence=0.85),
}


def per_layer(value, n_layers: int) -> np.ndarray:
    """A per-layer knob as an (n_layers,) array: a number, n_layers values, or depth knots."""
    v = np.atleast_1d(np.asarray(value, dtype=float))
    if len(v) == 1:
        return np.full(n_layers, v[0])
    if len(v) == n_layers:
        return v.copy()
    return np.interp(np.linspace(0, 1, n_layers), np.linspace(0, 1, len(v)), v)


def _plain(x):
    """YAML-safe plain Python values (tuples and numpy scalars become lists and floats)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return round(float(x), 6)
    if isinstance(x, (np.integer, int)) and not isinstance(x, bool):
        return int(x)
    return x


def profile_path(path) -> Path:
    """Where save_profile writes `path`: a .yaml (or .yml) file."""
    path = Path(path)
    return path if path.suffix in (".yaml", ".yml") else path.with_suffix(".yaml")


def save_profile(p: RoutingProfile, path) -> Path:
    path = profile_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(format=PROFILE_FORMAT, version=PROFILE_VERSION, name=p.name, shape=p.shape,
               knobs=_plain(p.knobs()), tasks=_plain(p.tasks), fit=_plain(p.fit))
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False, width=120))
    tmp.replace(path)
    return path


def load_profile(path) -> RoutingProfile:
    """Read a profile YAML; every problem is one line naming the file, the field and the fix."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"routing profile '{path}' does not exist; write one with "
                                "`emoe trace fit REAL.npz -o PROFILE.yaml` or use --profile real|paper")
    try:
        doc = yamlio.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
        raise UserError(f"{path}: not an emoe routing profile (format must be '{PROFILE_FORMAT}'); "
                         "write one with `emoe trace fit`")
    if doc.get("version") != PROFILE_VERSION:
        raise UserError(f"{path}: profile version {doc.get('version')!r}, this emoe reads version {PROFILE_VERSION}")
    knobs = doc.get("knobs") or {}
    allowed = {f.name for f in fields(RoutingProfile)} - {"name", "shape", "tasks", "fit"}
    unknown = sorted(set(knobs) - allowed)
    if unknown:
        raise UserError(f"{path}: unknown knob(s) {unknown}; knobs are {sorted(allowed)}")
    base = PROFILES["real"]
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in knobs.items()}
    shape = doc.get("shape")
    if shape is not None:
        need = {"name", "n_layers", "n_experts", "top_k"}
        if not isinstance(shape, dict) or not need <= set(shape):
            raise UserError(f"{path}: 'shape' needs {sorted(need)}")
    tasks = doc.get("tasks")
    if tasks is not None:
        if not isinstance(tasks, dict) or not tasks:
            raise UserError(f"{path}: 'tasks' must map task names to their tables")
        if shape is None:
            raise UserError(f"{path}: a profile with per-task tables needs 'shape'")
        for name, tdoc in tasks.items():
            for key in ("weight", "prompt", "output", "popularity"):
                if key not in tdoc:
                    raise UserError(f"{path}: task '{name}' lacks '{key}'")
            for phase in ("prompt", "decode"):
                pop = np.asarray(tdoc["popularity"].get(phase), dtype=float)
                if pop.shape != (shape["n_layers"], shape["n_experts"]):
                    raise UserError(f"{path}: task '{name}' {phase} popularity has shape {pop.shape}, "
                                     f"expected ({shape['n_layers']}, {shape['n_experts']})")
    try:
        return replace(base, name=str(doc.get("name") or path.stem), shape=shape, tasks=tasks, fit=doc.get("fit"),
                       **values)
    except TypeError as e:
        raise UserError(f"{path}: {e}") from None


def resolve_profile(profile) -> RoutingProfile:
    """A RoutingProfile from a profile object, a built-in name, or a YAML path."""
    if isinstance(profile, RoutingProfile):
        return profile
    if isinstance(profile, str) and profile in PROFILES:
        return PROFILES[profile]
    if isinstance(profile, (str, Path)) and (str(profile).endswith((".yaml", ".yml")) or Path(profile).exists()):
        return load_profile(profile)
    raise UserError(f"unknown profile '{profile}'; choose one of {list(PROFILES)} or a fitted profile .yaml")


def profile_dict(p: RoutingProfile) -> dict:
    """The profile as plain values, for a trace's provenance."""
    d = {k: v for k, v in asdict(p).items() if k not in ("tasks", "fit")}
    return _plain(d)
