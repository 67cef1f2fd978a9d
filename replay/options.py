"""What the replay commands offer by name: torch-free, so `emoe` lists and checks them before torch loads.

DTYPE_NAMES: the torch dtypes a replay or profile runs in (replay/run.py maps them to torch's).
KEEP_RULES: how `emoe accuracy` chooses the experts a prompt may use (replay/quality.py).
DEFAULT_TOLERANCES: relative error each verdict metric may reach, sim vs replay (replay/compare.py).
"""

DTYPE_NAMES = ("float32", "bfloat16", "float16")
KEEP_RULES = ("emoe", "frequency", "random", "all")
DEFAULT_TOLERANCES = {"latency": 0.05, "throughput": 0.05, "memory": 0.02, "ttft": 0.15}
