"""GPU names as people type them: ``--gpu`` and ``get_gpu()`` take the catalogue name, the display name, the device
names ``nvidia-smi`` and ``torch.cuda.get_device_name()`` print, and common spellings, from the ``aliases`` column of
``data/gpus.csv``; a name that fits several rows, or none, is one ``error:`` line with the candidates."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from vramcalc import catalogue
from vramcalc.errors import VramcalcError

DATA = Path(__file__).resolve().parents[1] / "data"  # the source checkout's data/ (the .md files are not in the wheel)
with open(DATA / "gpus.csv", newline="", encoding="utf-8") as _f:
    ROWS = list(csv.DictReader(_f))
ALIASES = [(row["name"], alias.strip()) for row in ROWS for alias in row["aliases"].split(";") if alias.strip()]


@pytest.mark.parametrize("row, alias", ALIASES, ids=[alias for _, alias in ALIASES])
def test_every_alias_resolves_to_its_own_row(row, alias):
    assert catalogue.get_gpu(alias).name == row


@pytest.mark.parametrize("row, alias", ALIASES, ids=[alias for _, alias in ALIASES])
def test_every_alias_is_quoted_in_the_sources_file(row, alias):
    # each alias comes from a real device or provider string, cited in data/gpus_sources.md
    sources = (DATA / "gpus_sources.md").read_text(encoding="utf-8")
    assert alias in sources


def test_no_two_rows_claim_the_same_name():
    owners = {}
    for row in ROWS:
        for word in (row["name"], row["display_name"], *row["aliases"].split(";")):
            key = catalogue.gpu_name_key(word)
            if key:
                owners.setdefault(key, set()).add(row["name"])
    assert {key: rows for key, rows in owners.items() if len(rows) > 1} == {}


# Device names as the driver and torch print them; the expected row is the card the name belongs to
# (NVIDIA product names; the strings are quoted in data/gpus_sources.md S60-S62).
DEVICE_NAMES = [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
    ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA GeForce RTX 3090", "rtx-3090"),
    ("NVIDIA GeForce RTX 5090", "rtx-5090"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA A10G", "a10g"),
    ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada"),
    ("NVIDIA RTX 6000 Ada Gene...", "rtx-6000-ada"),  # nvidia-smi truncates the name to its column
    ("NVIDIA B200", "b200"),
    ("Tesla T4", "t4"),
    ("Tesla V100-SXM2-32GB", "v100-32gb"),
    ("AMD Instinct MI300X", "mi300x"),
    ("AMD Instinct MI300X VF", "mi300x"),
]


@pytest.mark.parametrize("device_name, expected", DEVICE_NAMES)
def test_device_names_resolve(device_name, expected):
    assert catalogue.get_gpu(device_name).name == expected


@pytest.mark.parametrize("typed, expected", [
    ("a100-80gb-sxm", "a100-80gb"),
    ("A100 80GB", "a100-80gb"),
    ("H100 SXM5", "h100-sxm"),
    ("h100 sxm", "h100-sxm"),
    ("h100 80gb", "h100-sxm"),  # part of the SXM card's device name only (the PCIe card's names carry no size)
    ("4090", "rtx-4090"),
    ("RTX 4090", "rtx-4090"),
    ("rtx_4090", "rtx-4090"),
    ("RTX-6000-ADA", "rtx-6000-ada"),
    ("mi300x", "mi300x"),
    ("  L40S ", "l40s"),
    ("l4", "l4"),  # a whole name wins over being part of "l40s"
    ("t4", "t4"),
])
def test_common_spellings_resolve(typed, expected):
    assert catalogue.get_gpu(typed).name == expected


@pytest.mark.parametrize("typed, candidates", [
    ("A100", {"a100-80gb", "a100-40gb"}),
    ("NVIDIA A100", {"a100-80gb", "a100-40gb"}),
    ("h100", {"h100-sxm", "h100-pcie"}),
    ("a10", {"a10g", "a100-80gb", "a100-40gb"}),
])
def test_ambiguous_names_list_their_candidates_in_one_line(typed, candidates):
    with pytest.raises(VramcalcError) as error:
        catalogue.get_gpu(typed)
    message = str(error.value)
    assert "\n" not in message and "ambiguous" in message and repr(typed) in message
    listed = {gpu.name for gpu in catalogue.gpus() if f"{gpu.name} (" in message}
    assert listed == candidates


@pytest.mark.parametrize("typed, suggested", [("NVIDIA GeForce GTX 1080", None), ("h1000", "h100-sxm"),
                                              ("rtx 4080", "rtx-4090"), ("mi250", "mi300x")])
def test_unknown_names_give_one_line_with_suggestions(typed, suggested):
    with pytest.raises(VramcalcError) as error:
        catalogue.get_gpu(typed)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"unknown GPU {typed!r}")
    assert "closest:" in message or "known:" in message
    if suggested:
        assert suggested in message


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vramcalc", *args], capture_output=True, text=True, timeout=120)


def test_cli_takes_a_device_name_and_refuses_an_ambiguous_one_with_exit_2():
    by_device = _cli("estimate", "llama-3.1-8b", "--gpu", "NVIDIA H100 80GB HBM3", "--format", "json")
    by_name = _cli("estimate", "llama-3.1-8b", "--gpu", "h100-sxm", "--format", "json")
    assert by_device.returncode == 0, by_device.stderr
    assert by_device.stdout == by_name.stdout
    ambiguous = _cli("estimate", "llama-3.1-8b", "--gpu", "A100")
    assert ambiguous.returncode == 2
    lines = ambiguous.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "a100-40gb" in lines[0] and "a100-80gb" in lines[0]
