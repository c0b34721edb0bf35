"""The one error type of vramcalc: bad input that the user can fix.

The CLI prints it as one ``error: ...`` line and exits with code 2; the library raises it.
It is a ``ValueError`` so that ordinary ``except ValueError`` code catches it too.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable


class VramcalcError(ValueError):
    """Bad input: an unknown name, an impossible setup, a malformed config file."""


def closest_names(word: str, names: Iterable[str], limit: int = 3) -> list[str]:
    """The catalogue names nearest to ``word``, best first (substring matches, then fuzzy ones)."""
    names = list(names)
    wanted = word.lower()
    contained = [name for name in names if wanted and (wanted in name or name in wanted)]
    fuzzy = difflib.get_close_matches(wanted, names, n=limit, cutoff=0.4)
    ranked = sorted(contained, key=lambda name: abs(len(name) - len(wanted))) + fuzzy
    return list(dict.fromkeys(ranked))[:limit]


def unknown_name_error(kind: str, word: str, names: Iterable[str]) -> VramcalcError:
    """``unknown GPU 'h1000'; closest: h100-sxm, h100-pcie`` (or the full list when nothing is close)."""
    names = list(names)
    close = closest_names(word, names)
    if close:
        hint = "closest: " + ", ".join(close)
    else:
        hint = "known: " + ", ".join(sorted(names))
    return VramcalcError(f"unknown {kind} {word!r}; {hint}")


def positive_number(value, what: str) -> float:
    """A finite number > 0, or a one-line VramcalcError naming the value."""
    number = None
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    if number is None or not math.isfinite(number) or number <= 0:
        raise VramcalcError(f"{what} must be a positive number, got {value!r}")
    return number


def positive_int(value, what: str) -> int:
    """A whole number > 0 (``2048``, ``"2048"``, ``2048.0``), or a one-line VramcalcError naming the value."""
    try:
        number = positive_number(value, what)
    except VramcalcError:
        number = None
    if number is None or number != int(number):
        raise VramcalcError(f"{what} must be a positive integer, got {value!r}")
    return int(number)
