"""The calibration harness: scenarios, crash-safe records, the fit, and the whole CPU harness end to end.

The end-to-end tests run ``python -m vramcalc.calibrate --device cpu`` on toy models (one fresh worker per
scenario, a few seconds each). GPU tests are marked ``gpu`` and skipped without CUDA.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vramcalc.calibrate import fit as fitting
from vramcalc.calibrate.probes import catalogue_gpu_name
from vramcalc.calibrate.records import COLUMNS, RecordFile, encode_row
from vramcalc.calibrate.scenarios import Scenario, default_grid, load_scenarios, order_for_budget, scenario_axes
from vramcalc.errors import VramcalcError

from .conftest import needs_torch

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
MIB = 2**20

TINY_SCENARIOS = """\
model,method,precision,optimizer,batch_size,seq_len,grad_ckpt,attn
tiny-llama,full,bf16,adamw,1,32,,
tiny-qwen3,full,bf16,adamw,8,256,,
tiny-qwen3-moe,lora,mixed-bf16,adamw-8bit,2,32,true,eager
tiny-llama,qlora,bf16,paged-adamw,1,32,,
"""
# The second scenario needs ~26 MiB of tensors, the others under 2 MiB: an 8 MiB limit makes it (only) run out.
TINY_LIMIT_MIB = 8


def _cuda_available() -> bool:
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # ask NVML, create no context in this process
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _harness(*args: str, timeout: float = 300, first_on_path: Path | None = None) -> subprocess.CompletedProcess:
    path = [str(first_on_path)] if first_on_path is not None else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + [str(REPO)]))
    return subprocess.run([sys.executable, "-m", "vramcalc.calibrate", "--no-progress", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# -- scenarios -----------------------------------------------------------------------------------------
H200_FREE_BYTES = 140 * GIB


def test_default_grid_has_40_scenarios_spanning_every_axis_on_three_architectures_one_moe():
    grid = default_grid("cuda", H200_FREE_BYTES, "h200")
    axes = [scenario_axes(s) for s in grid]
    assert len(grid) >= 40
    assert {a["method"] for a in axes} >= {"full", "lora", "qlora"}
    assert {a["precision"] for a in axes} >= {"bf16", "mixed-bf16"}
    assert {a["optimizer"] for a in axes} >= {"adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit"}
    assert {a["grad_ckpt"] for a in axes} == {"full", "none"}
    assert {a["attn"] for a in axes} >= {"sdpa", "eager"}
    assert len({a["family"] for a in axes}) >= 3 and "qwen3_moe" in {a["family"] for a in axes}
    assert len({(s.options["batch_size"], s.options["seq_len"]) for s in grid}) >= 5


@pytest.mark.parametrize("free_gib", [24, 80, 140])
def test_default_grid_spans_small_to_80_percent_of_free_memory(free_gib):
    import vramcalc

    grid = default_grid("cuda", free_gib * GIB, "h200")
    breakdowns = [vramcalc.estimate(_spec(s), gpu="h200", **s.options) for s in grid]
    totals = [b.total_bytes for b in breakdowns]
    assert max(totals) <= 0.80 * free_gib * GIB
    assert max(totals) >= 0.60 * free_gib * GIB
    # the smallest scenario's own tensors; the fixed runtime terms (the H200 profile's measured CUDA context) are not
    # the scenario's size
    assert min(b.peak_tensor_bytes for b in breakdowns) <= 0.05 * free_gib * GIB


def _spec(scenario):
    from vramcalc.calibrate.scenarios import harness_model

    return harness_model(scenario.model)


def test_budget_order_spans_every_axis_value_within_the_first_dozen_scenarios():
    grid = default_grid("cuda", H200_FREE_BYTES, "h200")
    every = {}
    for axes in map(scenario_axes, grid):
        for name, value in axes.items():
            every.setdefault(name, set()).add(value)
    first = {}
    for axes in map(scenario_axes, grid[:12]):
        for name, value in axes.items():
            first.setdefault(name, set()).add(value)
    for name in ("method", "precision", "optimizer", "grad_ckpt", "attn", "family", "size"):
        assert first[name] == every[name], name


def test_budget_order_does_not_depend_on_the_input_order():
    grid = default_grid("cpu", 8 * GIB)
    shuffled = list(grid)
    random.Random(1).shuffle(shuffled)
    assert [s.id for s in order_for_budget(shuffled)] == [s.id for s in grid]


def test_cpu_grid_runs_the_same_recipes_on_toy_models():
    grid = default_grid("cpu", 8 * GIB)
    assert len(grid) >= 40
    assert {s.model for s in grid} == {"tiny-llama", "tiny-qwen3", "tiny-qwen3-moe"}


def test_csv_and_json_scenario_files_give_the_same_scenarios(tmp_path):
    (tmp_path / "s.csv").write_text(TINY_SCENARIOS)
    from_csv = load_scenarios(tmp_path / "s.csv")
    (tmp_path / "s.json").write_text(json.dumps({"scenarios": [s.to_dict() for s in from_csv]}))
    flat = [{"model": s.model, **s.options} for s in from_csv]
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    assert [s.id for s in load_scenarios(tmp_path / "s.json")] == [s.id for s in from_csv]
    assert [s.id for s in load_scenarios(tmp_path / "flat.json")] == [s.id for s in from_csv]
    assert from_csv[0].id == "tiny-llama/full/bf16/adamw/nockpt/sdpa/b1s32"


def test_scenario_id_names_every_option_that_differs_from_its_default():
    scenario = Scenario("tiny-llama", {"method": "lora", "lora_rank": 16, "batch_size": 2, "seq_len": 64})
    assert scenario.id == "tiny-llama/lora/bf16/adamw/nockpt/sdpa/b2s64/lora_rank=16"


@pytest.mark.parametrize("text, words", [
    ("model,optimizer\ntiny-llama,adam\n", ["row 2", "optimizer", "adam"]),
    ("model,batch_size\nno-such-model,1\n", ["row 2", "no-such-model"]),
    ("model,num_gpus\ntiny-llama,2\n", ["one GPU", "num_gpus"]),
    ("model,colour\ntiny-llama,red\n", ["colour"]),
    ("model\ntiny-llama\ntiny-llama\n", ["twice"]),
])
def test_bad_scenario_file_is_refused_naming_the_entry(tmp_path, text, words):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(VramcalcError) as error:
        load_scenarios(path)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("name, total_gib, expected", [
    ("NVIDIA H200", 141, "h200"),
    ("NVIDIA H100 80GB HBM3", 80, "h100-sxm"),
    ("NVIDIA H100 PCIe", 80, "h100-pcie"),
    ("NVIDIA A100-SXM4-80GB", 80, "a100-80gb"),
    ("NVIDIA A100-PCIE-40GB", 40, "a100-40gb"),
    ("NVIDIA A100-SXM4", 80, "a100-80gb"),
    ("NVIDIA GeForce RTX 4090", 24, "rtx-4090"),
    ("NVIDIA RTX 6000 Ada Generation", 48, "rtx-6000-ada"),
    ("NVIDIA L4", 24, "l4"),
    ("NVIDIA L40S", 48, "l40s"),
    ("Tesla T4", 16, "t4"),
    ("NVIDIA B200", 180, "b200"),
    ("NVIDIA GeForce GTX 1080", 8, None),
])
def test_device_names_map_to_catalogue_gpus(name, total_gib, expected):
    assert catalogue_gpu_name(name, total_gib * GIB) == expected


# -- records -------------------------------------------------------------------------------------------
def _row(scenario_id: str, **values) -> dict:
    return {"scenario_id": scenario_id, "status": "ok", **values}


def test_a_row_cut_short_by_a_crash_is_dropped_and_the_file_repaired(tmp_path):
    records = RecordFile(tmp_path / "m.csv").open()
    records.append(_row("a", message="fine"))
    records.append(_row("b"))
    with open(records.path, "ab") as f:
        f.write(encode_row(_row("c"))[:-40])  # killed mid-write: no newline, no checksum
    assert [r["scenario_id"] for r in RecordFile(records.path).rows()] == ["a", "b"]
    reopened = RecordFile(records.path).open()
    reopened.append(_row("c"))
    assert [r["scenario_id"] for r in reopened.rows()] == ["a", "b", "c"]
    assert records.path.read_bytes().count(b"\n") == 4


def test_a_row_whose_checksum_does_not_match_is_ignored(tmp_path):
    records = RecordFile(tmp_path / "m.csv").open()
    records.append(_row("a"))
    records.append(_row("b"))
    data = records.path.read_bytes().replace(b",ok,", b",oom,", 1)
    records.path.write_bytes(data)
    assert [r["scenario_id"] for r in records.rows()] == ["b"]


def test_error_messages_stay_on_one_line(tmp_path):
    records = RecordFile(tmp_path / "m.csv").open()
    records.append(_row("a", status="error", message='Traceback:\n  File "x", line 1\nValueError: "quoted", comma'))
    (row,) = records.rows()
    assert row["message"] == 'Traceback: | File "x", line 1 | ValueError: "quoted", comma'
    assert records.path.read_text().count("\n") == 2


def test_reopening_a_file_with_older_columns_keeps_its_rows(tmp_path):
    old_columns = ("scenario_id", "status", "message", "row_crc32")
    old = RecordFile(tmp_path / "m.csv", columns=old_columns).open()
    old.append(_row("a", message="kept"))
    new = RecordFile(old.path).open()
    (row,) = new.rows()
    assert row["message"] == "kept" and list(row) == list(COLUMNS[:-1])


def test_csv_column_names_are_unique():
    assert len(set(COLUMNS)) == len(COLUMNS)


def test_readme_documents_every_csv_column():
    readme = (REPO / "calibration" / "README.md").read_text()
    documented = set(re.findall(r"`([a-z0-9_]+)`", readme))
    missing = [column for column in COLUMNS if column not in documented]
    assert not missing


# -- the fit -------------------------------------------------------------------------------------------
def _synthetic_rows(workspace, fraction, context, *, attention=None, noise=0.002, n=40, seed=0):
    """Rows as the harness writes them, from known coefficients and ~0.2% measurement noise."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        tensor = rng.uniform(0.5, 100) * GIB
        paged = rng.choice([0, 0, rng.uniform(0.1, 4) * GIB])
        attn = rng.choice(["sdpa", "eager"])
        tokens = rng.choice([256, 2048, 8192, 32768])
        extra = attention[attn] * tokens * 9 * 64 if attention else 0  # query elements: smollm2-135m a=9, d=64
        allocated = (tensor + workspace + extra) * (1 + rng.gauss(0, noise))
        reserved = allocated + fraction * tensor * (1 + rng.gauss(0, 0.05))
        nvml = reserved + context + paged + rng.gauss(0, 2 * MIB)
        rows.append({
            "scenario_id": f"s{i}", "status": "ok", "probe": "cuda", "model": "smollm2-135m", "tokens": str(tokens),
            "attn_used": attn, "attn": attn, "method": "full", "precision": "bf16", "optimizer": "adamw",
            "grad_ckpt": "false", "size": "",
            "est_peak_tensor_bytes": str(int(tensor)), "est_paged_bytes": str(int(paged)),
            "meas_allocated_peak_bytes": str(int(allocated)), "meas_reserved_peak_bytes": str(int(reserved)),
            "nvml_peak_bytes": str(int(nvml)), "nvml_device_matches": "true",
        })
    return rows


def test_fit_recovers_known_coefficients_from_synthetic_data():
    workspace, fraction, context = 64 * MIB, 0.07, 520 * MIB
    result = fitting.fit(_synthetic_rows(workspace, fraction, context, noise=0.0002), "h200")
    c = result.coefficients
    assert c.workspace_bytes == pytest.approx(workspace, abs=4 * MIB)
    assert c.allocator_slack_fraction == pytest.approx(fraction, abs=0.003)
    assert c.cuda_context_bytes == pytest.approx(context, abs=8 * MIB)
    assert result.residuals_after["nvml"]["median_abs_rel_error"] < 0.005
    assert result.loo["nvml"]["median_abs_rel_error"] < 0.005
    assert result.residuals_before["nvml"]["median_abs_rel_error"] > result.residuals_after["nvml"]["median_abs_rel_error"]


def test_fit_finds_a_per_attention_kernel_correction_when_the_data_has_one():
    rows = _synthetic_rows(32 * MIB, 0.05, 500 * MIB, attention={"sdpa": 4.0, "eager": 0.0}, noise=0.0002)
    result = fitting.fit(rows, "h200")
    candidate = result.corrections["attention_kernel"]
    assert candidate["suggested"]
    assert candidate["coefficients"]["attention_sdpa_bytes_per_query_element"] == pytest.approx(4.0, rel=0.1)
    assert abs(candidate["coefficients"]["attention_eager_bytes_per_query_element"]) < 0.5


def test_fit_suggests_no_correction_when_the_data_has_none():
    result = fitting.fit(_synthetic_rows(64 * MIB, 0.07, 520 * MIB, noise=0.002), "h200")
    assert not result.corrections["attention_kernel"]["suggested"]


def test_fit_keeps_the_defaults_of_what_a_probe_cannot_measure():
    rows = _synthetic_rows(0, 0.0, 0.0)
    for row in rows:
        row.update(probe="cpu-tracker", meas_reserved_peak_bytes="", nvml_peak_bytes="")
    result = fitting.fit(rows, None)
    assert result.coefficients.allocator_slack_fraction is None and result.coefficients.cuda_context_bytes is None
    assert set(result.rows_used) == {"workspace_bytes"}


def test_fit_ignores_failed_rows_and_nvml_of_another_device():
    rows = _synthetic_rows(64 * MIB, 0.07, 520 * MIB, noise=0.0002)
    rows.append({**rows[0], "scenario_id": "oom", "status": "oom", "meas_allocated_peak_bytes": str(GIB)})
    rows.append({**rows[1], "scenario_id": "other", "nvml_device_matches": "false", "nvml_peak_bytes": str(999 * GIB)})
    result = fitting.fit(rows, "h200")
    assert result.coefficients.cuda_context_bytes == pytest.approx(520 * MIB, abs=8 * MIB)
    assert result.residuals_after["nvml"]["n"] == len(rows) - 2


def test_a_fitted_profile_is_what_estimate_uses_for_that_gpu(tmp_path, monkeypatch):
    import vramcalc
    from vramcalc import profiles

    rows = _synthetic_rows(64 * MIB, 0.07, 520 * MIB, noise=0.0002)
    profile = fitting.profile_json(fitting.fit(rows, "h200"), rows, gpu="h200")
    (tmp_path / "h200.json").write_text(json.dumps(profile))
    monkeypatch.setattr(profiles, "profiles_dir", lambda: tmp_path)

    def forget_loaded_profiles():  # every cache of profiles.py that holds a file's contents
        for cached in (profiles.profile_data, getattr(profiles, "_load", None)):
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()

    forget_loaded_profiles()
    try:
        b = vramcalc.estimate("smollm2-135m", gpu="h200", seq_len=1024)
        c = profile["coefficients"]
        assert b.details["runtime_profile"] == "calibrated: h200.json"
        assert b.terms()["runtime_overhead"] == c["cuda_context_bytes"] + c["workspace_bytes"]
        stranded = vramcalc.estimate("smollm2-135m", seq_len=1024).terms()["allocator_slack"]  # default fraction 0
        assert b.terms()["allocator_slack"] == stranded + int(c["allocator_slack_fraction"] * b.peak_tensor_bytes)
    finally:
        forget_loaded_profiles()
    assert set(profile["residuals"]) == {"before", "after"} and profile["loo_cv"]["nvml"]["n"] == len(rows)


def test_profile_names_its_provenance():
    rows = _synthetic_rows(64 * MIB, 0.07, 520 * MIB)
    for row in rows:
        row.update(device_name="NVIDIA H200", driver_version="580.1", cuda_version="13.0", torch_version="2.11.0",
                   transformers_version="5.24.0", peft_version="0.21.2", bitsandbytes_version="0.50.2",
                   date="2026-11-29T12:00:00+00:00")
    provenance = fitting.profile_json(fitting.fit(rows, "h200"), rows, gpu="h200")["provenance"]
    assert provenance["device_name"] == "NVIDIA H200" and provenance["driver_version"] == "580.1"
    for key in ("cuda_version", "torch_version", "transformers_version", "peft_version", "bitsandbytes_version"):
        assert provenance[key]
    assert provenance["date_first"].startswith("2026-11-29")


def test_importing_the_harness_loads_no_torch_or_numpy():
    code = ("import sys, vramcalc.calibrate.__main__, vramcalc.calibrate.runner, vramcalc.calibrate.fit, "
            "vramcalc.calibrate.report, vramcalc.calibrate.scenarios, vramcalc.calibrate.records; "
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO))).stdout.strip()
    assert out == "[]"


# -- the training step and the CPU probe (in this process) --------------------------------------------
@needs_torch
def test_qlora_layers_get_real_bitsandbytes_4bit_weights():
    import bitsandbytes as bnb
    import torch

    from vramcalc.calibrate.scenarios import harness_model
    from vramcalc.calibrate.training import build_on_device
    from vramcalc.training_setup import resolve_setup

    spec = harness_model("tiny-llama")
    model = build_on_device(spec, resolve_setup(spec, method="qlora", seq_len=32), torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:
        assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.bnb_quantized
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() * 2 == layer.in_features * layer.out_features
        assert torch.isfinite(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)).all()


@needs_torch
@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("options", [
    dict(method="full", precision="bf16", optimizer="adamw"),
    dict(method="lora", precision="mixed-bf16", optimizer="adamw-8bit", grad_ckpt=True, attn="eager"),
    dict(method="qlora", precision="bf16", optimizer="paged-adamw-8bit", loss="chunked"),
], ids=lambda o: o["method"])
def test_device_training_step_trains_with_a_finite_loss_near_log_vocab(options):
    import math

    import torch

    from vramcalc.calibrate.scenarios import harness_model
    from vramcalc.calibrate.training import TrainingStep, build_on_device
    from vramcalc.training_setup import resolve_setup

    spec = harness_model("tiny-qwen3-moe")
    resolved = resolve_setup(spec, batch_size=2, seq_len=32, **options)
    model = build_on_device(spec, resolved, torch.device("cpu"))
    step = TrainingStep(model, spec, resolved, torch.device("cpu"))
    losses = [step.run() for _ in range(2)]
    assert all(abs(loss - math.log(spec.vocab_size)) < 1.0 for loss in losses)


@needs_torch
def test_cpu_probe_raises_out_of_memory_above_an_imposed_limit():
    from vramcalc.calibrate.probes import ProbeFailure, measure_cpu
    from vramcalc.calibrate.scenarios import harness_model
    from vramcalc.training_setup import resolve_setup

    spec = harness_model("tiny-llama")
    resolved = resolve_setup(spec, batch_size=4, seq_len=128)
    free = measure_cpu(spec, resolved)
    with pytest.raises(ProbeFailure) as failure:
        measure_cpu(spec, resolved, memory_limit_bytes=free["allocated_peak_bytes"] // 2)
    assert failure.value.status == "oom" and "limit" in failure.value.message


# -- the whole harness, CPU mode ----------------------------------------------------------------------
@needs_torch
def test_cpu_harness_end_to_end_records_every_scenario_and_an_oom_does_not_stop_the_run(tmp_path):
    (tmp_path / "s.csv").write_text(TINY_SCENARIOS)
    out = tmp_path / "run"
    done = _harness("--device", "cpu", "--scenarios", str(tmp_path / "s.csv"), "--out", str(out),
                    "--memory-limit-mib", str(TINY_LIMIT_MIB))
    assert done.returncode == 0, done.stderr
    rows = RecordFile(out / "measurements.csv").rows()
    statuses = {row["scenario_id"]: row["status"] for row in rows}
    assert list(statuses.values()) == ["ok", "oom", "ok", "ok"]
    ok = [row for row in rows if row["status"] == "ok"]
    for row in ok:
        assert row["probe"] == "cpu-tracker" and row["torch_version"] and row["date"]
        assert 0.8 < float(row["ratio_allocated_to_est_peak_tensor"]) < 1.25
        assert int(row["trace_peak_tensor_bytes"]) == int(row["meas_allocated_peak_bytes"])
    oom = next(row for row in rows if row["status"] == "oom")
    assert "limit" in oom["message"] and oom["memory_limit_bytes"] == str(TINY_LIMIT_MIB * MIB)
    profile = json.loads((out / "profile-cpu.json").read_text())
    assert profile["scenarios"] == {"ok": 3, "oom": 1} and profile["residuals"]["after"]["allocated"]["n"] == 3
    assert (out / "measured_vs_estimated.png").stat().st_size > 1000
    assert "tiny-llama/full/bf16/adamw/nockpt/sdpa/b1s32" in done.stdout  # the summary table
    assert (out / "report.txt").read_text().strip() == done.stdout.strip()


@needs_torch
def test_kill_then_resume_loses_nothing_and_duplicates_nothing(tmp_path):
    (tmp_path / "s.csv").write_text(TINY_SCENARIOS.replace("tiny-qwen3,full,bf16,adamw,8,256,,\n", ""))
    out = tmp_path / "run"
    csv_path = out / "measurements.csv"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    runner = subprocess.Popen([sys.executable, "-m", "vramcalc.calibrate", "--no-progress", "--device", "cpu",
                               "--scenarios", str(tmp_path / "s.csv"), "--out", str(out)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (csv_path.exists() and len(RecordFile(csv_path).rows()) >= 1):
        time.sleep(0.1)
    runner.send_signal(signal.SIGKILL)  # mid-run: the second scenario is in flight
    runner.wait()
    assert _workers_of(runner.pid, wait_s=10) == []  # the worker in flight died with its runner
    before = RecordFile(csv_path).rows()
    assert 1 <= len(before) < 3
    with open(csv_path, "ab") as f:  # and, for good measure, a row half-written when the kill landed
        f.write(encode_row(_row("half-written"))[:30])
    refused = _harness("--device", "cpu", "--scenarios", str(tmp_path / "s.csv"), "--out", str(out))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = _harness("--device", "cpu", "--scenarios", str(tmp_path / "s.csv"), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    after = RecordFile(csv_path).rows()
    ids = [row["scenario_id"] for row in after]
    assert sorted(ids) == sorted(s.id for s in load_scenarios(tmp_path / "s.csv"))
    assert len(ids) == len(set(ids)) == 3
    assert after[:len(before)] == before  # what was recorded before the kill is untouched
    lines = csv_path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 1 + 3 + 1  # header, three rows, nothing half-written


def _workers_of(runner_pid: int, wait_s: float) -> list[int]:
    """Live worker processes started by ``runner_pid`` (their command line names it), after up to ``wait_s``."""
    deadline = time.time() + wait_s
    while True:
        alive = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
                status = (entry / "status").read_text()
            except OSError:
                continue
            if b"vramcalc.calibrate.worker" in args and str(runner_pid).encode() in args and "State:\tZ" not in status:
                alive.append(int(entry.name))
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def test_fit_only_refits_a_recorded_run_without_measuring(tmp_path):
    out = tmp_path / "run"
    records = RecordFile(out / "measurements.csv").open()
    for row in _synthetic_rows(64 * MIB, 0.07, 520 * MIB, noise=0.0002, n=12):
        records.append({**row, "gpu": "h200", "est_total_bytes": row["est_peak_tensor_bytes"]})
    done = _harness("--fit-only", "--out", str(out), "--no-install-profile")
    assert done.returncode == 0, done.stderr
    profile = json.loads((out / "profile-h200.json").read_text())
    assert profile["coefficients"]["workspace_bytes"] == pytest.approx(64 * MIB, abs=4 * MIB)
    assert "est total_bytes vs NVML" in done.stdout


def test_fit_only_without_matplotlib_warns_in_one_line_naming_the_extra_and_keeps_the_fit(tmp_path):
    # a real import failure in the child: its sitecustomize makes `import matplotlib` raise ModuleNotFoundError
    blocker = tmp_path / "no_matplotlib"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    out = tmp_path / "run"
    records = RecordFile(out / "measurements.csv").open()
    for row in _synthetic_rows(64 * MIB, 0.07, 520 * MIB, noise=0.0002, n=12):
        records.append({**row, "gpu": "h200", "est_total_bytes": row["est_peak_tensor_bytes"]})
    done = _harness("--fit-only", "--out", str(out), "--no-install-profile", first_on_path=blocker)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:"), done.stderr
    assert "matplotlib" in lines[0] and "pip install 'vramcalc[calibrate]'" in lines[0]
    assert "Traceback" not in done.stderr
    assert (out / "profile-h200.json").is_file() and (out / "report.txt").is_file()
    assert not (out / "measured_vs_estimated.png").exists()


# -- on a GPU -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(method="lora", seq_len=512), dict(method="qlora", seq_len=512,
                                                                           optimizer="paged-adamw-8bit")])
@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
def test_cuda_probe_sees_context_workspace_and_slack_in_the_right_order(options):
    out = subprocess.run(
        [sys.executable, "-c",
         "import json, sys; from vramcalc.calibrate.probes import measure_cuda; "
         "from vramcalc.calibrate.scenarios import Scenario, resolve; "
         f"s = Scenario('smollm2-135m', {options!r}); print(json.dumps(measure_cuda(*resolve(s))))"],
        capture_output=True, text=True, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    readings = json.loads(out.stdout.strip().splitlines()[-1])
    assert readings["allocated_peak_bytes"] <= readings["reserved_peak_bytes"]
    assert readings["active_peak_bytes"] <= readings["reserved_peak_bytes"]
    assert 100 * MIB < readings["cuda_context_bytes"] < 2 * GIB
    assert readings["nvml_peak_bytes"] >= readings["reserved_peak_bytes"]
    assert readings["step_seconds"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
def test_this_gpu_is_described_and_found_in_the_catalogue():
    from vramcalc.calibrate.runner import describe_device

    device = describe_device("cuda:0")
    assert device.kind == "cuda" and device.gpu is not None, device.name
    assert 0 < device.free_bytes <= device.total_bytes


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
def test_cuda_harness_records_an_imposed_limit_as_oom_and_goes_on(tmp_path):
    (tmp_path / "s.csv").write_text("model,method,batch_size,seq_len\n"
                                    "smollm2-135m,lora,1,256\nsmollm2-360m,full,16,4096\nsmollm2-135m,qlora,1,256\n")
    out = tmp_path / "run"
    done = _harness("--device", "cuda:0", "--scenarios", str(tmp_path / "s.csv"), "--out", str(out),
                    "--memory-limit-mib", "6144", "--no-install-profile", timeout=600)
    assert done.returncode == 0, done.stderr
    statuses = [row["status"] for row in RecordFile(out / "measurements.csv").rows()]
    assert statuses == ["ok", "oom", "ok"]
