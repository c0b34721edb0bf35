"""Fit the coefficients the trace cannot see from the measured rows, and write the GPU's profile JSON.

Per scenario, T = the estimate's ``peak_tensor_bytes``, P = its paged optimizer bytes; measured A =
``max_memory_allocated``, R = ``max_memory_reserved``, N = NVML's peak for the process. What each metric adds
(shared/reference/memory-math.md §6) gives one equation per coefficient of ``terms.runtime.RuntimeProfile``:

    A - T     = workspace_bytes                      cuBLAS workspaces (allocated by torch, not tensors of the step)
    R - A - S = allocator_slack_fraction * T         the caching allocator's slack beyond S, the blocks the estimate
                                                     finds stranded (``runtime.step_reserved_bytes``)
    N - R - P = cuda_context_bytes                   context, kernel images; P: bitsandbytes' unified memory

so that ``estimate(gpu=...)``'s total, T + context + workspace + P + S + fraction * T, predicts N. S is the row's
setup estimated again by this checkout (``row_stranded_bytes``; 0 for a row it cannot rebuild). Each is solved by
least squares on *relative* residuals (weights 1/measured^2): one large scenario would otherwise swamp the
constants with the estimator's own percent-level tensor errors. Coefficients are clamped at 0 (a negative
workspace would say the estimate over-counts tensors; the residuals report that instead). NCCL needs several GPUs
and keeps its documented default.

Candidate extra coefficients (``CANDIDATES``), tried on A - T: a per-attention-kernel term (bytes per query element
b·s·a·d, for kernel workspaces such as flash attention's fp32 dq accumulator) and a term proportional to T (the
estimator's own bias). Each is kept in the profile's ``corrections`` with its leave-one-out error, and marked
``suggested`` when it lowers that error by ``SUGGEST_IMPROVEMENT``; the estimator does not read them.

Leave-one-out cross-validation refits without each scenario and predicts it, for A, R and N.

The host's time per launched kernel (``RuntimeProfile.host_seconds_per_kernel``, the step-time model's h) is fitted
from the measured ``step_seconds`` (``fit_host_seconds_per_kernel``). Each ok row of a CUDA probe is rebuilt as the
setup it measured (``scenarios.row_scenario``) and timed by ``vramcalc.step_time`` exactly as ``estimate`` times it,
with only h free: step(h) = Σ over kinds max(GPU time, n_kind · (h + views/kernels · h_view)) + exposed
communication. h is the value minimising Σ ((step_i(h) - measured_i) / measured_i)^2, relative residuals as above;
step(h) is piecewise linear in h (a kind turns host-bound where n·h reaches its GPU time), so the minimum is found
exactly, interval by interval. A GPU-bound row's step does not change with h near the minimum and does not pull it
(the eager 8 x 8192 row of the H200 run, 1.7x its predicted GPU time); ``scenarios`` counts the rows whose step the
host binds at the fitted h. The view ops' own time (``step_time.VIEW_OP_HOST_SECONDS``) is not fitted: with every
measured row eager, kernels and views come in a fixed ratio and only their sum is seen.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..terms.runtime import RuntimeProfile, cublas_workspace_bytes
from .. import step_time as _step
from .records import STEADY_STEP_TIMING, number

PROFILE_FORMAT = 1
SUGGEST_IMPROVEMENT = 0.10  # a candidate is suggested when it lowers the LOO median |error| of A by 10%
MIN_ROWS_PER_FEATURE = 3


@dataclass(frozen=True)
class Observation:
    """One successfully measured scenario, as numbers (bytes)."""

    scenario_id: str
    probe: str
    attn: str
    axes: dict  # method, precision, optimizer, grad_ckpt, attn, model, size: for residuals by axis
    est_peak_tensor: float  # T
    est_paged: float  # P
    query_elements: float  # b·s·a·d: the attention input size, the feature of per-kernel corrections
    allocated: float | None  # A
    reserved: float | None  # R
    nvml: float | None  # N
    est_stranded: float = 0.0  # S: the allocator's stranded blocks the estimate finds beside its peak


@dataclass(frozen=True)
class Coefficients:
    """Runtime coefficients in bytes (fraction for slack). ``None``: not measured, the default applies."""

    workspace_bytes: float | None = None
    allocator_slack_fraction: float | None = None
    cuda_context_bytes: float | None = None

    def filled(self, defaults: "Coefficients") -> "Coefficients":
        return Coefficients(*(value if value is not None else default
                              for value, default in zip(self.values(), defaults.values())))

    def values(self) -> tuple:
        return self.workspace_bytes, self.allocator_slack_fraction, self.cuda_context_bytes


@dataclass(frozen=True)
class HostFit:
    """The fitted host time per launched kernel and the step-time residuals before (default) and after."""

    host_seconds_per_kernel: float
    default_seconds: float  # RuntimeProfile().host_seconds_per_kernel
    rows: int  # step rows timed by the model
    host_bound_rows: int  # rows whose step the host binds at the fitted value (they determine it)
    residuals_before: dict
    residuals_after: dict
    seconds_per_launched_kernel_with_views: float  # h + views/kernels · h_view of an eager step
    skipped: tuple[str, ...] = ()  # "scenario id: reason" of rows the model could not time
    loo: dict = field(default_factory=dict)  # each row predicted with h fitted without it
    steady: bool = True  # every row timed steady steps (records.STEADY_STEP_TIMING): only then is it installed


@dataclass(frozen=True)
class FitResult:
    coefficients: Coefficients  # fitted (None where not measured)
    defaults: Coefficients  # what estimate() uses without a profile
    rows_used: dict  # coefficient -> number of scenarios that determined it
    residuals_before: dict
    residuals_after: dict
    loo: dict
    corrections: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    host: HostFit | None = None  # None: no measured step time the model could time


# -- observations --------------------------------------------------------------------------------------
def observations(rows: list[dict]) -> list[Observation]:
    """The rows with status ok and a measured allocated peak."""
    from .scenarios import harness_model

    out = []
    for row in rows:
        if row.get("status") != "ok" or number(row, "meas_allocated_peak_bytes") is None:
            continue
        if number(row, "est_peak_tensor_bytes") is None:
            continue
        try:
            spec = harness_model(row["model"])
            query = float(number(row, "tokens") or 0) * spec.num_heads * spec.qk_head_dim
        except Exception:  # a model this checkout no longer knows: no attention feature
            query = 0.0
        matches = row.get("nvml_device_matches", "")
        nvml = number(row, "nvml_peak_bytes") if matches != "false" else None
        out.append(Observation(
            est_stranded=row_stranded_bytes(row),
            scenario_id=row["scenario_id"],
            probe=row.get("probe", ""),
            attn=row.get("attn_used") or row.get("attn", ""),
            axes={key: row.get(key, "") for key in ("model", "method", "precision", "optimizer", "grad_ckpt",
                                                     "attn", "size")},
            est_peak_tensor=float(number(row, "est_peak_tensor_bytes")),
            est_paged=float(number(row, "est_paged_bytes") or 0.0),
            query_elements=query,
            allocated=number(row, "meas_allocated_peak_bytes"),
            reserved=number(row, "meas_reserved_peak_bytes"),
            nvml=nvml,
        ))
    return out


def default_coefficients(probe: str, gpu_name: str | None) -> Coefficients:
    """What ``estimate`` assumes without a profile; on the CPU probe nothing runs beside the tensors."""
    if probe == "cpu-tracker":
        return Coefficients(0.0, 0.0, 0.0)
    from ..catalogue import get_gpu

    gpu = None
    if gpu_name:
        try:
            gpu = get_gpu(gpu_name)
        except ValueError:
            gpu = None
    profile = RuntimeProfile()
    workspace = profile.workspace_bytes if profile.workspace_bytes is not None else cublas_workspace_bytes(gpu)
    return Coefficients(float(workspace), profile.allocator_slack_fraction, float(profile.cuda_context_bytes))


# -- least squares -------------------------------------------------------------------------------------
def weighted_lstsq(features: list[list[float]], targets: list[float], scales: list[float]) -> list[float]:
    """Coefficients minimising sum(((target - features·c) / scale)^2)."""
    import numpy

    X = numpy.asarray(features, dtype=float)
    y = numpy.asarray(targets, dtype=float)
    w = 1.0 / numpy.asarray(scales, dtype=float)
    solution, *_ = numpy.linalg.lstsq(X * w[:, None], y * w, rcond=None)
    return [float(v) for v in solution]


def row_stranded_bytes(row: dict) -> float:
    """S of a measured row: its setup rebuilt (``scenarios.row_scenario``) and estimated by this checkout
    (``estimator.allocator_stranded_bytes``). 0 for a row this checkout cannot rebuild (an older scenario id, a model
    it no longer knows)."""
    from ..errors import VramcalcError
    from ..estimator import allocator_stranded_bytes
    from .scenarios import resolve, row_scenario

    try:
        return float(allocator_stranded_bytes(*resolve(row_scenario(row))))
    except (KeyError, ValueError, VramcalcError):
        return 0.0


def fit_coefficients(obs: list[Observation]) -> tuple[Coefficients, dict]:
    """The three equations of the module docstring; a coefficient whose metric was not measured stays None."""
    used = {}
    workspace = slack = context = None
    rows = [o for o in obs if o.allocated]
    if rows:
        workspace = max(0.0, weighted_lstsq([[1.0] for _ in rows], [o.allocated - o.est_peak_tensor for o in rows],
                                            [o.allocated for o in rows])[0])
        used["workspace_bytes"] = len(rows)
    rows = [o for o in obs if o.allocated and o.reserved]
    if rows:
        slack = max(0.0, weighted_lstsq([[o.est_peak_tensor] for o in rows],
                                        [o.reserved - o.allocated - o.est_stranded for o in rows],
                                        [o.reserved for o in rows])[0])
        used["allocator_slack_fraction"] = len(rows)
    rows = [o for o in obs if o.reserved and o.nvml]
    if rows:
        context = max(0.0, weighted_lstsq([[1.0] for _ in rows], [o.nvml - o.reserved - o.est_paged for o in rows],
                                          [o.nvml for o in rows])[0])
        used["cuda_context_bytes"] = len(rows)
    return Coefficients(workspace, slack, context), used


def predict(o: Observation, c: Coefficients) -> dict:
    """Allocated, reserved and NVML peaks predicted from the estimate's tensor peak and the coefficients."""
    allocated = o.est_peak_tensor + c.workspace_bytes
    reserved = allocated + o.est_stranded + c.allocator_slack_fraction * o.est_peak_tensor
    return {"allocated": allocated, "reserved": reserved, "nvml": reserved + c.cuda_context_bytes + o.est_paged}


# -- residuals -----------------------------------------------------------------------------------------
LEVELS = ("allocated", "reserved", "nvml")


def summarize_errors(pairs: list[tuple[float, float]]) -> dict:
    """(predicted, measured) pairs -> n, median and max |relative error|, mean relative error, RMS bytes."""
    if not pairs:
        return {"n": 0}
    relative = sorted((p - m) / m for p, m in pairs)
    absolute = sorted(abs(r) for r in relative)
    n = len(pairs)
    median = absolute[n // 2] if n % 2 else (absolute[n // 2 - 1] + absolute[n // 2]) / 2
    return {
        "n": n,
        "median_abs_rel_error": round(median, 6),
        "max_abs_rel_error": round(absolute[-1], 6),
        "mean_rel_error": round(sum(relative) / n, 6),
        "rms_error_bytes": int(math.sqrt(sum((p - m) ** 2 for p, m in pairs) / n)),
    }


def residuals(obs: list[Observation], c: Coefficients) -> dict:
    """Errors of the predictions at each level, plus the two the issue names: ``peak_tensor_bytes`` against
    ``max_memory_allocated`` and ``total_bytes`` against NVML."""
    out = {}
    for level in LEVELS:
        pairs = [(predict(o, c)[level], getattr(o, level)) for o in obs if getattr(o, level)]
        out[level] = summarize_errors(pairs)
    out["peak_tensor_vs_allocated"] = summarize_errors([(o.est_peak_tensor, o.allocated) for o in obs if o.allocated])
    out["total_vs_nvml"] = out["nvml"]
    return out


def leave_one_out(obs: list[Observation], defaults: Coefficients) -> dict:
    """Refit without each scenario, predict it; errors per level."""
    pairs = {level: [] for level in LEVELS}
    for i, held_out in enumerate(obs):
        rest = obs[:i] + obs[i + 1:]
        if not rest:
            break
        fitted, _ = fit_coefficients(rest)
        prediction = predict(held_out, fitted.filled(defaults))
        for level in LEVELS:
            if getattr(held_out, level):
                pairs[level].append((prediction[level], getattr(held_out, level)))
    return {level: summarize_errors(pairs[level]) for level in LEVELS}


# -- candidate corrections -----------------------------------------------------------------------------
def _attention_features(obs: list[Observation]) -> tuple[list[str], callable]:
    kernels = sorted({o.attn for o in obs})
    kernels = [k for k in kernels if sum(1 for o in obs if o.attn == k) >= MIN_ROWS_PER_FEATURE]

    def features(o: Observation) -> list[float]:
        return [1.0] + [o.query_elements if o.attn == k else 0.0 for k in kernels]

    return ["workspace_bytes"] + [f"attention_{k}_bytes_per_query_element" for k in kernels], features


def _tensor_scale_features(obs: list[Observation]) -> tuple[list[str], callable]:
    return ["workspace_bytes", "tensor_scale"], lambda o: [1.0, o.est_peak_tensor]


CANDIDATES = {"attention_kernel": _attention_features, "tensor_scale": _tensor_scale_features}


def _loo_allocated(obs: list[Observation], features) -> dict:
    pairs = []
    for i, held_out in enumerate(obs):
        rest = obs[:i] + obs[i + 1:]
        coefficients = weighted_lstsq([features(o) for o in rest], [o.allocated - o.est_peak_tensor for o in rest],
                                      [o.allocated for o in rest])
        predicted = held_out.est_peak_tensor + sum(a * b for a, b in zip(coefficients, features(held_out)))
        pairs.append((predicted, held_out.allocated))
    return summarize_errors(pairs)


def fit_corrections(obs: list[Observation]) -> dict:
    """Each candidate's coefficients on A - T and leave-one-out error, against the constant-workspace model."""
    rows = [o for o in obs if o.allocated]
    if len(rows) < 2 * MIN_ROWS_PER_FEATURE:
        return {}
    base = _loo_allocated(rows, lambda o: [1.0])
    out = {"baseline_loo_allocated": base}
    for name, make in CANDIDATES.items():
        names, features = make(rows)
        if len(names) < 2 or len(rows) <= len(names) + 1:
            continue
        coefficients = weighted_lstsq([features(o) for o in rows], [o.allocated - o.est_peak_tensor for o in rows],
                                      [o.allocated for o in rows])
        loo = _loo_allocated(rows, features)
        improvement = 1.0 - loo["median_abs_rel_error"] / base["median_abs_rel_error"] if base["median_abs_rel_error"] else 0.0
        out[name] = {
            "coefficients": {key: round(value, 6) for key, value in zip(names, coefficients)},
            "loo_allocated": loo,
            "improvement": round(improvement, 4),
            "suggested": improvement >= SUGGEST_IMPROVEMENT,
        }
    return out


# -- the host's time per launched kernel, from measured step times ------------------------------------------------
@dataclass(frozen=True)
class StepObservation:
    """One measured step and the model's work and rates for its setup (rates at the default host time)."""

    scenario_id: str
    measured_s: float  # step_seconds
    work: _step.StepWork
    rates: _step.StepRates
    steady: bool = True  # timed after one untimed step past empty_cache() (the row's step_timing)


def row_step_work(row: dict, profiles, gpu_name: str | None = None):
    """A measured row rebuilt as its setup (``scenarios.row_scenario``) and the work ``estimate`` times for it on
    the row's GPU (``cost.step_work_for``), once per runtime profile of ``profiles``: (scenario, resolved setup,
    [(work, rates) or None per profile]). Raises KeyError, ValueError or VramcalcError for a row it cannot
    rebuild."""
    from ..catalogue import get_gpu
    from ..cost import step_work_for
    from ..estimator import estimate
    from .scenarios import resolve, row_scenario

    scenario = row_scenario(row)
    spec, resolved = resolve(scenario)
    gpu = get_gpu(row.get("gpu") or gpu_name or "")
    paged = estimate(spec, gpu=gpu, **scenario.options).details["paged_optimizer_bytes"]
    return scenario, resolved, [step_work_for(spec, resolved, gpu, paged, profile) for profile in profiles]


def step_observations(rows: list[dict], gpu_name: str | None = None) -> tuple[list[StepObservation], list[str]]:
    """The ok rows of a CUDA probe with a measured ``step_seconds``, each given the work ``estimate`` times on the
    row's GPU under the default profile (``row_step_work``); and "id: reason" for each such row the model cannot
    time."""
    from ..errors import VramcalcError

    out, skipped = [], []
    for row in rows:
        measured = number(row, "step_seconds")
        if row.get("status") != "ok" or row.get("probe") != "cuda" or not measured or measured <= 0:
            continue
        try:
            _, _, (parts,) = row_step_work(row, [RuntimeProfile()], gpu_name)
        except (KeyError, ValueError, VramcalcError) as err:
            skipped.append(f"{row.get('scenario_id', '?')}: {err}")
            continue
        if parts is None:
            skipped.append(f"{row['scenario_id']}: the step-time model has no step for it")
            continue
        steady = row.get("step_timing") == STEADY_STEP_TIMING
        out.append(StepObservation(row["scenario_id"], measured, *parts, steady=steady))
    return out, skipped


def predicted_step_seconds(o: StepObservation, host_seconds_per_kernel: float) -> float:
    """The model's step for ``o`` with the host's time per launched kernel set to ``host_seconds_per_kernel``."""
    return _step.step_time(o.work, replace(o.rates, host_s_per_kernel=host_seconds_per_kernel)).step_s


def host_breakpoints(o: StepObservation) -> list[float]:
    """The values of h at which a kind of ``o``'s work turns host-bound: n·(h + views/kernels · h_view) = GPU time."""
    k = o.work.kernels
    gpu = _step.step_time(o.work, o.rates)  # the GPU times of the kinds do not depend on h
    view_share = _step.host_seconds_per_kernel(k, 0.0, o.rates.host_s_per_view)
    return [gpu_s / n - view_share for n, gpu_s in ((k.gemm, gpu.matmul_s), (k.attention, gpu.attention_s),
                                                    (k.other, gpu.memory_s)) if n > 0 and gpu_s / n > view_share]


def _relative_sse(obs: list[StepObservation], h: float) -> float:
    return sum(((predicted_step_seconds(o, h) - o.measured_s) / o.measured_s) ** 2 for o in obs)


def fit_host_seconds_per_kernel(obs: list[StepObservation]) -> float:
    """The h >= 0 minimising Σ ((step_i(h) - measured_i) / measured_i)^2 (module docstring). Between two
    consecutive breakpoints (``host_breakpoints``) every step_i is linear in h, so the sum is a quadratic there whose
    minimum is solved in closed form; the best of those minima and the breakpoints themselves is the answer."""
    if not obs:
        raise ValueError("no measured step time to fit the host's time per kernel to")
    points = sorted({0.0, *(b for o in obs for b in host_breakpoints(o))})
    candidates = list(points)
    for i, a in enumerate(points):
        last = i + 1 == len(points)
        b = points[i + 1] if not last else 2.0 * a + 1e-4  # past the last breakpoint every row is linear in h
        at_a = [predicted_step_seconds(o, a) for o in obs]
        slopes = [(predicted_step_seconds(o, b) - p) / (b - a) for o, p in zip(obs, at_a)]
        curvature = sum(s * s / o.measured_s ** 2 for s, o in zip(slopes, obs))
        if curvature <= 0:
            continue
        step = sum(s * (o.measured_s - p) / o.measured_s ** 2 for s, p, o in zip(slopes, at_a, obs)) / curvature
        candidates.append(max(a, a + step) if last else min(max(a, a + step), b))
    return min(candidates, key=lambda h: _relative_sse(obs, h))


def step_residuals(obs: list[StepObservation], h: float) -> dict:
    """n, median and max |relative error|, mean relative error and RMS seconds of the model's steps at ``h``."""
    pairs = [(predicted_step_seconds(o, h), o.measured_s) for o in obs]
    summary = summarize_errors(pairs)
    if pairs:
        summary.pop("rms_error_bytes")
        summary["rms_error_seconds"] = round(math.sqrt(sum((p - m) ** 2 for p, m in pairs) / len(pairs)), 6)
    return summary


def fit_host(rows: list[dict], gpu_name: str | None = None) -> HostFit | None:
    """``fit_host_seconds_per_kernel`` over the rows' measured steps, with residuals; None without any."""
    obs, skipped = step_observations(rows, gpu_name)
    if not obs:
        return None
    default = RuntimeProfile().host_seconds_per_kernel
    h = fit_host_seconds_per_kernel(obs)
    bound = sum(1 for o in obs if predicted_step_seconds(o, h * 1.001 + 1e-9) > predicted_step_seconds(o, h))
    eager = next((o for o in obs if o.work.kernels.views), None)
    with_views = _step.host_seconds_per_kernel(eager.work.kernels, h, eager.rates.host_s_per_view) if eager else h
    loo = summarize_errors([(predicted_step_seconds(o, fit_host_seconds_per_kernel(obs[:i] + obs[i + 1:])),
                             o.measured_s) for i, o in enumerate(obs)] if len(obs) > 1 else [])
    loo.pop("rms_error_bytes", None)
    return HostFit(h, default, len(obs), bound, step_residuals(obs, default), step_residuals(obs, h), with_views,
                   tuple(skipped), loo, steady=all(o.steady for o in obs))


# -- the whole fit -------------------------------------------------------------------------------------
def fit(rows: list[dict], gpu_name: str | None = None) -> FitResult:
    """Fit, residuals before (documented defaults) and after, leave-one-out, candidate corrections."""
    obs = observations(rows)
    if not obs:
        raise ValueError("no successfully measured scenario to fit (every row is oom or error)")
    probe = obs[0].probe
    defaults = default_coefficients(probe, gpu_name)
    fitted, used = fit_coefficients(obs)
    after = fitted.filled(defaults)
    warnings = []
    if fitted.workspace_bytes == 0.0:
        warnings.append("the measured allocated peak is below the estimated tensor peak on average: the estimate "
                        "over-counts tensors (see peak_tensor_vs_allocated); workspace_bytes is clamped at 0")
    return FitResult(
        coefficients=fitted,
        defaults=defaults,
        rows_used=used,
        residuals_before=residuals(obs, defaults),
        residuals_after=residuals(obs, after),
        loo=leave_one_out(obs, defaults),
        corrections=fit_corrections(obs),
        warnings=tuple(warnings),
        host=fit_host(rows, gpu_name),
    )


def profile_json(result: FitResult, rows: list[dict], *, gpu: str | None, csv_path: Path | None = None) -> dict:
    """The profile file: ``coefficients`` (RuntimeProfile fields, read by ``vramcalc.profiles``), what was fitted
    from how many scenarios, residuals before and after, leave-one-out error, corrections, provenance."""
    c = result.coefficients.filled(result.defaults)
    coefficients = {
        "cuda_context_bytes": int(round(c.cuda_context_bytes)),
        "workspace_bytes": int(round(c.workspace_bytes)),
        "nccl_bytes": RuntimeProfile().nccl_bytes,
        "allocator_slack_fraction": round(c.allocator_slack_fraction, 6),
    }
    host = result.host
    installed = host is not None and host.steady
    coefficients["host_seconds_per_kernel"] = round(host.host_seconds_per_kernel if installed else
                                                    RuntimeProfile().host_seconds_per_kernel, 9)
    fitted = {name: {"value": coefficients[name], "scenarios": n} for name, n in result.rows_used.items()}
    if host:
        fitted["host_seconds_per_kernel"] = {
            "value": round(host.host_seconds_per_kernel, 9),
            "installed": installed,
            "scenarios": host.host_bound_rows,
            "rows": host.rows,
            "rule": "least squares on relative step-time residuals over every timed row, only h free "
                    "(calibrate/fit.py, fit_host_seconds_per_kernel); scenarios: rows the host binds at the fit",
            "default": host.default_seconds,
            "seconds_per_launched_kernel_with_views": round(host.seconds_per_launched_kernel_with_views, 9),
            "residuals": {"step_seconds": {"before": host.residuals_before, "after": host.residuals_after}},
            "loo_cv": {"step_seconds": host.loo},
            "skipped": list(host.skipped),
        }
    kept = {name: "not measured here: the default stays" for name in coefficients
            if name not in fitted}
    if host and not installed:
        kept["host_seconds_per_kernel"] = (
            "fitted (see fitted) but not installed: these rows timed the first steps after empty_cache(), which "
            "re-reserve every segment through cudaMalloc, not steady steps (calibrate/probes.py measure_cuda)")
    kept["nccl_bytes"] = "one GPU: NCCL not measured, documented default"
    statuses = {}
    for row in rows:
        statuses[row.get("status", "")] = statuses.get(row.get("status", ""), 0) + 1
    return {
        "format": PROFILE_FORMAT,
        "gpu": gpu,
        "coefficients": coefficients,
        "fitted": fitted,
        "kept_default": kept,
        "residuals": {"before": result.residuals_before, "after": result.residuals_after},
        "loo_cv": result.loo,
        "corrections": result.corrections,
        "warnings": list(result.warnings),
        "scenarios": statuses,
        "provenance": provenance(rows, csv_path),
    }


def provenance(rows: list[dict], csv_path: Path | None) -> dict:
    """Where the numbers come from: device, driver, CUDA and library versions (every distinct value), dates."""
    def distinct(key):
        values = sorted({row.get(key, "") for row in rows if row.get(key, "")})
        if len(values) <= 1:
            return values[0] if values else ""
        return values

    out = {key: distinct(key) for key in (
        "device_name", "compute_capability", "driver_version", "cuda_version", "cudnn_version", "torch_version",
        "transformers_version", "peft_version", "bitsandbytes_version", "accelerate_version", "python_version",
        "vramcalc_version", "probe")}
    dates = sorted(row.get("date", "") for row in rows if row.get("date"))
    out["date_first"] = dates[0] if dates else ""
    out["date_last"] = dates[-1] if dates else ""
    contexts = sorted(float(row["cuda_context_bytes"]) for row in rows if row.get("cuda_context_bytes"))
    if contexts:
        out["cuda_context_at_init_bytes_median"] = int(contexts[len(contexts) // 2])
    if csv_path is not None and Path(csv_path).is_file():
        out["csv"] = Path(csv_path).name
        out["csv_sha256"] = hashlib.sha256(Path(csv_path).read_bytes()).hexdigest()
    return out
