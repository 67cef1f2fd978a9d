"""The per-task, per-layer sensitivity table the eMoE skip rule reads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from traces import yamlio

DEFAULT = Path(__file__).parent / "presets" / "sensitivity.yaml"


class SensitivityTable:
    def __init__(self, data: dict, n_layers: int, source: str = "sensitivity table"):
        if not isinstance(data, dict) or not set(data) <= {"default", "tasks", "model", "threshold", "measured"}:
            raise ValueError(f"{source}: expected keys 'default' and 'tasks' (task -> share or per-layer list)")
        self.n_layers = n_layers
        self.source = source
        tasks = data.get("tasks") or {}
        if not isinstance(tasks, dict):
            raise ValueError(f"{source}: 'tasks' must map each task to a share or a per-layer list, got {tasks!r}")
        self.default = self._row(data.get("default", 1.0), "default")
        self.rows = {t: self._row(v, t) for t, v in tasks.items()}

    def _row(self, v, name) -> np.ndarray:
        L = self.n_layers
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not 0 <= v <= 1:
                raise ValueError(f"{self.source}: '{name}' share must be in [0, 1], got {v}")
            n_sens = int(round(v * L))
            return np.concatenate([np.zeros(L - n_sens), np.ones(n_sens)])
        if isinstance(v, list):
            if len(v) != L:
                raise ValueError(f"{self.source}: '{name}' lists {len(v)} layers but the model has {L} MoE layers")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in v):
                raise ValueError(f"{self.source}: '{name}' must list a sensitivity in [0, 1] per layer, got {v}")
            return np.asarray(v, dtype=float)
        raise ValueError(f"{self.source}: '{name}' must be a share in [0, 1] or a list of 0/1 per layer")

    def row(self, task: str) -> np.ndarray:
        """(L,) s per layer: 1 = sensitive (drives loading), 0 = insensitive (skipped)."""
        return self.rows.get(task, self.default)


def load_sensitivity(spec, n_layers: int, base_dir: Path | None = None,
                     key: str = "policy.sensitivity") -> SensitivityTable:
    """spec: None (the shipped defaults), a YAML path, or an inline mapping (at scenario key `key`)."""
    if spec is None:
        return SensitivityTable(yamlio.safe_load(DEFAULT.read_text()), n_layers, str(DEFAULT))
    if isinstance(spec, dict):
        return SensitivityTable(spec, n_layers, key)
    if not (isinstance(spec, str) and spec):
        raise ValueError(f"{key} must be a file from `emoe sensitivity` or a mapping {{default: ..., tasks: ...}}, "
                         f"got {spec!r}")
    p = Path(spec)
    if base_dir is not None and not p.is_absolute():
        p = base_dir / p
    if not p.exists():
        raise FileNotFoundError(f"sensitivity table '{p}' does not exist; write one with `emoe sensitivity` "
                                "or omit policy.sensitivity to use the defaults")
    return SensitivityTable(yamlio.safe_load(p.read_text()) or {}, n_layers, str(p))
