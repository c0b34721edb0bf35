"""The loading panel (``vramcalc/calibrate/loading.py``): what it can check without a GPU. The panel itself ran on
an H200 (calibration/runs/h200/loading/) and on the CPU as a smoke test (calibration/run_h200.sh with DEVICE=cpu)."""

import argparse
import csv

from vramcalc.calibrate import loading
from vramcalc.catalogue import get_model
from vramcalc.options import Precision
from vramcalc.training_setup import resolve_setup


def _args(**overrides):
    values = {"optimizer": "adamw", "batch_size": 1, "seq_len": 2048}
    return argparse.Namespace(**{**values, **overrides})


def test_the_kbit_variant_is_the_estimates_mixed_bf16_and_the_plain_variant_stays_bf16():
    spec = get_model("llama-3.2-3b")
    prepared = resolve_setup(spec, **loading.setup_options(_args(), kbit_prep=True)).setup
    plain = resolve_setup(spec, **loading.setup_options(_args(), kbit_prep=False)).setup
    assert (prepared.precision, prepared.kbit_prep) == (Precision.MIXED_BF16, True)
    assert (plain.precision, plain.kbit_prep) == (Precision.BF16, False)
    assert prepared.grad_ckpt and plain.grad_ckpt


def test_loading_csv_keeps_every_column_in_order_and_leaves_unmeasured_cells_empty(tmp_path):
    path = tmp_path / "loading.csv"
    loading.write_rows(path, [{"model": "m", "phase": "load", "status": "error", "not_a_column": 1}])
    with path.open() as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == loading.COLUMNS
    row = dict(zip(rows[0], rows[1]))
    assert (row["model"], row["phase"], row["status"], row["meas_allocated_peak_bytes"]) == ("m", "load", "error", "")
    assert not list(tmp_path.glob("*.tmp"))


def test_a_device_the_panel_cannot_measure_is_one_error_line(capsys):
    assert loading.main(["--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
