"""benchmarks/throughput_measured.py: the H200 calibration run's step times against the step-time model."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from vramcalc import estimate
from vramcalc.calibrate.scenarios import harness_model, row_scenario

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "throughput_measured.py"
RUN = ROOT / "calibration" / "runs" / "h200"


@pytest.fixture(scope="module")
def bench():
    if not SCRIPT.exists() or not RUN.exists():
        pytest.skip("benchmarks/ and calibration/ are not shipped with the wheel")
    spec = importlib.util.spec_from_file_location("throughput_measured", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results(bench):
    return bench.comparisons()


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _scenario_options() -> dict[str, dict]:
    """Scenario id -> options as the run's scenario files gave them (not the CSV cells the script reads)."""
    out = {}
    for path in (RUN / "scenarios.json", RUN / "qlora" / "scenarios.json"):
        for entry in json.loads(path.read_text(encoding="utf-8"))["scenarios"]:
            out[entry["id"]] = (entry["model"], entry["options"])
    return out


def test_every_ok_row_and_only_those_is_compared(results):
    files = sorted(RUN.glob("**/measurements.csv"))
    assert len(files) == 3
    ok = [row for path in files for row in _rows(path) if row["status"] == "ok"]
    assert sorted(c.scenario_id for c in results) == sorted(row["scenario_id"] for row in ok)
    measured = {row["scenario_id"]: float(row["step_seconds"]) for row in ok}
    assert all(c.measured_s == measured[c.scenario_id] for c in results)


def test_default_predictions_are_what_estimate_says_for_the_scenario_files_setups(results):
    """The script rebuilds each setup from the CSV cells; the scenario files state the same setups independently.
    h200.json installs no host time per kernel (its rows timed the first steps after empty_cache(), not steady
    steps), so ``estimate(gpu="h200")`` says what the default column says; the fitted column's larger host time per
    kernel never makes a step faster."""
    given = _scenario_options()
    checked = 0
    for c in results:
        if c.scenario_id not in given:  # the preflight scenario has no scenario file
            continue
        model, options = given[c.scenario_id]
        if c.row["lora_modules"]:  # the targets the run adapted (see the test below)
            options = {**options, "lora_targets": c.row["lora_modules"]}
        details = estimate(harness_model(model), gpu="h200", **options).details
        assert details["step_seconds"] == pytest.approx(c.step.step_s, rel=1e-12), c.scenario_id
        assert c.calibrated.step_s >= c.step.step_s, c.scenario_id
        assert c.step.tokens_per_s * c.step.step_s == pytest.approx(c.tokens, rel=1e-9), c.scenario_id
        checked += 1
    assert checked == len(results) - 1


def test_rows_are_judged_on_the_lora_targets_their_run_adapted(results):
    """The harness recorded what peft adapted (``lora_modules``) and how many parameters trained, on the GPU. A row
    re-estimated after a target spelling changed meaning (``all-linear`` now reaches the fused MoE experts, as peft
    0.21 resolves the string) is still the model that ran: its trainable count is the recorded one."""
    lora_rows = [c for c in results if c.row["lora_modules"]]
    assert any("all-linear" in c.scenario_id and "moe" in c.scenario_id for c in lora_rows)
    for c in lora_rows:
        measured = row_scenario(c.row).options
        trained = estimate(harness_model(c.row["model"]), gpu="h200", **measured).details["trainable_params"]
        assert trained == int(c.row["trainable_params"]), c.scenario_id


def test_a_row_whose_cells_do_not_rebuild_its_setup_is_refused(bench):
    path, row = next((p, r) for p, r in bench.ok_rows() if r["grad_ckpt"] == "none")
    with pytest.raises(ValueError, match="rebuilt"):
        bench.compare(path, {**row, "grad_ckpt": "full"})


def test_measured_files_carry_one_provenance_each_and_the_report_cites_it(bench):
    rows = bench.ok_rows()
    facts = bench.provenance(rows)  # raises when a column has two values
    assert all(facts[column] for column in bench.PROVENANCE)
    report = bench.REPORT.read_text(encoding="utf-8")
    for column in ("device_name", "driver_version", "torch_version", "transformers_version", "bitsandbytes_version"):
        assert facts[column] in report, column
    assert facts["dates"] in report


def test_follow_up_timings_are_of_measured_scenarios(bench, results):
    ids = {c.scenario_id for c in results}
    follow_up = RUN / "step_timing"
    timing = json.loads((follow_up / "step_timing.json").read_text(encoding="utf-8"))
    profile = json.loads((follow_up / "profile.json").read_text(encoding="utf-8"))
    sampler = json.loads((follow_up / "nvml_sampler.json").read_text(encoding="utf-8"))
    assert {r["id"] for r in timing["rows"]} | {r["id"] for r in profile} | {r["id"] for r in sampler} <= ids
    variants = json.loads((follow_up / "profile_qwen3.json").read_text(encoding="utf-8"))
    assert {r["id"] for r in variants} == set(bench.PROFILED_VARIANTS)
    for r in variants:  # the q/k norms add kernels the profile saw: each variant counts more with them than without
        assert bench.variant_kernels(r["id"]) > bench.variant_kernels(r["id"], qk_norm=False)
    for r in timing["rows"]:  # the harness figure is the slower of the first two steps, as probes.measure_cuda takes it
        assert r["harness"] == max(r["wall_s"][:2])
        assert all(issue <= wall for issue, wall in zip(r["issue_s"], r["wall_s"]))
