"""Run scenarios one fresh worker process at a time, within a time budget, recording each as soon as it ends.

For each scenario, in budget order: skip it if ``--resume`` finds it measured (``ok`` or ``oom``; one that ended in
``error`` runs again unless ``--keep-errors``), or if its expected time no longer
fits the budget (a cheaper one later may); estimate it (this process, standard library only); start
``python -m vramcalc.calibrate.worker`` with a timeout; turn its result JSON (or its death) into a CSV row and
commit the row (``records.RecordFile.append``). This process never initialises CUDA: its context would sit on the
device beside every measurement. A kill at any moment loses at most the scenario in flight: its worker dies with
the runner (PR_SET_PDEATHSIG) and its row was never written. Progress (``vramcalc.progress``): a bar on a terminal,
a line every 10 % or 30 s otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VramcalcError
from ..progress import Progress
from .probes import DeviceInfo, cpu_device
from .records import RecordFile
from .scenarios import Scenario, expected_seconds, resolve

STDERR_TAIL_CHARS = 1500
DEFAULT_OVERHEAD_S = {"cuda": 12.0, "cpu": 6.0}  # process start, imports, CUDA context, build: refined as it runs
MIN_TIMEOUT_S = 60.0
TIMEOUT_FACTOR = 5.0  # a scenario is killed after this many times its expected time (at least MIN_TIMEOUT_S)


@dataclass(frozen=True)
class RunOptions:
    budget_s: float
    steps: int = 2
    warmup: int = 1
    memory_limit_bytes: int | None = None
    scenario_timeout_s: float = 600.0
    progress: bool | None = None
    keep_errors: bool = False  # --resume counts scenarios that ended in error as done (default: runs them again)


@dataclass
class RunSummary:
    ran: list[str] = field(default_factory=list)
    skipped_done: int = 0
    rerun_errors: int = 0  # scenarios whose recorded row ended in error, run again by --resume
    left_for_resume: list[str] = field(default_factory=list)
    statuses: dict = field(default_factory=dict)
    seconds: float = 0.0


def worker_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "vramcalc.calibrate.worker", *args]


def worker_env() -> dict:
    """The worker's environment: this one, the package importable, CUDA and NVML numbering devices alike."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d{1,4})$")


def check_device(spec) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, or a one-line VramcalcError: anything else (``tpu``, ``mps``,
    ``cuda:-1``) would otherwise end up measured on the CPU."""
    text = str(spec).strip().lower()
    if not DEVICE_PATTERN.match(text):
        raise VramcalcError(f"--device must be cpu, cuda, cuda:N or auto, got {spec!r}")
    return text


def describe_device(spec: str, timeout_s: float = 180.0) -> DeviceInfo:
    """The device, asked of a throw-away worker (CUDA is initialised there, not here). VramcalcError, one line,
    when the device does not exist (``cuda`` without a GPU, ``cuda:7`` on a machine with two)."""
    spec = check_device(spec)
    if spec == "cpu":
        return cpu_device()
    with tempfile.TemporaryDirectory(prefix="vramcalc-query-") as folder:
        result_path = Path(folder) / "device.json"
        try:
            process = subprocess.run(worker_command(["--query", spec, "--result", str(result_path)]),
                                     env=worker_env(), capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise VramcalcError(f"could not query device {spec!r}: no answer within {timeout_s:.0f} s") from None
        if not result_path.is_file():
            raise VramcalcError(f"could not query device {spec!r}: {_last_line(process.stderr)}")
        result = json.loads(result_path.read_text(encoding="utf-8"))
    if result.get("status") != "ok":
        raise VramcalcError(f"could not query device {spec!r}: {_last_line(result.get('message') or '')}")
    return DeviceInfo(**result["device"])


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def estimate_scenario(scenario: Scenario, device: DeviceInfo):
    """The analytic estimate of the scenario, with the GPU's runtime profile (or the defaults)."""
    from ..estimator import estimate

    spec, resolved = resolve(scenario)
    gpu = device.gpu if device.kind == "cuda" else None
    options = {key: value for key, value in scenario.options.items() if value not in (None, "")}
    return spec, resolved, estimate(spec, gpu=gpu, **options)


def run_one(scenario: Scenario, device: DeviceInfo, options: RunOptions, timeout_s: float, scratch: Path) -> dict:
    """Measure one scenario in a fresh worker; the worker's result, or an error result if it died or hung."""
    result_path = scratch / "result.json"
    result_path.unlink(missing_ok=True)
    args = ["--scenario", json.dumps(scenario.to_dict()), "--device", device.spec, "--result", str(result_path),
            "--steps", str(options.steps), "--warmup", str(options.warmup), "--parent-pid", str(os.getpid())]
    if options.memory_limit_bytes:
        args += ["--memory-limit-bytes", str(options.memory_limit_bytes)]
    process = subprocess.Popen(worker_command(args), env=worker_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, errors="replace")
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        return {"status": "error", "stage": "timeout", "message": f"killed after {timeout_s:.0f} s (timeout)",
                "stderr": stderr[-STDERR_TAIL_CHARS:]}
    except BaseException:  # interrupted: the scenario in flight is abandoned, never recorded
        process.kill()
        process.wait()
        raise
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            result = {"status": "error", "stage": "worker", "message": f"unreadable result: {err}"}
        if not isinstance(result, dict):
            result = {"status": "error", "stage": "worker", "message": "unreadable result: not an object"}
        result["stderr"] = stderr[-STDERR_TAIL_CHARS:]
        return result
    return {"status": "error", "stage": "worker",
            "message": _death_message(process.returncode, stderr), "stderr": stderr[-STDERR_TAIL_CHARS:]}


def _death_message(returncode: int, stderr: str) -> str:
    """Why a worker left no result: a signal (-9 is usually the host's OOM killer) or the last line it printed."""
    if returncode < 0:
        hint = " (SIGKILL: host out of memory?)" if returncode == -9 else ""
        return f"worker killed by signal {-returncode}{hint}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"worker exited with code {returncode}: {lines[-1] if lines else 'no output'}"


def run_scenarios(scenarios: list[Scenario], device: DeviceInfo, records: RecordFile, options: RunOptions,
                  *, resume: bool, errors_log: Path | None = None) -> RunSummary:
    """Measure every scenario not yet recorded, in order, while the budget lasts."""
    summary = RunSummary()
    started = time.perf_counter()
    done = records.done_ids(rerun_errors=not options.keep_errors) if resume else set()
    if resume:
        summary.rerun_errors = len(records.done_ids() - done)
    todo = [s for s in scenarios if s.id not in done]
    summary.skipped_done = len(scenarios) - len(todo)
    overhead_s = DEFAULT_OVERHEAD_S[device.kind]
    measured_work = []  # (wall seconds, expected compute seconds) of this run's scenarios
    # a bar on a terminal, a line every 10 % or 30 s otherwise (a calibration is always long: never quiet)
    bar = Progress(len(todo), f"calibrate {device.label}", "scenarios", enabled=options.progress, quiet_s=0.0)
    try:
        with tempfile.TemporaryDirectory(prefix="vramcalc-cal-") as folder:
            scratch = Path(folder)
            for scenario in todo:
                elapsed = time.perf_counter() - started
                expected = expected_seconds(scenario, device.kind, overhead_s, options.steps + options.warmup)
                if summary.ran and elapsed + expected > options.budget_s:
                    summary.left_for_resume.append(scenario.id)
                    bar.update(1, note=f"skipped (over budget): {scenario.id}")
                    continue
                spec, resolved, breakdown = estimate_scenario(scenario, device)
                timeout_s = min(options.scenario_timeout_s, max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * expected))
                bar.set_note(f"running {scenario.id}")
                scenario_started = time.perf_counter()
                result = run_one(scenario, device, options, timeout_s, scratch)
                wall_s = time.perf_counter() - scenario_started
                row = make_row_for(scenario, spec, resolved, breakdown, result, device, options, wall_s)
                records.append(row)
                _log_failure(errors_log, scenario, result)
                summary.ran.append(scenario.id)
                summary.statuses[row["status"]] = summary.statuses.get(row["status"], 0) + 1
                measured_work.append((wall_s, expected - overhead_s))
                overhead_s = _learn_overhead(measured_work, overhead_s)
                counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.statuses.items()))
                bar.update(1, note=f"{counts}; last {scenario.id}: {row['status']}")
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - started
    return summary


def make_row_for(scenario, spec, resolved, breakdown, result, device, options: RunOptions, wall_s: float) -> dict:
    from .records import make_row

    return make_row(scenario, spec, resolved, breakdown, result, device,
                    memory_limit_bytes=options.memory_limit_bytes, wall_seconds=round(wall_s, 3))


def _learn_overhead(measured_work: list[tuple[float, float]], current_s: float) -> float:
    """The per-scenario overhead this machine shows: the median of wall time minus expected compute time."""
    if not measured_work:
        return current_s
    residues = sorted(max(0.5, wall - compute) for wall, compute in measured_work)
    return residues[len(residues) // 2]


def _log_failure(path: Path | None, scenario: Scenario, result: dict) -> None:
    """Failed scenarios' tracebacks and stderr, appended to ``errors.log`` (the CSV keeps one line)."""
    if path is None or result.get("status") == "ok":
        return
    text = f"== {scenario.id}: {result.get('status')} at {result.get('stage')}: {result.get('message')}\n"
    for key in ("traceback", "stderr"):
        if result.get(key):
            text += f"-- {key}\n{str(result[key]).rstrip()}\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        raise VramcalcError(f"cannot write {path}: {err.strerror or err}") from None
