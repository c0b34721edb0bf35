"""Cells that a spreadsheet opens as text, never as a formula (CSV injection, OWASP "CSV Injection").

LibreOffice and Excel evaluate a cell that starts with ``=``, ``+``, ``-`` or ``@`` (and tab or carriage return).
Text cells that start so are prefixed with an apostrophe; numbers pass unchanged, negative ones included.
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    """The value itself for numbers and booleans; text starting like a formula, escaped with a leading apostrophe."""
    if isinstance(value, (bool, int, float)) or value is None:
        return "" if value is None else value
    text = str(value)
    if text.startswith(FORMULA_STARTS):
        return "'" + text
    return text
