"""Typed parameters of a component (each policy, each scheduler): a frozen dataclass that
checks itself.

A component declares `Params`, a subclass of `Params` below with one field per
parameter (its default the field's) and a `check` that raises ParamError naming the
parameter and what it must be. `Params.of(section)` builds one from a scenario
section, rejecting names it does not have and naming those it has.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

from traces.errors import UserError


class ParamError(UserError):
    """A component parameter that is unknown or out of range."""


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Params:
    @classmethod
    def names(cls) -> list[str]:
        return sorted(f.name for f in fields(cls))

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(cls)}

    @classmethod
    def of(cls, section: dict) -> Params:
        unknown = set(section) - set(cls.names())
        if unknown:
            raise ParamError(f"unknown parameter(s) {sorted(unknown)}; allowed: {cls.names() or 'none'}")
        return cls(**section)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ParamError for a value the component cannot use (subclasses call super first)."""
