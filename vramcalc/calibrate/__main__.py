"""``python -m vramcalc.calibrate``: measure real training steps on a device and fit its runtime profile.

    python -m vramcalc.calibrate [--device cuda:0|cpu] [--budget-minutes N] [--out DIR] [--resume]
                                 [--scenarios FILE] [--fit-only] [--memory-limit-mib N]

Under ``torchrun`` or ``accelerate launch`` every rank calibrates its own GPU (``--device auto`` is
``cuda:LOCAL_RANK``) into ``<out>/rank<RANK>/``, whose rows carry ``rank`` and ``world_size``: one row per scenario per
rank; rank 0 alone installs the profile. Writes, under ``--out`` (default ``calibration/runs/<gpu>``): ``measurements.csv`` (one row per scenario),
``scenarios.json`` (the grid, in run order), ``profile-<gpu>.json``, ``report.txt``, ``measured_vs_estimated.png``
and ``errors.log``. On a catalogue GPU the profile is also installed as ``calibration/profiles/<gpu>.json``, which
``estimate(gpu=...)`` then uses. Exit codes: 0 done (failed scenarios are data, not failures); 2 bad input;
130 interrupted (rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from ..errors import VramcalcError

CSV_NAME = "measurements.csv"
SCENARIOS_NAME = "scenarios.json"
REPORT_NAME = "report.txt"
PLOT_NAME = "measured_vs_estimated.png"
ERRORS_NAME = "errors.log"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise VramcalcError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m vramcalc.calibrate",
                     description="Measure fine-tuning steps on a GPU (or the CPU tracker) and fit the runtime "
                                 "coefficients of vramcalc's estimate. GiB = 2^30 bytes.")
    add = parser.add_argument
    add("--device", default="auto", help="cuda:N, cpu, or auto (cuda:0 when torch sees a GPU; default)")
    add("--budget-minutes", type=float, default=10.0, help="time for the measurements (default 10)")
    add("--out", help="output folder (default calibration/runs/<gpu>)")
    add("--resume", action="store_true", help="continue a run: skip scenarios already in the CSV")
    add("--scenarios", help="a scenario file (CSV or JSON, see calibration/README.md) instead of the default grid")
    add("--fit-only", action="store_true", help="measure nothing: fit and report the CSV under --out")
    add("--memory-limit-mib", type=float, help="impose a memory limit per scenario (CUDA: the allocator's "
                                               "per-process fraction; CPU: the tracker's live bytes)")
    add("--steps", type=int, default=2, help="measured steps per scenario, after warm-up (at least 2)")
    add("--warmup", type=int, default=1, help="warm-up steps before the peaks are reset (CUDA)")
    add("--scenario-timeout", type=float, default=600.0, help="seconds before a scenario's worker is killed")
    add("--no-install-profile", action="store_true", help="do not copy the profile to calibration/profiles/")
    add("--no-plot", action="store_true", help="skip the PNG")
    add("--progress", dest="progress", action="store_const", const=True, help="progress bar even when not a TTY")
    add("--no-progress", dest="progress", action="store_const", const=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.steps < 2:
            raise VramcalcError(f"--steps must be at least 2 (optimizer state appears in the first), got {args.steps}")
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fit_only(args) if args.fit_only else measure(args)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except VramcalcError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the scenario in flight was not recorded; rerun with --resume to continue",
              file=sys.stderr)
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def measure(args) -> int:
    from .records import RecordFile, launched_rank
    from .runner import RunOptions, describe_device, run_scenarios
    from .scenarios import default_grid, load_scenarios, save_scenarios

    rank = launched_rank()
    try:
        device = describe_device(args.device)
        if rank.launched and args.device == "auto" and device.kind == "cuda" and rank.local_rank:
            device = describe_device(f"cuda:{rank.local_rank}")  # each rank measures its own GPU
    except (RuntimeError, ValueError) as err:
        raise VramcalcError(str(err)) from None
    out = Path(args.out or Path("calibration") / "runs" / device.label)
    if rank.launched:
        out = out / f"rank{rank.rank}"  # one file per rank: ranks never append to one CSV
    csv_path = out / CSV_NAME
    if csv_path.exists() and not args.resume:
        raise VramcalcError(f"{csv_path} exists: pass --resume to continue that run, or choose another --out")
    if args.scenarios:
        scenarios = load_scenarios(args.scenarios)
    elif args.resume and (out / SCENARIOS_NAME).is_file():
        scenarios = load_scenarios(out / SCENARIOS_NAME)
    else:
        scenarios = default_grid(device.kind, device.free_bytes, device.gpu)
    out.mkdir(parents=True, exist_ok=True)
    save_scenarios(out / SCENARIOS_NAME, scenarios)
    records = RecordFile(csv_path).open()
    limit = int(args.memory_limit_mib * 2**20) if args.memory_limit_mib else None
    options = RunOptions(budget_s=args.budget_minutes * 60, steps=args.steps, warmup=args.warmup,
                         memory_limit_bytes=limit, scenario_timeout_s=args.scenario_timeout, progress=args.progress)
    print(f"calibrating {device.name} ({device.spec}, {device.free_bytes / 2**30:.1f} GiB free): "
          f"{len(scenarios)} scenarios, budget {args.budget_minutes:g} min, out {out}", file=sys.stderr)
    summary = run_scenarios(scenarios, device, records, options, resume=args.resume, errors_log=out / ERRORS_NAME)
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(summary.statuses.items())) or "none"
    print(f"measured {len(summary.ran)} scenarios in {summary.seconds:.0f} s ({statuses}); "
          f"{summary.skipped_done} already recorded; {len(summary.left_for_resume)} left for --resume",
          file=sys.stderr)
    return finish(out, device.label, device.gpu if device.kind == "cuda" else None,
                  install=not args.no_install_profile and device.kind == "cuda" and rank.rank == 0,
                  plot=not args.no_plot)


def fit_only(args) -> int:
    from .records import RecordFile

    if not args.out:
        raise VramcalcError("--fit-only needs --out, the folder holding measurements.csv")
    out = Path(args.out)
    if not (out / CSV_NAME).is_file():
        raise VramcalcError(f"no {CSV_NAME} in {out}")
    rows = RecordFile(out / CSV_NAME).rows()
    gpus = sorted({row.get("gpu", "") for row in rows if row.get("gpu")})
    gpu = gpus[0] if len(gpus) == 1 else None
    label = gpu or ("cpu" if all(row.get("probe") == "cpu-tracker" for row in rows) else out.name)
    return finish(out, label, gpu, install=not args.no_install_profile and gpu is not None, plot=not args.no_plot)


def finish(out: Path, label: str, gpu: str | None, *, install: bool, plot: bool) -> int:
    """Fit, write the profile (and install it), print and save the report, draw the plot."""
    from .fit import fit, profile_json
    from .records import RecordFile
    from .report import full_report
    from .report import plot as draw

    csv_path = out / CSV_NAME
    rows = RecordFile(csv_path).rows()
    result = None
    if any(row.get("status") == "ok" for row in rows):
        result = fit(rows, gpu)
        profile = profile_json(result, rows, gpu=gpu, csv_path=csv_path)
        text = json.dumps(profile, indent=2) + "\n"
        (out / f"profile-{label}.json").write_text(text, encoding="utf-8")
        if install and gpu:
            from ..profiles import profile_data, profiles_dir

            target = profiles_dir() / f"{gpu}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            profile_data.cache_clear()
            print(f"installed {target}", file=sys.stderr)
    report = full_report(rows, result)
    (out / REPORT_NAME).write_text(report + "\n", encoding="utf-8")
    print(report)
    if plot and result is not None:
        draw(rows, result, out / PLOT_NAME, f"vramcalc calibration: {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
