"""Issue 10, calibrate: every bad flag is one ``error:`` line (exit 2) before anything is written; a damaged
measurements.csv is refused naming the line and why, never rewritten; repaired or ignored lines are reported one
line each; output paths that cannot be written (a file, a read-only folder, a full disk) are one line and leave no
temporary file; a plain install names the extra. Each case runs on real files; "unchanged" compares the bytes."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vramcalc.calibrate.__main__ import main
from vramcalc.calibrate.records import COLUMNS, DamagedRecords, RecordFile, encode_row

from .conftest import needs_torch
from .test_calibrate import MIB, _row, _synthetic_rows

REPO = Path(__file__).resolve().parents[1]
ONE_SCENARIO = "model,method,precision,optimizer,batch_size,seq_len\ntiny-llama,full,bf16,adamw,1,32\n"


def _run(*args: str, env_path: list[Path] = (), limit_file_bytes: int | None = None,
         timeout: float = 300, progress: str = "--no-progress") -> subprocess.CompletedProcess:
    """``python -m vramcalc.calibrate`` in a child; ``limit_file_bytes`` makes every write past that size fail as
    a full disk does (RLIMIT_FSIZE: the write returns EFBIG; SIGXFSZ ignored)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, env_path), str(REPO)]), HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")

    def limit():
        if limit_file_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    flags = [progress] if progress else []
    return subprocess.run([sys.executable, "-m", "vramcalc.calibrate", *flags, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _snapshot(folder: Path) -> dict:
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# -- flags -------------------------------------------------------------------------------------------------
BAD_FLAGS = [
    (["--scenario-timeout", "0"], "--scenario-timeout"),
    (["--scenario-timeout", "nan"], "--scenario-timeout"),
    (["--scenario-timeout", "-3"], "--scenario-timeout"),
    (["--scenario-timeout", "inf"], "--scenario-timeout"),
    (["--budget-minutes", "0"], "--budget-minutes"),
    (["--budget-minutes", "-1"], "--budget-minutes"),
    (["--budget-minutes", "nan"], "--budget-minutes"),
    (["--budget-minutes", "inf"], "--budget-minutes"),
    (["--budget-minutes", "ten"], "--budget-minutes"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:-1"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--device", ""], "--device"),
    (["--warmup", "-1"], "--warmup"),
    (["--warmup", "1e9"], "--warmup"),
    (["--warmup", "100000"], "--warmup"),
    (["--steps", "1"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--steps", "10000000"], "--steps"),
    (["--memory-limit-mib", "-5"], "--memory-limit-mib"),
    (["--memory-limit-mib", "0"], "--memory-limit-mib"),
    (["--memory-limit-mib", "nan"], "--memory-limit-mib"),
    (["--memory-limit-mib", "1e-9"], "--memory-limit-mib"),
    (["--memory-limit-mib", "1e300"], "--memory-limit-mib"),
    (["--keep-errors"], "--keep-errors"),
    (["--out", ""], "--out"),
]


@pytest.mark.parametrize("args,flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_every_bad_flag_is_one_error_line_naming_it_and_nothing_is_written(args, flag, tmp_path, capsys):
    out = tmp_path / "run"
    extra = [] if "--out" in args else ["--out", str(out)]
    assert main(["--device", "cpu", *extra, *args] if "--device" not in args else [*extra, *args]) == 2
    captured = capsys.readouterr()
    assert flag in _one_error_line(captured.err)
    assert captured.out == ""
    assert not out.exists()


def test_cuda_without_a_gpu_is_one_error_line():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = _run("--device", "cuda", "--out", "/nonexistent/never-created")
    assert done.returncode == 2
    assert "cuda" in _one_error_line(done.stderr) and not Path("/nonexistent/never-created").exists()


# -- a damaged measurements.csv ----------------------------------------------------------------------------
def _recorded_run(folder: Path, n: int = 7) -> Path:
    """A run folder whose CSV holds ``n`` ok rows (synthetic H200 measurements), as the harness writes them."""
    records = RecordFile(folder / "measurements.csv").open()
    for row in _synthetic_rows(64 * MIB, 0.07, 520 * MIB, noise=0.0002, n=n):
        records.append({**row, "gpu": "h200", "est_total_bytes": row["est_peak_tensor_bytes"]})
    return records.path


def _without_header(csv_path: Path) -> bytes:
    data = csv_path.read_bytes()
    csv_path.write_bytes(data[data.index(b"\n") + 1:])
    return csv_path.read_bytes()


def test_a_csv_whose_header_was_lost_is_refused_by_resume_naming_line_1_and_left_byte_for_byte(tmp_path):
    out = tmp_path / "run"
    damaged = _without_header(_recorded_run(out))
    (tmp_path / "s.csv").write_text(ONE_SCENARIO)
    before = _snapshot(out)
    done = _run("--device", "cpu", "--scenarios", str(tmp_path / "s.csv"), "--out", str(out), "--resume")
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "line 1" in line and "header" in line and "measurements.csv" in line
    assert (out / "measurements.csv").read_bytes() == damaged and _snapshot(out) == before


def test_a_csv_whose_header_was_lost_is_refused_by_fit_only(tmp_path):
    out = tmp_path / "run"
    damaged = _without_header(_recorded_run(out))
    done = _run("--fit-only", "--out", str(out), "--no-install-profile", "--no-plot")
    assert done.returncode == 2 and "line 1" in _one_error_line(done.stderr)
    assert (out / "measurements.csv").read_bytes() == damaged
    assert sorted(p.name for p in out.iterdir()) == ["measurements.csv"]


@pytest.mark.parametrize("first_line", [b"", b"model,params\n", b"\x00\x00\x00\n", b"scenario_id,status\n"])
def test_a_csv_that_is_not_a_measurements_file_is_refused_by_open_and_left_unchanged(tmp_path, first_line):
    path = tmp_path / "measurements.csv"
    data = first_line + encode_row(_row("a"))
    path.write_bytes(data)
    with pytest.raises(DamagedRecords, match="line 1"):
        RecordFile(path).open()
    assert path.read_bytes() == data


def test_a_torn_last_line_is_reported_and_ignored_by_fit_only_and_removed_by_open(tmp_path):
    out = tmp_path / "run"
    csv_path = _recorded_run(out, n=12)
    with open(csv_path, "ab") as f:
        f.write(encode_row(_row("torn"))[:50])  # the crash landed mid-write
    torn = csv_path.read_bytes()
    done = _run("--fit-only", "--out", str(out), "--no-install-profile", "--no-plot")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "line 14" in warnings[0] and "cut short" in warnings[0], done.stderr
    assert csv_path.read_bytes() == torn  # reading repairs nothing
    assert json.loads((out / "profile-h200.json").read_text())["scenarios"] == {"ok": 12}
    records = RecordFile(csv_path).open()
    assert len(records.problems) == 1 and "removed" in records.problems[0]
    assert csv_path.read_bytes() == torn[:torn.rindex(b"\n") + 1]


def test_an_altered_line_is_ignored_and_reported_never_rewritten(tmp_path):
    records = RecordFile(tmp_path / "measurements.csv").open()
    for name in "abc":
        records.append(_row(name))
    data = records.path.read_bytes().replace(b"b,ok,", b"b,oom,", 1)  # a hand edit: the checksum no longer holds
    records.path.write_bytes(data)
    reopened = RecordFile(records.path).open()
    assert [row["scenario_id"] for row in reopened.rows()] == ["a", "c"]
    assert reopened.problems == [f"{records.path} line 3: checksum or column count does not match (altered or "
                                 f"damaged): ignored"]
    assert records.path.read_bytes() == data


def test_older_columns_with_a_damaged_line_are_not_migrated(tmp_path):
    old = RecordFile(tmp_path / "m.csv", columns=("scenario_id", "status", "message", "row_crc32")).open()
    old.append(_row("a", message="kept"))
    with open(old.path, "ab") as f:
        f.write(b"garbage,line,0000000\n")
    data = old.path.read_bytes()
    with pytest.raises(DamagedRecords, match="damaged lines"):
        RecordFile(old.path).open()
    assert old.path.read_bytes() == data


def test_a_full_disk_during_append_leaves_no_torn_row(tmp_path):
    path = tmp_path / "measurements.csv"
    RecordFile(path).open()
    script = (
        "import resource, signal, sys\n"
        "from vramcalc.calibrate.records import RecordFile\n"
        "from vramcalc.errors import VramcalcError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({path.stat().st_size + 1500}, {path.stat().st_size + 1500}))\n"
        f"records = RecordFile({str(path)!r})\n"
        "for i in range(100):\n"
        "    try:\n"
        "        records.append({'scenario_id': f'row{i}', 'status': 'ok', 'message': 'x' * 300})\n"
        "    except VramcalcError as err:\n"
        "        print(i, err)\n"
        "        break\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "File too large" in done.stdout, done.stderr
    failed_at = int(done.stdout.split()[0])
    assert failed_at >= 1
    data = path.read_bytes()
    assert data.endswith(b"\n")
    reread = RecordFile(path)
    assert [row["scenario_id"] for row in reread.rows()] == [f"row{i}" for i in range(failed_at)]
    assert reread.problems == []


# -- --resume and rows that ended in error -----------------------------------------------------------------
def test_resume_runs_error_rows_again_unless_told_to_keep_them(tmp_path):
    path = tmp_path / "measurements.csv"
    records = RecordFile(path).open()
    records.append(_row("measured"))
    records.append(_row("out-of-memory", status="oom"))
    records.append(_row("timed-out", status="error", stage="timeout"))
    records.append(_row("retried", status="error", stage="timeout"))
    records.append(_row("retried", status="ok"))  # the last row of a scenario is the one that counts
    assert records.done_ids(rerun_errors=True) == {"measured", "out-of-memory", "retried"}
    assert records.done_ids() == {"measured", "out-of-memory", "timed-out", "retried"}


@needs_torch
def test_a_scenario_killed_by_a_short_timeout_is_measured_by_the_next_resume(tmp_path):
    (tmp_path / "s.csv").write_text(ONE_SCENARIO)
    out = tmp_path / "run"
    first = _run("--device", "cpu", "--scenarios", str(tmp_path / "s.csv"), "--out", str(out),
                 "--scenario-timeout", "0.5", "--no-plot", "--no-install-profile")
    assert first.returncode == 0, first.stderr
    (row,) = RecordFile(out / "measurements.csv").rows()
    assert (row["status"], row["stage"]) == ("error", "timeout")
    kept = _run("--device", "cpu", "--scenarios", str(tmp_path / "s.csv"), "--out", str(out), "--resume",
                "--keep-errors", "--no-plot", "--no-install-profile")
    assert kept.returncode == 0 and "measured 0 scenarios" in kept.stderr, kept.stderr
    resumed = _run("--device", "cpu", "--scenarios", str(tmp_path / "s.csv"), "--out", str(out), "--resume",
                   "--no-plot", "--no-install-profile", progress="")  # the default: lines, stderr is no terminal
    assert resumed.returncode == 0, resumed.stderr
    assert "measured 1 scenarios" in resumed.stderr and "1 failed before and run again" in resumed.stderr
    (row,) = RecordFile(out / "measurements.csv").rows()
    assert row["status"] == "ok"
    assert (out / "measurements.csv").read_bytes().count(b"\n") == 3  # header, the error row, the ok row
    # without a terminal the progress is plain lines: the count of scenarios reaches the total
    assert "calibrate cpu  1/1 scenarios  100%" in resumed.stderr


# -- output paths ------------------------------------------------------------------------------------------
def test_out_onto_a_file_is_one_error_line_and_the_file_is_unchanged(tmp_path):
    target = tmp_path / "a-file"
    target.write_bytes(b"precious")
    (tmp_path / "s.csv").write_text(ONE_SCENARIO)
    for out in (target, target / "below"):
        done = _run("--device", "cpu", "--scenarios", str(tmp_path / "s.csv"), "--out", str(out))
        assert done.returncode == 2 and str(target) in _one_error_line(done.stderr)
    assert target.read_bytes() == b"precious"


@contextlib.contextmanager
def _read_only_folder(tmp_path: Path):
    """A folder this process cannot write: chmod 555, or as root (which ignores modes) a read-only tmpfs."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("running as root without mount: no read-only folder to test")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_out_in_a_read_only_folder_is_one_error_line(tmp_path):
    (tmp_path / "s.csv").write_text(ONE_SCENARIO)
    with _read_only_folder(tmp_path) as folder:
        for out in (folder, folder / "run"):
            done = _run("--device", "cpu", "--scenarios", str(tmp_path / "s.csv"), "--out", str(out))
            assert done.returncode == 2
            assert "Read-only" in _one_error_line(done.stderr) or "ermission" in done.stderr
        assert list(folder.iterdir()) == []


def test_a_full_disk_leaves_the_old_scenarios_json_and_no_temporary_file(tmp_path):
    (tmp_path / "s.csv").write_text(ONE_SCENARIO)
    out = tmp_path / "run"
    out.mkdir()
    (out / "scenarios.json").write_text('{"scenarios": []}\n')  # a previous run's, shorter than the new one
    RecordFile(out / "measurements.csv").open()
    before = _snapshot(out)
    done = _run("--device", "cpu", "--scenarios", str(tmp_path / "s.csv"), "--out", str(out), "--resume",
                limit_file_bytes=100)
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "scenarios.json" in line and "File too large" in line
    assert _snapshot(out) == before  # no scenarios.json.tmp, no half-written file


def test_a_full_disk_for_a_new_run_leaves_nothing_half_written(tmp_path):
    (tmp_path / "s.csv").write_text(ONE_SCENARIO)
    out = tmp_path / "run"
    done = _run("--device", "cpu", "--scenarios", str(tmp_path / "s.csv"), "--out", str(out), limit_file_bytes=100)
    assert done.returncode == 2 and "scenarios.json" in _one_error_line(done.stderr)
    assert [p.name for p in out.iterdir()] == []


def test_fit_only_onto_a_full_disk_is_one_line_and_leaves_no_partial_report(tmp_path):
    out = tmp_path / "run"
    csv_path = _recorded_run(out, n=12)
    before = _snapshot(out)
    done = _run("--fit-only", "--out", str(out), "--no-install-profile", "--no-plot",
                limit_file_bytes=min(csv_path.stat().st_size, 2048))  # (the report outgrows 2 KiB)
    assert done.returncode == 2 and "File too large" in _one_error_line(done.stderr)
    assert _snapshot(out) == before


# -- a plain install ---------------------------------------------------------------------------------------
def _blocker(tmp_path: Path, *modules: str) -> Path:
    folder = tmp_path / "blocker"
    folder.mkdir(exist_ok=True)
    lines = ["import sys"] + [f"sys.modules[{name!r}] = None" for name in modules]
    (folder / "sitecustomize.py").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda"])
def test_without_the_calibrate_extra_measuring_names_the_extra(tmp_path, device):
    blocker = _blocker(tmp_path, "torch", "tqdm", "transformers", "peft", "accelerate", "numpy")
    out = tmp_path / "run"
    done = _run("--device", device, "--out", str(out), env_path=[blocker])
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "torch" in line and "pip install 'vramcalc[calibrate]'" in line
    assert not out.exists()


def test_without_numpy_fit_only_names_the_extra_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    _recorded_run(out, n=12)
    before = _snapshot(out)
    done = _run("--fit-only", "--out", str(out), "--no-install-profile", env_path=[_blocker(tmp_path, "numpy")])
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "numpy" in line and "pip install 'vramcalc[calibrate]'" in line
    assert _snapshot(out) == before


def test_columns_end_with_the_checksum():
    assert COLUMNS[-1] == "row_crc32" and COLUMNS[0] == "scenario_id"


def test_resume_reports_a_torn_last_line_once_and_removes_it(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "s.csv").write_text(ONE_SCENARIO)
    records = RecordFile(out / "measurements.csv").open()
    from vramcalc.calibrate.scenarios import load_scenarios

    (scenario,) = load_scenarios(tmp_path / "s.csv")
    records.append(_row(scenario.id, status="oom"))  # already measured: the resume measures (and fits) nothing
    with open(records.path, "ab") as f:
        f.write(encode_row(_row("torn"))[:50])
    done = _run("--device", "cpu", "--scenarios", str(tmp_path / "s.csv"), "--out", str(out), "--resume",
                "--no-plot", "--no-install-profile")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "line 3" in warnings[0] and "removed" in warnings[0], done.stderr
    assert records.path.read_bytes().endswith(b"\n") and records.path.read_bytes().count(b"\n") == 2
