"""Claims about the calibrated host time per launched kernel (``RuntimeProfile.host_seconds_per_kernel``, issue 16):
the default leaves every step as it was, the step-time model reads the profile's value, and the calibration fit
recovers a known value from steps the model itself timed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import vramcalc
from vramcalc import cost
from vramcalc import step_time as st
from vramcalc.calibrate import fit as fitting
from vramcalc.calibrate.scenarios import resolve, row_scenario
from vramcalc.catalogue import get_gpu
from vramcalc.profiles import profile_data
from vramcalc.terms.runtime import RuntimeProfile

REPO = Path(__file__).resolve().parents[1]
H200_GRID = REPO / "calibration" / "runs" / "h200" / "measurements.csv"
EAGER_8K = "smollm2-135m/full/mixed-bf16/adamw/ckpt/eager/b8s8192"  # GPU-bound, measured 1.7x the model's step


def _step(model: str, gpu: str, profile: RuntimeProfile, **options) -> st.StepTime:
    spec = vramcalc.get_model(model)
    from vramcalc.training_setup import resolve_setup

    return cost.step_for(spec, resolve_setup(spec, **options), get_gpu(gpu), 0, profile)


def test_the_default_host_time_per_kernel_is_the_cited_constant():
    assert RuntimeProfile().host_seconds_per_kernel == st.HOST_SECONDS_PER_KERNEL == 10e-6


def test_the_default_profile_leaves_an_uncalibrated_gpus_step_unchanged():
    # 0.05845198224852071 s: estimate(...)["step_seconds"] of this setup at commit 100b65e, before the profile
    # carried the host time (the constant 10 us in StepRates)
    details = vramcalc.estimate("smollm2-135m", gpu="h100-sxm", method="lora", batch_size=1, seq_len=256).details
    assert details["runtime_profile"] == "default"
    assert details["step_seconds"] == pytest.approx(0.05845198224852071, rel=1e-12)
    explicit = _step("smollm2-135m", "h100-sxm", RuntimeProfile(), method="lora", batch_size=1, seq_len=256)
    assert explicit.step_s == details["step_seconds"]


def test_a_slower_host_lengthens_a_host_bound_step_and_leaves_a_gpu_bound_one():
    fast, slow = RuntimeProfile(host_seconds_per_kernel=10e-6), RuntimeProfile(host_seconds_per_kernel=40e-6)
    small = dict(method="lora", batch_size=1, seq_len=256)  # ~4,400 tiny kernels: host-bound
    assert (_step("smollm2-135m", "h200", slow, **small).step_s
            > 2.5 * _step("smollm2-135m", "h200", fast, **small).step_s)
    # 8 x 8192 with eager attention: every kind's GPU time exceeds its kernels x 40 us (max(GPU, host) per kind)
    large = dict(method="full", precision="mixed-bf16", batch_size=8, seq_len=8192, grad_ckpt=True, attn="eager")
    assert _step("smollm2-135m", "h200", slow, **large).step_s == _step("smollm2-135m", "h200", fast, **large).step_s


def test_estimate_on_a_calibrated_gpu_uses_its_profiles_host_time():
    data = profile_data("h200")
    if data is None or "host_seconds_per_kernel" not in data["coefficients"]:
        pytest.skip("no calibrated H200 profile with a host time")
    options = dict(method="lora", batch_size=1, seq_len=256)
    details = vramcalc.estimate("smollm2-135m", gpu="h200", **options).details
    calibrated = RuntimeProfile(host_seconds_per_kernel=data["coefficients"]["host_seconds_per_kernel"])
    assert details["step_seconds"] == pytest.approx(_step("smollm2-135m", "h200", calibrated, **options).step_s,
                                                    rel=1e-12)


# -- the fit ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grid_rows() -> list[dict]:
    if not H200_GRID.is_file():
        pytest.skip("calibration/ is not shipped with the wheel")
    with open(H200_GRID, newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row["status"] == "ok"]


def _timed_at(rows: list[dict], host_s: float, keep: tuple[str, ...] = ()) -> list[dict]:
    """The rows with ``step_seconds`` replaced by the model's step at ``host_s`` per kernel (through
    ``cost.step_for``, not the fit's own code), except the scenarios in ``keep``, which keep their measured step."""
    out = []
    for row in rows:
        if row["scenario_id"] in keep:
            out.append(dict(row))
            continue
        scenario = row_scenario(row)
        spec, resolved = resolve(scenario)
        gpu = get_gpu(row["gpu"])
        paged = vramcalc.estimate(spec, gpu=gpu, **scenario.options).details["paged_optimizer_bytes"]
        step = cost.step_for(spec, resolved, gpu, paged, RuntimeProfile(host_seconds_per_kernel=host_s))
        out.append({**row, "step_seconds": repr(step.step_s)})
    return out


@pytest.mark.parametrize("host_s", [30e-6, 5e-6])
def test_fit_recovers_a_known_host_time_per_kernel_from_steps_the_model_timed(grid_rows, host_s):
    host = fitting.fit_host(_timed_at(grid_rows, host_s), "h200")
    assert host.rows == len(grid_rows)
    assert host.host_seconds_per_kernel == pytest.approx(host_s, rel=0.01)
    assert host.residuals_after["max_abs_rel_error"] < 0.01


def test_a_gpu_bound_row_the_model_underestimates_does_not_move_the_fit(grid_rows):
    assert any(row["scenario_id"] == EAGER_8K for row in grid_rows)
    host = fitting.fit_host(_timed_at(grid_rows, 30e-6, keep=(EAGER_8K,)), "h200")
    assert host.host_seconds_per_kernel == pytest.approx(30e-6, rel=0.01)
    assert host.residuals_after["max_abs_rel_error"] > 0.3  # the outlier stays an outlier


def test_rows_without_a_step_time_keep_the_default_and_say_so():
    rows = [{"scenario_id": "s0", "status": "ok", "probe": "cuda", "model": "smollm2-135m", "tokens": "256",
             "attn_used": "sdpa", "attn": "sdpa", "est_peak_tensor_bytes": str(2**30), "est_paged_bytes": "0",
             "meas_allocated_peak_bytes": str(2**30 + 2**26), "meas_reserved_peak_bytes": str(2**30 + 2**27),
             "nvml_peak_bytes": str(2**31), "nvml_device_matches": "true"}]
    result = fitting.fit(rows, "h200")
    assert result.host is None
    profile = fitting.profile_json(result, rows, gpu="h200")
    assert profile["coefficients"]["host_seconds_per_kernel"] == st.HOST_SECONDS_PER_KERNEL
    assert "host_seconds_per_kernel" in profile["kept_default"]


def test_the_fitted_host_time_is_the_least_squares_minimum_on_the_measured_steps(grid_rows):
    # the closed form per interval against a brute-force scan of 1-200 us in 0.25 us steps
    obs, skipped = fitting.step_observations(grid_rows, "h200")
    assert len(obs) == len(grid_rows) and not skipped
    h = fitting.fit_host_seconds_per_kernel(obs)
    best = fitting._relative_sse(obs, h)
    assert all(best <= fitting._relative_sse(obs, k * 0.25e-6) + 1e-12 for k in range(4, 801))


def test_a_host_time_fitted_on_the_first_steps_after_empty_cache_is_reported_but_not_installed(grid_rows):
    """The first H200 run timed the first steps after ``empty_cache()`` (no ``step_timing``): the fit is reported and
    the default stays; the same rows marked as steadily timed install it."""
    from vramcalc.calibrate.records import STEADY_STEP_TIMING

    timed = _timed_at(grid_rows, 30e-6)
    profile = fitting.profile_json(fitting.fit(timed, "h200"), timed, gpu="h200")
    assert profile["fitted"]["host_seconds_per_kernel"]["installed"] is False
    assert profile["fitted"]["host_seconds_per_kernel"]["value"] == pytest.approx(30e-6, rel=0.01)
    assert profile["coefficients"]["host_seconds_per_kernel"] == st.HOST_SECONDS_PER_KERNEL
    assert "host_seconds_per_kernel" in profile["kept_default"]
    steady = [{**row, "step_timing": STEADY_STEP_TIMING} for row in timed]
    profile = fitting.profile_json(fitting.fit(steady, "h200"), steady, gpu="h200")
    assert profile["coefficients"]["host_seconds_per_kernel"] == pytest.approx(30e-6, rel=0.01)
    assert "host_seconds_per_kernel" not in profile["kept_default"]
