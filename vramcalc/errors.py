"""The one error type of vramcalc: bad input that the user can fix.

The CLI prints it as one ``error: ...`` line and exits with code 2; the library raises it.
It is a ``ValueError`` so that ordinary ``except ValueError`` code catches it too.
"""

from __future__ import annotations

import difflib
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
