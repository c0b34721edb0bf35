"""The alpaca-cleaned length histogram read back from its authors' figure (``benchmarks/datasets``): the committed CSV
is what the figure gives, and the reading agrees with what the figure and the dataset say independently of it."""

import sys
from pathlib import Path

import pytest

DATASETS = Path(__file__).resolve().parents[1] / "benchmarks" / "datasets"
sys.path.insert(0, str(DATASETS))

import digitize_histogram as dh  # noqa: E402

from vramcalc.sample_lengths import read  # noqa: E402

FIGURE = DATASETS / "alpaca_cleaned_prompt_lengths.png"
CSV = DATASETS / "alpaca_cleaned_lengths_digitized.csv"
# yahma/alpaca-cleaned, the copy torchtune loads: 51,760 rows (its dataset card; benchmarks/datasets/README.md)
DATASET_ROWS = 51_760


@pytest.fixture(scope="module")
def reading():
    return dh.digitize(str(FIGURE), x_tick_step=200, y_tick_step=1000, bins=100)


def test_the_committed_csv_is_what_the_figure_reads(reading):
    rows = dh.histogram_rows(reading)
    profile = read(CSV)
    assert dict(zip(profile.tokens, profile.samples)) == rows


def test_the_bars_hold_the_datasets_rows_but_for_a_tail_too_low_to_draw(reading):
    """Every drawn bar is read to half a pixel; the 56 bins past the last drawn bar each hold under half a pixel."""
    total = sum(dh.histogram_rows(reading).values())
    undrawn = sum(1 for c in reading["counts"] if c == 0)
    assert undrawn > 40
    assert DATASET_ROWS - undrawn * reading["samples_per_px"] / 2 <= total <= DATASET_ROWS


def test_the_tallest_bar_sets_the_y_limit_as_matplotlib_pads_it(reading):
    """Autoscaled bars keep y = 0 at the frame (sticky edge) and leave axes.ymargin = 5% above the tallest bar: the
    frame's top, read through the tick scale, is 1.05 times the tallest bar, to a pixel."""
    slope, offset = reading["y_fit"]
    top_value = slope * (reading["frame"][2] + 0.5) + offset
    assert top_value == pytest.approx(1.05 * max(reading["counts"]), abs=1.05 * reading["samples_per_px"])


def test_the_first_bar_starts_at_the_smallest_value_the_x_margins_give(reading):
    slope, offset = reading["x_fit"]
    first_column = next(x for x, px in enumerate(reading["column_px"]) if px > 0 and x > reading["frame"][0] + 1)
    assert (reading["smallest"] - offset) / slope - 0.5 == pytest.approx(first_column, abs=1.0)


def test_a_file_that_is_not_a_png_is_one_error_line(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="is not a PNG"):
        dh.read_png(str(path))
