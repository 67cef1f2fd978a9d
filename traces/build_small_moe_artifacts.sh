#!/usr/bin/env bash
# After `python traces/train_small_moe.py`: prompt sets, real captured traces, trace
# statistics, accuracy under expert restriction, sensitivity table, quality calibration.
# About 5 minutes on 2 cores. Writes under traces/ and sim/presets/, and runs/small-moe/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/corpora}
MODEL=traces/models/emoe-small-moe
OUT=runs/small-moe
mkdir -p "$OUT"
emoe prompts --data "$DATA" --per-task 30 -o "$OUT/prompts-all.jsonl"
# Shipped: prompts whose sources allow it (gsm8k MIT, HumanEval MIT, nq-open CC BY-SA 3.0, OLMoE texts Apache-2.0).
emoe prompts --data "$DATA" --per-task 30 --tasks math,code,qa,general -o traces/prompts/heldout-open.jsonl
emoe capture --model "$MODEL" --prompts "$OUT/prompts-all.jsonl" --max-new-tokens 48 -o "$OUT/captured.npz"
python - <<'PY'
# The shipped trace keeps prompt text only where the source's licence allows redistribution.
import numpy as np
from traces.format import load_trace, save_trace
t = load_trace("runs/small-moe/captured.npz")
keep = np.isin(t.task, ["math", "code", "qa", "general"])
t.prompt_text = np.where(keep, t.prompt_text, "")
save_trace(t, "traces/samples/emoe-small-moe-captured.npz", compress=True)
PY
emoe trace stats traces/samples/emoe-small-moe-captured.npz --json "$OUT/stats.json" --plot "$OUT/stats-plots"
for pol in random frequency; do
  emoe accuracy --model "$MODEL" --prompts "$OUT/prompts-all.jsonl" --policy $pol --capacity 0.25,0.5,0.75 \
      --json "$OUT/accuracy-$pol.json"
done
emoe accuracy --model "$MODEL" --prompts "$OUT/prompts-all.jsonl" --policy emoe --capacity 0.25,0.5,0.75 \
    --interval 1,10,40 --json "$OUT/accuracy-emoe.json"
python - <<'PY'
import json
rows = []
for p in ("random", "frequency", "emoe"):
    rows += json.load(open(f"runs/small-moe/accuracy-{p}.json"))
json.dump(rows, open("runs/small-moe/accuracy-all.json", "w"), indent=1)
PY
emoe calibrate-quality "$OUT/accuracy-all.json" --model-name emoe-small-moe -o "$OUT/quality-calibration.yaml"
# Shipping it as the package default is a maintainer's step: emoe itself never writes into the package.
cp "$OUT/quality-calibration.yaml" sim/presets/quality-calibration.yaml
emoe sensitivity --model "$MODEL" --prompts "$OUT/prompts-all.jsonl" -o traces/models/emoe-small-moe-sensitivity.yaml
