"""`emoe --version`: the package version (installed metadata, else pyproject.toml beside the code)
and the code version the results record (sim.results.code_version: version + git commit)."""
from __future__ import annotations

import argparse
import importlib.metadata
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def package_version() -> str:
    try:
        return importlib.metadata.version("emoe")
    except importlib.metadata.PackageNotFoundError:   # run from a checkout that was never installed
        try:
            return tomllib.loads(PYPROJECT.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


class VersionAction(argparse.Action):
    """Print both versions and exit; computed only when asked (code_version runs git)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from sim.results import code_version
        print(f"emoe {package_version()} (code {code_version()})")
        parser.exit()
