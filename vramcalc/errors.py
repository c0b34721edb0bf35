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
    return VramcalcError(f"unknown {kind} {short_repr(word)}; {hint}")


def positive_number(value, what: str) -> float:
    """A finite number > 0, or a one-line VramcalcError naming the value."""
    number = None
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            pass
    if number is None or not math.isfinite(number) or number <= 0:
        raise VramcalcError(f"{what} must be a positive number, got {short_repr(value)}")
    return number


def positive_int(value, what: str, maximum: int | None = None) -> int:
    """A whole number > 0 (``2048``, ``"2048"``, ``2048.0``; a float only when its value is integral), at most
    ``maximum`` when one is given, or a one-line VramcalcError naming the value.

    Python ints are taken as they are (``float(10**400)`` would overflow and ``float(2**53 + 1)`` round); bools,
    NaN, infinities and text that is not a number are refused."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("+").isdigit():
        number = int(value.strip())
    else:
        try:
            real = positive_number(value, what)
        except (VramcalcError, OverflowError):
            real = None
        if real is not None and real == int(real):
            number = int(real)
    if number is None or number <= 0:
        raise VramcalcError(f"{what} must be a positive integer, got {short_repr(value)}")
    if maximum is not None and number > maximum:
        raise VramcalcError(f"{what} must be at most {maximum:,}, got {short_repr(value)}")
    return number


def short_repr(value) -> str:
    """``repr`` of a user value, cut to 60 characters (a 10**400 or a 5000-character name stays one short line;
    an int past Python's 4300-digit ``repr`` limit is described by its size)."""
    if isinstance(value, int) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    try:
        text = repr(value)
    except ValueError:
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."
