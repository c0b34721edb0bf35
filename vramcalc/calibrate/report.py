"""The run's report: a summary table per scenario, the fit's residuals, and a PNG of measured against estimated.

Units: MiB (2^20 bytes) or GiB (2^30 bytes), whichever the largest figure of the run calls for, named in the
header; ratios are measured / estimated.
"""

from __future__ import annotations

import io
from pathlib import Path

from ..files import write_atomic
from ..units import BYTES_PER_GIB
from .fit import LEVELS, FitResult, observations, predict
from .records import number

BYTES_PER_MIB = 2**20
ID_WIDTH = 58
AXES = ("method", "precision", "optimizer", "grad_ckpt", "attn", "model")


def _unit(rows: list[dict]) -> tuple[str, int]:
    largest = max((number(row, key) or 0 for row in rows for key in ("est_total_bytes", "nvml_peak_bytes")), default=0)
    return ("GiB", BYTES_PER_GIB) if largest >= 10 * BYTES_PER_GIB else ("MiB", BYTES_PER_MIB)


def _fmt(value: float | None, scale: int, width: int = 9, digits: int = 2) -> str:
    return f"{value / scale:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def _ratio(value: float | None, width: int = 6) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def summary_table(rows: list[dict]) -> str:
    """One line per scenario: status, estimated tensor peak and measured allocated peak (the tracker's on the CPU),
    and on a GPU the estimated total and NVML's peak, each pair's ratio, and the step time."""
    unit, scale = _unit(rows)
    device = any(number(row, "nvml_peak_bytes") is not None for row in rows)
    header = f"{'scenario':<{ID_WIDTH}} {'status':<6} {'est.tensor':>10} {'allocated':>9} {'ratio':>6} "
    if device:
        header += f"{'est.total':>9} {'nvml':>9} {'ratio':>6} "
    header += f"{'step s':>7}"
    lines = [f"Measured against estimated ({unit} = 2^{30 if unit == 'GiB' else 20} bytes; ratio = measured / "
             "estimated" + ("" if device else "; allocated = the CPU tracker's peak") + ")", header, "-" * len(header)]
    for row in rows:
        scenario = row["scenario_id"]
        if len(scenario) > ID_WIDTH:
            scenario = "…" + scenario[-(ID_WIDTH - 1):]
        line = (f"{scenario:<{ID_WIDTH}} {row['status']:<6} {_fmt(number(row, 'est_peak_tensor_bytes'), scale, 10)} "
                f"{_fmt(number(row, 'meas_allocated_peak_bytes'), scale)} "
                f"{_ratio(number(row, 'ratio_allocated_to_est_peak_tensor'))} ")
        if device:
            line += (f"{_fmt(number(row, 'est_total_bytes'), scale)} {_fmt(number(row, 'nvml_peak_bytes'), scale)} "
                     f"{_ratio(number(row, 'ratio_nvml_to_est_total'))} ")
        lines.append(line + _fmt(number(row, "step_seconds"), 1, 7, 3))
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines.append(f"{len(rows)} scenarios: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return "\n".join(lines)


def fit_table(result: FitResult) -> str:
    """Coefficients (default -> fitted), residuals before/after and leave-one-out, per level."""
    lines = ["Coefficients (default -> fitted; '-' not measured here: the default stays)"]
    names = ("workspace_bytes", "allocator_slack_fraction", "cuda_context_bytes")
    for name, default, value in zip(names, result.defaults.values(), result.coefficients.values()):
        if name.endswith("_fraction"):
            shown = f"{default:.4f} -> {value:.4f}" if value is not None else f"{default:.4f} -> -"
        else:
            shown = (f"{default / BYTES_PER_MIB:.1f} MiB -> {value / BYTES_PER_MIB:.1f} MiB" if value is not None
                     else f"{default / BYTES_PER_MIB:.1f} MiB -> -")
        used = result.rows_used.get(name)
        lines.append(f"  {name:<26} {shown}" + (f"   ({used} scenarios)" if used else ""))
    host = result.host
    if host is not None:
        lines.append(f"  {'host_seconds_per_kernel':<26} {host.default_seconds * 1e6:.1f} us -> "
                     f"{host.host_seconds_per_kernel * 1e6:.1f} us   ({host.host_bound_rows} host-bound of "
                     f"{host.rows} timed steps; {host.seconds_per_launched_kernel_with_views * 1e6:.1f} us with views)"
                     + ("" if host.steady else "; not installed: not steadily timed (step_timing)"))
    lines.append("Relative error of the prediction, median |e| / max |e| (n): before fit | after fit | leave-one-out")
    for level, label in (("peak_tensor_vs_allocated", "est peak_tensor vs max_memory_allocated"),
                         ("allocated", "predicted vs max_memory_allocated"),
                         ("reserved", "predicted vs max_memory_reserved"),
                         ("nvml", "est total_bytes vs NVML")):
        before = result.residuals_before.get(level, {})
        after = result.residuals_after.get(level, {})
        loo = result.loo.get(level, {}) if level in LEVELS else {}
        if not before.get("n"):
            lines.append(f"  {label:<42} not measured")
            continue
        lines.append(f"  {label:<42} {_err(before)} | {_err(after)} | {_err(loo) if loo.get('n') else '-'}")
    if host is not None:
        lines.append(f"  {'step-time model vs step_seconds':<42} {_err(host.residuals_before)} | "
                     f"{_err(host.residuals_after)} | {_err(host.loo) if host.loo.get('n') else '-'}")
    for name, candidate in result.corrections.items():
        if name == "baseline_loo_allocated":
            continue
        verdict = "SUGGESTED" if candidate["suggested"] else "not needed"
        coefficients = ", ".join(f"{k}={v:.4g}" for k, v in candidate["coefficients"].items())
        base = result.corrections["baseline_loo_allocated"]["median_abs_rel_error"]
        lines.append(f"  candidate correction {name}: leave-one-out median |e| of allocated "
                     f"{candidate['loo_allocated']['median_abs_rel_error']:.2%} against {base:.2%} without: "
                     f"{verdict} ({coefficients})")
    lines += [f"  warning: {text}" for text in result.warnings]
    return "\n".join(lines)


def _err(summary: dict) -> str:
    return f"{summary['median_abs_rel_error']:.2%} / {summary['max_abs_rel_error']:.2%} ({summary['n']})"


def residuals_by_axis(rows: list[dict], result: FitResult) -> str:
    """Mean relative error of the fitted allocated prediction per value of each axis: where a per-axis
    correction would help (what the residuals show)."""
    obs = observations(rows)
    after = result.coefficients.filled(result.defaults)
    lines = ["Mean relative error of predicted max_memory_allocated after the fit, by axis (+: over-estimate)"]
    for axis in AXES:
        groups: dict[str, list[float]] = {}
        for o in obs:
            if o.allocated:
                error = (predict(o, after)["allocated"] - o.allocated) / o.allocated
                groups.setdefault(str(o.axes.get(axis, "")), []).append(error)
        cells = ", ".join(f"{value} {sum(v) / len(v):+.1%} ({len(v)})" for value, v in sorted(groups.items()))
        lines.append(f"  {axis:<10} {cells}")
    return "\n".join(lines)


def failures_table(rows: list[dict]) -> str:
    """OOM and error scenarios, with whether the estimate said the step fits the memory it had."""
    failed = [row for row in rows if row["status"] != "ok"]
    if not failed:
        return "No scenario failed."
    lines = ["Failed scenarios (estimate: would the estimated total fit the memory limit or the device?)"]
    for row in failed:
        limit = number(row, "memory_limit_bytes") or number(row, "device_total_bytes")
        total = number(row, "est_total_bytes") if row.get("probe") != "cpu-tracker" else number(row, "est_peak_tensor_bytes")
        verdict = ""
        if limit and total:
            verdict = "estimate said fits" if total <= limit else "estimate said does not fit"
        lines.append(f"  {row['scenario_id']}: {row['status']} at {row.get('stage', '')} ({verdict}): "
                     f"{row.get('message', '')[:160]}")
    return "\n".join(lines)


def full_report(rows: list[dict], result: FitResult | None) -> str:
    parts = [summary_table(rows)]
    if result is not None:
        parts += [fit_table(result), residuals_by_axis(rows, result)]
    parts.append(failures_table(rows))
    return "\n\n".join(parts)


class PlotUnavailable(ImportError):
    """matplotlib (the ``calibrate`` extra) is not installed: the plot cannot be drawn, the fit and report can."""


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or ``PlotUnavailable`` naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PlotUnavailable(f"the plot needs {err.name or 'matplotlib'}, which is not installed: "
                              "pip install 'vramcalc[calibrate]'") from None
    return plt


def plot(rows: list[dict], result: FitResult | None, path: Path, title: str) -> Path:
    """measured_vs_estimated.png: max_memory_allocated against the estimated tensor peak, and NVML against the
    estimated total before and after the fit (log-log, y = x dashed). matplotlib is imported here only; without it,
    ``PlotUnavailable``."""
    plt = _pyplot()

    obs = observations(rows)
    unit, scale = _unit(rows)
    has_nvml = any(o.nvml for o in obs)
    figure, axes = plt.subplots(1, 2 if has_nvml else 1, figsize=(12 if has_nvml else 6.5, 5.5), squeeze=False)
    colours = {"full": "tab:blue", "lora": "tab:orange", "qlora": "tab:green", "prompt": "tab:red"}
    markers = {"sdpa": "o", "eager": "s", "flash": "^"}
    left = axes[0][0]
    for o in obs:
        left.scatter(o.est_peak_tensor / scale, o.allocated / scale, c=colours.get(o.axes["method"], "grey"),
                     marker=markers.get(o.axes["attn"], "o"), s=28, alpha=0.85)
    _diagonal(left, [o.est_peak_tensor / scale for o in obs] + [o.allocated / scale for o in obs])
    left.set_xlabel(f"estimated peak_tensor_bytes ({unit})")
    on_cpu = all(o.probe == "cpu-tracker" for o in obs)
    left.set_ylabel(f"CPU tracker peak ({unit})" if on_cpu else f"measured max_memory_allocated ({unit})")
    left.set_title("tensor peak")
    if has_nvml and result is not None:
        right = axes[0][1]
        after = result.coefficients.filled(result.defaults)
        pairs_before = [(predict(o, result.defaults)["nvml"] / scale, o.nvml / scale) for o in obs if o.nvml]
        pairs_after = [(predict(o, after)["nvml"] / scale, o.nvml / scale) for o in obs if o.nvml]
        right.scatter(*zip(*pairs_before), facecolors="none", edgecolors="tab:grey", s=28, label="default profile")
        right.scatter(*zip(*pairs_after), c="tab:purple", s=22, label="fitted profile")
        _diagonal(right, [v for pair in pairs_before + pairs_after for v in pair])
        right.set_xlabel(f"estimated total_bytes ({unit})")
        right.set_ylabel(f"NVML process memory ({unit})")
        right.set_title("device total")
        right.legend(loc="upper left")
    for method in sorted({o.axes["method"] for o in obs}):
        left.scatter([], [], c=colours.get(method, "grey"), label=method)
    for attn in sorted({o.axes["attn"] for o in obs}):
        left.scatter([], [], c="black", marker=markers.get(attn, "o"), label=attn)
    left.legend(loc="upper left", fontsize=8)
    figure.suptitle(f"{title} ({unit} = 2^{30 if unit == 'GiB' else 20} bytes)")
    figure.tight_layout()
    path = Path(path)
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(figure)
    return write_atomic(path, buffer.getvalue())  # the old plot or the new one, never half of one


def _diagonal(axis, values: list[float]) -> None:
    positive = [v for v in values if v and v > 0]
    if not positive:
        return
    low, high = min(positive) * 0.8, max(positive) * 1.25
    axis.plot([low, high], [low, high], "k--", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_yscale("log")
