"""``python -m vramcalc.calibrate``: measure real training steps on a device and fit its runtime profile.

    python -m vramcalc.calibrate [--device cuda:0|cpu] [--budget-minutes N] [--out DIR] [--resume [--keep-errors]]
                                 [--scenarios FILE] [--fit-only] [--memory-limit-mib N]

Every flag is checked first (one ``error:`` line naming it); ``--resume`` runs again the scenarios that ended in
``error`` unless ``--keep-errors``; a damaged measurements.csv is refused, never rewritten (``records.RecordFile``).

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
import importlib.util
import json
import math
import signal
import sys
from pathlib import Path

from ..errors import VramcalcError

CSV_NAME = "measurements.csv"
SCENARIOS_NAME = "scenarios.json"
REPORT_NAME = "report.txt"
PLOT_NAME = "measured_vs_estimated.png"
ERRORS_NAME = "errors.log"
EXTRA_HINT = "pip install 'vramcalc[calibrate]'"
MEASURE_NEEDS = ("torch", "transformers", "peft", "accelerate")  # imported by the workers (training.py, probes.py)
FIT_NEEDS = ("numpy",)  # the least squares of fit.py
MAX_STEPS = 1000
MAX_WARMUP = 100
MAX_MEMORY_LIMIT_MIB = 2**30  # 1 PiB: far above any device; a bound so that the byte count stays exact


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise VramcalcError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m vramcalc.calibrate",
                     description="Measure fine-tuning steps on a GPU (or the CPU tracker) and fit the runtime "
                                 "coefficients of vramcalc's estimate. GiB = 2^30 bytes.")
    add = parser.add_argument
    add("--device", default="auto", help="cuda:N, cpu, or auto (cuda:0 when torch sees a GPU; default)")
    add("--budget-minutes", type=float, default=10.0, help="time for the measurements, > 0 (default 10)")
    add("--out", help="output folder (default calibration/runs/<gpu>)")
    add("--resume", action="store_true", help="continue a run: skip scenarios already measured (ok or oom) in "
                                               "the CSV; those that ended in error run again")
    add("--keep-errors", action="store_true", help="with --resume, also skip scenarios that ended in error")
    add("--scenarios", help="a scenario file (CSV or JSON, see calibration/README.md) instead of the default grid")
    add("--fit-only", action="store_true", help="measure nothing: fit and report the CSV under --out")
    add("--memory-limit-mib", type=float, help="impose a memory limit per scenario (CUDA: the allocator's "
                                               "per-process fraction; CPU: the tracker's live bytes)")
    add("--steps", type=int, default=2, help=f"measured steps per scenario, after warm-up (2 to {MAX_STEPS}; "
                                             "default 2)")
    add("--warmup", type=int, default=1, help=f"warm-up steps before the peaks are reset (CUDA; 0 to {MAX_WARMUP}, "
                                              "default 1)")
    add("--scenario-timeout", type=float, default=600.0, help="seconds before a scenario's worker is killed, > 0 "
                                                              "(default 600)")
    add("--no-install-profile", action="store_true", help="do not copy the profile to calibration/profiles/")
    add("--no-plot", action="store_true", help="skip the PNG")
    add("--progress", dest="progress", action="store_const", const=True,
        help="show progress (the default): a bar on a terminal, a line every 10%% or 30 s otherwise")
    add("--no-progress", dest="progress", action="store_const", const=False, help="show no progress")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        WARN.seen.clear()
        args = build_parser().parse_args(argv)
        check_args(args)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fit_only(args) if args.fit_only else measure(args)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except VramcalcError as err:
        print(f"error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:  # a file or folder the system refuses (full disk, permissions): one line, no traceback
        where = f" {err.filename}" if getattr(err, "filename", None) else ""
        print(f"error: cannot use{where}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the scenario in flight was not recorded; rerun with --resume to continue",
              file=sys.stderr)
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _one_line(text: str) -> str:
    return " | ".join(part.strip() for part in text.splitlines() if part.strip()) or "failed"


def _finite_positive(value: float | None, flag: str, what: str = "a positive number") -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise VramcalcError(f"{flag} must be {what}, got {value!r}")


def check_args(args) -> None:
    """Every flag checked before anything runs or is written: one VramcalcError line naming the flag."""
    from .runner import check_device

    args.device = check_device(args.device)
    _finite_positive(args.budget_minutes, "--budget-minutes", "a positive number of minutes")
    _finite_positive(args.scenario_timeout, "--scenario-timeout", "a positive number of seconds")
    if args.memory_limit_mib is not None:
        _finite_positive(args.memory_limit_mib, "--memory-limit-mib", "a positive number of MiB")
        if not 1 <= args.memory_limit_mib <= MAX_MEMORY_LIMIT_MIB:
            raise VramcalcError(f"--memory-limit-mib must be between 1 and {MAX_MEMORY_LIMIT_MIB}, "
                                f"got {args.memory_limit_mib!r}")
    if not 2 <= args.steps <= MAX_STEPS:
        raise VramcalcError(f"--steps must be between 2 and {MAX_STEPS} (optimizer state appears in the first "
                            f"step), got {args.steps}")
    if not 0 <= args.warmup <= MAX_WARMUP:
        raise VramcalcError(f"--warmup must be between 0 and {MAX_WARMUP}, got {args.warmup}")
    if args.keep_errors and not args.resume:
        raise VramcalcError("--keep-errors only applies with --resume")
    if args.fit_only and args.resume:
        raise VramcalcError("--fit-only measures nothing: it cannot be combined with --resume")
    if args.out is not None and not str(args.out).strip():
        raise VramcalcError("--out must name a folder, got ''")


def require(modules: tuple[str, ...], purpose: str) -> None:
    """A one-line VramcalcError naming the extra when a module the work needs is missing (checked without
    importing it: this process never imports torch)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken parent
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise VramcalcError(f"{purpose} needs {', '.join(missing)} (not installed): {EXTRA_HINT}")


class _Warnings:
    """Prints each repaired or ignored CSV line once, as a ``warning:`` line."""

    def __init__(self):
        self.seen = set()

    def __call__(self, records) -> None:
        for problem in records.problems:
            if problem not in self.seen:
                self.seen.add(problem)
                print(f"warning: {problem}", file=sys.stderr)


WARN = _Warnings()


def measure(args) -> int:
    from .records import RecordFile, launched_rank
    from .runner import RunOptions, describe_device, run_scenarios
    from .scenarios import default_grid, load_scenarios, save_scenarios

    from ..files import make_folder

    require(MEASURE_NEEDS, "measuring")
    rank = launched_rank()
    device = describe_device(args.device)
    if rank.launched and args.device == "auto" and device.kind == "cuda" and rank.local_rank:
        device = describe_device(f"cuda:{rank.local_rank}")  # each rank measures its own GPU
    out = Path(args.out or Path("calibration") / "runs" / device.label)
    if rank.launched:
        out = out / f"rank{rank.rank}"  # one file per rank: ranks never append to one CSV
    if out.exists() and not out.is_dir():
        raise VramcalcError(f"--out {out} is a file: give a folder")
    csv_path = out / CSV_NAME
    if csv_path.exists() and not args.resume:
        raise VramcalcError(f"{csv_path} exists: pass --resume to continue that run, or choose another --out")
    if args.resume and csv_path.exists():
        RecordFile(csv_path).check()  # a damaged CSV is refused before anything is written (open() reports)
    if args.scenarios:
        scenarios = load_scenarios(args.scenarios)
    elif args.resume and (out / SCENARIOS_NAME).is_file():
        scenarios = load_scenarios(out / SCENARIOS_NAME)
    else:
        scenarios = default_grid(device.kind, device.free_bytes, device.gpu)
    make_folder(out)
    save_scenarios(out / SCENARIOS_NAME, scenarios)
    records = RecordFile(csv_path).open()
    WARN(records)
    limit = int(args.memory_limit_mib * 2**20) if args.memory_limit_mib else None
    options = RunOptions(budget_s=args.budget_minutes * 60, steps=args.steps, warmup=args.warmup,
                         memory_limit_bytes=limit, scenario_timeout_s=args.scenario_timeout, progress=args.progress,
                         keep_errors=args.keep_errors)
    print(f"calibrating {device.name} ({device.spec}, {device.free_bytes / 2**30:.1f} GiB free): "
          f"{len(scenarios)} scenarios, budget {args.budget_minutes:g} min, out {out}", file=sys.stderr)
    summary = run_scenarios(scenarios, device, records, options, resume=args.resume, errors_log=out / ERRORS_NAME)
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(summary.statuses.items())) or "none"
    print(f"measured {len(summary.ran)} scenarios in {summary.seconds:.0f} s ({statuses}); "
          f"{summary.skipped_done} already recorded; {summary.rerun_errors} failed before and run again; "
          f"{len(summary.left_for_resume)} left for --resume", file=sys.stderr)
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
    records = RecordFile(out / CSV_NAME)
    rows = records.rows()
    WARN(records)
    gpus = sorted({row.get("gpu", "") for row in rows if row.get("gpu")})
    gpu = gpus[0] if len(gpus) == 1 else None
    label = gpu or ("cpu" if all(row.get("probe") == "cpu-tracker" for row in rows) else out.name)
    return finish(out, label, gpu, install=not args.no_install_profile and gpu is not None, plot=not args.no_plot)


def finish(out: Path, label: str, gpu: str | None, *, install: bool, plot: bool) -> int:
    """Fit, write the profile (and install it), print and save the report, draw the plot."""
    from .fit import fit, profile_json
    from .records import RecordFile
    from .report import PlotUnavailable, full_report
    from .report import plot as draw

    from ..files import make_folder, write_atomic

    csv_path = out / CSV_NAME
    records = RecordFile(csv_path)
    rows = records.rows()
    WARN(records)
    result = None
    if any(row.get("status") == "ok" for row in rows):
        require(FIT_NEEDS, "the fit")
        try:
            result = fit(rows, gpu)
        except (ValueError, ArithmeticError) as err:  # rows that hold no usable measurement (e.g. edited by hand)
            raise VramcalcError(f"cannot fit {csv_path}: {err}") from None
        profile = profile_json(result, rows, gpu=gpu, csv_path=csv_path)
        text = json.dumps(profile, indent=2) + "\n"
        write_atomic(out / f"profile-{label}.json", text)
        if install and gpu:
            from ..profiles import profile_data, profiles_dir

            target = profiles_dir() / f"{gpu}.json"
            try:
                make_folder(target.parent)
                write_atomic(target, text)
            except VramcalcError as err:  # the profile is written under --out all the same
                print(f"warning: profile not installed: {err}; copy {out / f'profile-{label}.json'} there",
                      file=sys.stderr)
            else:
                profile_data.cache_clear()
                print(f"installed {target}", file=sys.stderr)
    report = full_report(rows, result)
    write_atomic(out / REPORT_NAME, report + "\n")
    print(report)
    if plot and result is not None:
        try:
            draw(rows, result, out / PLOT_NAME, f"vramcalc calibration: {label}")
        except PlotUnavailable as err:  # an optional extra: the fit and the report above are already written
            print(f"warning: {err}; {PLOT_NAME} skipped (the profile and {REPORT_NAME} are written)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
