"""The ground floor stands alone: the package layers a user installs without torch.

`traces` (trace format, model shapes, importers, generator) imports neither `sim`
nor `replay`, and every module of `sim` and `traces` imports without torch, so
`pip install -e .` alone runs the simulator and the trace tools.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Imports every module of sim and traces with torch unimportable; prints one line
# per module: "ok NAME" or "fail NAME: ERROR".
IMPORT_ALL_WITHOUT_TORCH = """
import importlib, pkgutil, sys
sys.modules["torch"] = None          # `import torch` now raises ImportError
for package in ("sim", "traces"):
    root = importlib.import_module(package)
    # __main__ modules run a program when imported (python -m sim.cli): not library code
    names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")
                         if not m.name.endswith(".__main__")]
    for name in names:
        try:
            importlib.import_module(name)
            print("ok", name)
        except Exception as e:
            print("fail", name + ":", type(e).__name__, e)
"""


def test_every_sim_and_traces_module_imports_without_torch():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL_WITHOUT_TORCH], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    failed = [line for line in lines if not line.startswith("ok ")]
    assert not failed, "\n".join(failed)
    imported = {line.split()[1] for line in lines}
    # The walk reached the packages' depths (a walk that found nothing would pass above).
    assert {"sim.cli", "sim.policies.base", "sim.schedulers.emoe", "traces.format",
            "traces.model_shape", "traces.capture", "traces.train_small_moe"} <= imported


def imported_packages(path: Path) -> set[str]:
    """The top-level package of every import statement in a module, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_traces_imports_neither_sim_nor_replay():
    modules = sorted((ROOT / "traces").rglob("*.py"))
    assert ROOT / "traces" / "format.py" in modules
    upward = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & {"sim", "replay"})
              for p in modules}
    assert {p: pkgs for p, pkgs in upward.items() if pkgs} == {}
