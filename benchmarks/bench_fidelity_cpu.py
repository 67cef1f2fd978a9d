"""Benchmark: the fidelity loop on CPU - `emoe profile`, then the simulator with that profile
predicts the CPU replay (Mixtral-8x7B shape at 1/32 hidden size, 12 requests at 2 req/s,
resident, on_demand and eMoE at 62.5% of experts). It is the GPU check's flow on the CPU:

    python benchmarks/bench_fidelity_cpu.py [-o benchmarks/out/fidelity-cpu]

Writes comparison.md (sim vs replay per metric) into the output directory.
"""
import sys

from replay.gpucheck import main

if __name__ == "__main__":
    out = sys.argv[sys.argv.index("-o") + 1] if "-o" in sys.argv else "benchmarks/out/fidelity-cpu"
    main(["-o", out, "--device", "cpu", "--scale", "32", "--requests", "12", "--rate", "2",
          "--policies", "resident,on_demand,emoe"])
