"""Reading the YAML users write (scenarios, sweeps, hardware and routing profiles, --set values).

PyYAML follows YAML 1.1, which reads `2.0e11` and `1e-3` as *strings* (a float there needs a
dot and a signed exponent: `2.0e+11`). YAML 1.2, and every user, means a number: this loader
reads those forms as floats too. Everything else is PyYAML's safe loader.
"""
from __future__ import annotations

import re

import yaml


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads 2.0e11, 1e5 and 1.5E-3 as floats."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def safe_load(text: str):
    return yaml.load(text, Loader=Loader)
