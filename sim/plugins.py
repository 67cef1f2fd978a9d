"""Components from outside the package: a policy, scheduler or predictor of the user's own.

A scenario names a component either by its registered name (`policy: {name: emoe}`,
`policy: {name: emoe, predictor: emoe_a}`),
or by `module:Class` (`policy: {name: my_policies:MRUPolicy}`), the module found on
the Python path or beside the scenario file, or by a name an installed package
registers in an entry-point group (`emoe.policies`, `emoe.schedulers`, `emoe.predictors`):

    [project.entry-points."emoe.policies"]
    mru = "my_package.mru:MRUPolicy"

Whatever the source, the class is validated, simulated, swept and replayed the same
way as a built-in one: `lookup` is the one place every caller resolves names.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

from traces.errors import UserError


GROUPS = {"policy": "emoe.policies", "scheduler": "emoe.schedulers",   # entry-point group per kind
          "predictor": "emoe.predictors"}


class PluginError(UserError):
    """A component named in a scenario that cannot be found or is not the right kind."""


def lookup(kind: str, name, registry: dict, base: type, base_dir=None, key: str | None = None) -> type:
    """The class `name` stands for. kind: 'policy' | 'scheduler' | 'predictor' (the entry-point
    group); base: the class it must derive from; key: the scenario key that names it (messages)."""
    key = key or f"{kind}.name"
    if not isinstance(name, str) or not name:
        raise PluginError(f"{key} must be a name, got {name!r}")
    if name in registry:
        return registry[name]
    if ":" in name:
        cls = _from_module(key, name, base_dir)
    else:
        cls = installed(kind).get(name)
        if cls is None:
            raise PluginError(f"{key} '{name}' is unknown; choose one of {', '.join(known(kind, registry))}, "
                              f"or name your own class as module:Class")
        cls = cls.load()
    if cls is base:
        raise PluginError(f"{key} '{name}' is the base class itself; name a subclass that implements it")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"{key} '{name}' is {cls!r}, not a subclass of {base.__module__}.{base.__name__}")
    return cls


def known(kind: str, registry: dict) -> list[str]:
    """Every registered name: built-in, then installed plugins."""
    return list(registry) + [n for n in installed(kind) if n not in registry]


def installed(kind: str) -> dict:
    """Entry points of installed packages in the kind's group, by name (not yet imported)."""
    return {ep.name: ep for ep in entry_points(group=GROUPS[kind])}


def _from_module(key: str, name: str, base_dir) -> type:
    module, _, attr = name.partition(":")
    if not module or not attr or module.startswith("."):
        raise PluginError(f"{key} '{name}': write module:Class with an absolute module name, "
                          "e.g. my_policies:MRUPolicy")
    # A module beside the scenario file is found without installing it.
    extra = str(Path(base_dir).resolve()) if base_dir is not None else None
    beside = Path(extra, *module.split(".")).with_suffix(".py") if extra else None
    loaded = sys.modules.get(module)
    if beside is not None and beside.is_file() and loaded is not None and getattr(loaded, "__file__", None) \
            and Path(loaded.__file__).resolve() != beside.resolve():
        # Python keeps one module per name: the one beside this scenario would silently be the other.
        raise PluginError(f"{key} '{name}': a different module '{module}' is already loaded ({loaded.__file__}); "
                          f"rename {beside} so the two do not share a name")
    added = extra is not None and extra not in sys.path
    if added:
        sys.path.insert(0, extra)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module and not module.startswith(f"{e.name}."):
            raise      # the user's module imports something missing: its own traceback says what
        where = f" or beside the scenario ({extra})" if extra else ""
        raise PluginError(f"{key} '{name}': no module '{module}' on the Python path{where}") from None
    finally:
        if added:
            sys.path.remove(extra)
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise PluginError(f"{key} '{name}': module '{module}' ({mod.__file__}) has no '{attr}'") from None


def source_file(name, registry: dict, kind: str, base_dir=None) -> Path | None:
    """The file a component named by the user is defined in (module:Class beside the scenario
    or on the path, or an installed entry point), found without running the module (a dotted
    name imports its parent packages); None for a built-in or a name that cannot be found
    (building the scenario reports that). A sweep keys its points by this file's content, so
    editing your policy reruns the points that use it."""
    if not isinstance(name, str) or not name or name in registry:
        return None
    if ":" not in name:
        ep = installed(kind).get(name)
        if ep is None:
            return None
        name = ep.value
    module = name.partition(":")[0]
    if not module or module.startswith("."):
        return None
    if base_dir is not None:   # a module or package beside the scenario (how _from_module finds it)
        where = Path(Path(base_dir).resolve(), *module.split("."))
        for beside in (where.with_suffix(".py"), where / "__init__.py"):
            if beside.is_file():
                return beside
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and Path(origin).is_file() else None
