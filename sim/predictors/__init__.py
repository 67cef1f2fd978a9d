"""Expert predictors by kind, plus loading a saved predictor file."""
import json
from pathlib import Path

import numpy as np

from sim.plugins import lookup
from sim.predictors.base import ExpertPredictor
from sim.predictors.emoe_a import EmoeAPredictor
from sim.predictors.emoe_l import EmoeLPredictor
from sim.predictors.frequency import FrequencyPredictor
from sim.predictors.mlp import MLPPredictor
from sim.predictors.perfect import PerfectPredictor

PREDICTORS = {p.kind: p for p in (FrequencyPredictor, EmoeAPredictor, EmoeLPredictor, MLPPredictor,
                                  PerfectPredictor)}
TRAINABLE = ("frequency", "emoe_a", "emoe_l", "mlp")


def load_predictor(path) -> ExpertPredictor:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"predictor file '{path}' does not exist; train one with "
                                "`emoe predictor train TRACE -o FILE`")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {k: z[k] for k in z.files if k != "meta"}
    if meta.get("kind") not in PREDICTORS:
        raise ValueError(f"{path}: unknown predictor kind {meta.get('kind')!r}")
    p = PREDICTORS[meta["kind"]](meta["n_layers"], meta["n_experts"], **meta.get("params", {}))
    p.model, p.train_ids = meta.get("model", ""), meta.get("train_ids", [])
    p.train_digests = meta.get("train_digests", [])
    p.prior = {k[len("prior__"):]: v for k, v in arrays.items() if k.startswith("prior__")}
    p.global_prior = arrays["global_prior"]
    p.load_arrays(arrays)
    return p


def predictor_class(kind: str, base_dir=None) -> type[ExpertPredictor]:
    """The class policy.predictor names: registered, module:Class or installed (sim/plugins.py)."""
    return lookup("predictor", kind, PREDICTORS, ExpertPredictor, base_dir, key="policy.predictor")


def make_predictor(kind: str, base_dir=None, **params) -> ExpertPredictor:
    return predictor_class(kind, base_dir)(**params)


__all__ = ["PREDICTORS", "TRAINABLE", "ExpertPredictor", "load_predictor", "make_predictor", "predictor_class"]
