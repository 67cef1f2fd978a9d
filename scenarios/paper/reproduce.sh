#!/usr/bin/env bash
# Rerun every paper reproduction and print the README's table (about 2 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
for f in resident memory-fidelity interval latency-rate misid ablation larger-model throughput; do
    emoe sweep "scenarios/paper/$f.yaml" -j 2
done
emoe capacity scenarios/paper/base-mixtral.yaml --set "policy={name: emoe, capacity: 0.625}" \
    --compare resident --json runs/paper/capacity.json
emoe capacity scenarios/paper/base-mixtral.yaml --set "policy={name: emoe, capacity: 0.625}" \
    --set hardware.count=3 --set limits.memory_utilization=0.8 --compare resident \
    --json runs/paper/capacity-tight.json
python -m sim.paper runs/paper
