"""One way to drive the CLI in-process from a test: ``run_cli(capsys, *argv)`` -> (exit code, stdout, stderr)."""

from __future__ import annotations

from vramcalc.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``vramcalc ARGV...`` through ``main(argv)``, with what it printed (pytest's ``capsys`` fixture)."""
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err
