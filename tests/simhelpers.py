"""Small scenarios on the tiny model for fast simulator tests."""
from sim.scenario import load_scenario

TINY_HW = {"preset": "a100-40gb", "memory_bytes": 3.0e6, "h2d_bytes_per_s": 2.0e8, "h2d_latency_s": 1e-5,
           "hbm_bytes_per_s": 1e10, "flops_per_s": 1e12, "step_overhead_s": 1e-4, "layer_overhead_s": 1e-6}


def tiny_scenario(trace_path, policy=None, **over):
    data = {"name": "t", "seed": 1, "model": "tiny", "hardware": dict(TINY_HW),
            "workload": {"trace": str(trace_path), "arrival": {"process": "poisson", "rate": 20.0}},
            "policy": policy or {"name": "on_demand", "capacity": 0.5},
            "limits": {"max_batch_tokens": 256, "max_running": 16}}
    for k, v in over.items():
        cur = data
        keys = k.split("__")
        for kk in keys[:-1]:
            cur = cur.setdefault(kk, {})
        cur[keys[-1]] = v
    return load_scenario(data=data)
