"""The one user-error type: bad input the user can fix.

`emoe` prints a UserError as one line (the message names the key, file or
option and the fix) and exits with status 2; every other exception is a bug
and keeps its traceback. It lives here, on the ground floor, because `traces`
must not import `sim`; the module-specific errors (TraceError, ScenarioError,
SweepError, MemoryBudgetError, WeightsError) derive from it.

It is a ValueError so that code catching ValueError around input checks keeps
working; the reverse does not hold: `main` treats a bare ValueError or KeyError
as a bug.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input: printed as one line naming the problem and the fix, exit status 2."""


def message(e: BaseException) -> str:
    """An exception's text as one line (KeyError's str() adds quotes; YAML errors span lines)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split())
