"""One way to drive the CLI in-process from a test: ``run_cli(capsys, *argv)`` -> (exit code, stdout, stderr), and
``assert_one_error_line``: a bad setup refused by the library and by the CLI with one ``error:`` line."""

from __future__ import annotations

import pytest

import vramcalc as vc
from vramcalc.cli import main
from vramcalc.errors import VramcalcError


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``vramcalc ARGV...`` through ``main(argv)``, with what it printed (pytest's ``capsys`` fixture)."""
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(capsys, model: str, options: dict, message: str) -> None:
    """``vc.estimate(model, **options)`` raises a ``VramcalcError`` matching ``message``, and ``vramcalc estimate``
    with the same options as flags (True: a bare flag) exits 2 with one ``error:`` line."""
    with pytest.raises(VramcalcError, match=message):
        vc.estimate(model, **options)
    argv = ["estimate", model] + [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
                                  for k, v in options.items()]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
