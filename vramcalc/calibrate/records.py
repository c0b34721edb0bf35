"""The measurement CSV: one row per scenario, appended and made durable as soon as it is measured.

Crash safety: each row is one line (messages lose their line breaks), written with a single ``write`` on an
``O_APPEND`` descriptor and ``fsync``-ed before the next scenario starts, and ends with ``row_crc32``, the CRC-32
of the rest of the line. A reader keeps only lines whose checksum matches, so a line cut short by a crash (or power
loss) is ignored; on reopening, a last line without its newline is cut off before anything is appended. The header
is written to a temporary file and renamed into place (``vramcalc.files.write_atomic``). A failed append (a full
disk) is cut back to the last whole row. A damaged file is refused or its bad lines ignored and reported, never
rewritten (``RecordFile``). The columns are documented in ``calibration/README.md``.
"""

from __future__ import annotations

import csv
import datetime
import io
import os
import re
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import VramcalcError
from ..options import Term
from ..training_setup import TrainingSetup

TENSOR_TERMS = tuple(term.value for term in Term if term.is_tensor)
SETUP_COLUMNS = tuple(f.name for f in fields(TrainingSetup))  # every option of the setup, in its order

COLUMNS: tuple[str, ...] = (
    # what and how it ended
    "scenario_id", "status", "stage", "message",
    # provenance
    "date", "rank", "world_size",
    "device", "probe", "gpu", "device_name", "compute_capability", "device_total_bytes", "driver_version",
    "cuda_version", "cudnn_version", "torch_version", "transformers_version", "peft_version", "bitsandbytes_version",
    "accelerate_version", "python_version", "vramcalc_version",
    # the setup
    "model", "family", "size", *SETUP_COLUMNS, "attn_used", "lora_modules", "tokens", "params", "active_params",
    "trainable_params", "memory_limit_bytes",
    # the estimate
    *(f"est_{term.value}_bytes" for term in Term), "est_peak_tensor_bytes", "est_total_bytes", "est_phase",
    "est_paged_bytes", "est_runtime_profile",
    # the measurement
    "meas_allocated_peak_bytes", "meas_reserved_peak_bytes", "meas_active_peak_bytes", "meas_allocated_baseline_bytes",
    "meas_reserved_baseline_bytes", "meas_alloc_retries", "meas_allocator_ooms", "nvml_pre_cuda_used_bytes",
    "nvml_peak_bytes", "nvml_source", "nvml_process_peak_bytes", "nvml_device_delta_peak_bytes", "nvml_samples",
    "nvml_device_matches", "cuda_context_bytes", "build_seconds", "warmup_seconds", "step_seconds",
    "step_timing", "worker_seconds", "wall_seconds", "loss_value",
    # the trace (the CPU probe's tracker)
    *(f"trace_{term}_bytes" for term in TENSOR_TERMS), "trace_peak_tensor_bytes", "trace_phase", "trace_paged_bytes",
    # measured / estimated
    "ratio_allocated_to_est_peak_tensor", "ratio_reserved_to_est_peak_tensor", "ratio_nvml_to_est_total",
    "ratio_trace_to_est_peak_tensor",
    "row_crc32",
)
STATUSES = ("ok", "oom", "error")
# step_timing of a CUDA row: step_seconds is the median of the timed steps, after one untimed step past
# empty_cache() (probes.measure_cuda); the fit installs the host's time per kernel only from rows timed so (fit.py)
STEADY_STEP_TIMING = "median after one untimed step"
MESSAGE_MAX_CHARS = 600


@dataclass(frozen=True)
class LaunchedRank:
    """Which process of a ``torchrun`` / ``accelerate launch`` job this is (both set RANK, WORLD_SIZE, LOCAL_RANK;
    ``torch/distributed/run.py``); rank 0 of 1 when started alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def launched(self) -> bool:
        return self.world_size > 1

    def columns(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size}


def launched_rank(environ=None) -> LaunchedRank:
    env = os.environ if environ is None else environ
    try:
        return LaunchedRank(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError:
        return LaunchedRank()


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


# -- building a row ------------------------------------------------------------------------------------
def make_row(scenario, spec, resolved, breakdown, result: dict, device, *, memory_limit_bytes: int | None,
             wall_seconds: float) -> dict:
    """The CSV row of one scenario: setup, estimate (``breakdown``), the worker's ``result``, ratios."""
    from .. import __version__

    readings = result.get("readings") or {}
    versions = result.get("versions") or {}
    setup = resolved.setup.to_dict()
    row = {
        "scenario_id": scenario.id,
        "status": result.get("status", "error"),
        "stage": result.get("stage", ""),
        "message": result.get("message", ""),
        "date": utc_now(),
        **launched_rank().columns(),
        "device": device.spec,
        "probe": readings.get("probe", ""),
        "gpu": device.gpu or "",
        "device_name": readings.get("device_name") or device.name,
        "compute_capability": readings.get("compute_capability") or device.compute_capability,
        "device_total_bytes": readings.get("device_total_bytes") or device.total_bytes,
        "driver_version": readings.get("driver_version") or device.driver_version,
        "cuda_version": readings.get("cuda_version") or device.cuda_version,
        "cudnn_version": readings.get("cudnn_version", ""),
        **{f"{name}_version": versions.get(name, "") for name in
           ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "python")},
        "vramcalc_version": __version__,
        "model": spec.name,
        "family": spec.family,
        "size": scenario.size,
        **{key: setup[key] for key in SETUP_COLUMNS},
        "attn_used": resolved.attn_used.value,
        "lora_modules": ",".join(resolved.lora_modules),
        "tokens": resolved.setup.tokens,
        "params": spec.params,
        "active_params": spec.active_params,
        "trainable_params": breakdown.details.get("trainable_params"),
        "memory_limit_bytes": memory_limit_bytes,
        **{f"est_{name}_bytes": value for name, value in breakdown.terms().items()},
        "est_peak_tensor_bytes": breakdown.peak_tensor_bytes,
        "est_total_bytes": breakdown.total_bytes,
        "est_phase": breakdown.phase.value,
        "est_paged_bytes": breakdown.details.get("paged_optimizer_bytes", 0),
        "est_runtime_profile": breakdown.details.get("runtime_profile", ""),
        "meas_allocated_peak_bytes": readings.get("allocated_peak_bytes"),
        "meas_reserved_peak_bytes": readings.get("reserved_peak_bytes"),
        "meas_active_peak_bytes": readings.get("active_peak_bytes"),
        "meas_allocated_baseline_bytes": readings.get("allocated_baseline_bytes"),
        "meas_reserved_baseline_bytes": readings.get("reserved_baseline_bytes"),
        "meas_alloc_retries": readings.get("alloc_retries"),
        "meas_allocator_ooms": readings.get("allocator_ooms"),
        **{key: readings.get(key) for key in (
            "nvml_pre_cuda_used_bytes", "nvml_peak_bytes", "nvml_source", "nvml_process_peak_bytes",
            "nvml_device_delta_peak_bytes", "nvml_samples", "nvml_device_matches", "cuda_context_bytes",
            "build_seconds", "warmup_seconds", "step_seconds", "step_timing")},
        "loss_value": readings.get("loss"),
        "worker_seconds": result.get("worker_seconds"),
        "wall_seconds": wall_seconds,
    }
    trace_terms = readings.get("trace_terms")
    if trace_terms:
        row.update({f"trace_{name}_bytes": trace_terms.get(name, 0) for name in TENSOR_TERMS})
        row["trace_peak_tensor_bytes"] = sum(trace_terms.get(name, 0) for name in TENSOR_TERMS)
        row["trace_phase"] = readings.get("trace_phase", "")
        row["trace_paged_bytes"] = readings.get("paged_bytes", 0)
    row.update(measured_ratios(row))
    return row


def measured_ratios(row: dict) -> dict:
    """Measured over estimated: allocated and reserved peaks over the tensor peak, NVML over the total."""

    def ratio(numerator, denominator):
        if numerator in (None, "") or not denominator:
            return None
        return round(float(numerator) / float(denominator), 6)

    return {
        "ratio_allocated_to_est_peak_tensor": ratio(row.get("meas_allocated_peak_bytes"), row["est_peak_tensor_bytes"]),
        "ratio_reserved_to_est_peak_tensor": ratio(row.get("meas_reserved_peak_bytes"), row["est_peak_tensor_bytes"]),
        "ratio_nvml_to_est_total": ratio(row.get("nvml_peak_bytes"), row["est_total_bytes"]),
        "ratio_trace_to_est_peak_tensor": ratio(row.get("trace_peak_tensor_bytes"), row["est_peak_tensor_bytes"]),
    }


# -- the file ------------------------------------------------------------------------------------------
def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(round(value, 6))
    text = str(value)
    return " | ".join(part.strip() for part in text.splitlines() if part.strip()) if "\n" in text or "\r" in text else text


def encode_row(row: dict, columns: tuple[str, ...] = COLUMNS) -> bytes:
    """One CSV line, checksum last, newline-terminated."""
    values = [_cell(row.get(name)) for name in columns[:-1]]
    if "message" in columns:
        i = columns.index("message")
        values[i] = values[i][:MESSAGE_MAX_CHARS]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(values)
    body = buffer.getvalue()
    return f"{body},{zlib.crc32(body.encode('utf-8')):08x}\n".encode("utf-8")


def _decode_line(line: str, columns: list[str]) -> dict | None:
    """A row dict, or None when the line is cut short or its checksum does not match."""
    body, _, crc = line.rpartition(",")
    if not body or len(crc) != 8 or f"{zlib.crc32(body.encode('utf-8')):08x}" != crc:
        return None
    try:
        values = next(csv.reader([body]))
    except csv.Error:
        return None
    if len(values) != len(columns) - 1:
        return None
    return dict(zip(columns[:-1], values))


HEADER_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_REPORTED_LINES = 20  # problems reported one line each, up to this many, then a count


class DamagedRecords(VramcalcError):
    """The CSV cannot be read safely (its header is lost or is not a measurements header): refused, never
    rewritten."""


@dataclass
class RecordFile:
    """The run's CSV. ``open()`` creates it, repairs it (cuts a last line a crash left without its newline) or
    migrates it (an older set of columns, when no value would be lost); ``append()`` commits one row; ``rows()``
    reads every intact row.

    What is never done: rewriting a file whose header is lost or foreign (``DamagedRecords`` names the line and
    why), or dropping a complete line silently. A complete line whose checksum does not match is ignored and
    reported; a migration is refused while such a line exists (rewriting would lose it). ``problems`` holds one
    line per repaired or ignored line of the last read, for the caller to print.
    """

    path: Path
    columns: tuple[str, ...] = COLUMNS
    skipped_lines: int = 0
    problems: list = field(default_factory=list)

    def open(self) -> "RecordFile":
        from ..files import make_folder

        self.path = Path(self.path)
        make_folder(self.path.parent)
        if self.path.is_dir():
            raise VramcalcError(f"cannot use {self.path}: it is a folder")
        if not self.path.exists() or self._size() == 0:
            self._write_atomically([])
            self.problems = []
            return self
        self._check_header()  # before anything is cut or rewritten
        cut = self._cut_partial_line()
        header, rows = self._read()
        if cut:
            self.problems.insert(0, cut)
        if header != list(self.columns):
            self._migrate(header, rows)
        return self

    def check(self) -> "RecordFile":
        """Read the file and change nothing: DamagedRecords when ``open()`` would refuse it (a lost or foreign
        header, a migration that would lose lines); ``problems`` lists the lines it would repair or ignore."""
        header, _ = self._read()
        if header != list(self.columns):
            self._check_migration(header)
        return self

    def rows(self) -> list[dict]:
        """Every intact row, in file order (a scenario recorded twice keeps its last row)."""
        if not self.path.exists() or self._size() == 0:  # nothing recorded yet (open() writes the header)
            self.problems = []
            return []
        _, rows = self._read()
        latest = {row["scenario_id"]: row for row in rows}
        return list(latest.values())

    def done_ids(self, rerun_errors: bool = False) -> set[str]:
        """The scenarios ``--resume`` skips: every recorded one, or with ``rerun_errors`` only those whose last row
        is a measurement (``ok`` or ``oom``), so that a scenario that ended in ``error`` (a timeout, a dead worker,
        a refused setup) is run again."""
        return {row["scenario_id"] for row in self.rows()
                if not rerun_errors or row.get("status") in ("ok", "oom")}

    def append(self, row: dict) -> None:
        """One row, one ``write`` on an ``O_APPEND`` descriptor, ``fsync``-ed. A failed write (a full disk) is cut
        back to the file's previous end and raised as one VramcalcError line: no torn row is left behind."""
        data = encode_row(row, self.columns)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as err:
            raise VramcalcError(f"cannot write {self.path}: {err.strerror or err}") from None
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            except OSError as err:
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                except OSError:
                    pass  # open() cuts a last line without its newline on the next run
                raise VramcalcError(f"cannot write {self.path}: {err.strerror or err}") from None
        finally:
            os.close(fd)

    # -- internals -------------------------------------------------------------------------------------
    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError as err:
            raise VramcalcError(f"cannot read {self.path}: {err.strerror or err}") from None

    def _bytes(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as err:
            raise VramcalcError(f"cannot read {self.path}: {err.strerror or err}") from None

    def _note(self, line_number: int, text: str) -> None:
        self.problems.append(f"{self.path} line {line_number}: {text}")

    def _check_header(self) -> list[str]:
        """The header's column names, or DamagedRecords saying why line 1 is not one."""
        data = self._bytes()
        first, newline, _ = data.partition(b"\n")
        line = first.decode("utf-8", errors="replace").rstrip("\r")
        where = f"{self.path} line 1"
        if not newline:
            raise DamagedRecords(f"{where}: no complete header line; the file is not a measurements CSV "
                                 f"(move it away or choose another --out)")
        if _decode_line(line, list(self.columns)) is not None or _looks_like_row(line):
            raise DamagedRecords(f"{where} is a data row, not the header: the header line is lost; nothing was "
                                 f"changed (put the header of calibration/README.md back as line 1, or move "
                                 f"the file away)")
        try:
            names = next(csv.reader([line]))
        except csv.Error:
            names = []
        bad = [name for name in names if not HEADER_NAME.match(name)]
        if (not names or names[-1] != "row_crc32" or "scenario_id" not in names or bad
                or len(set(names)) != len(names)):
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise DamagedRecords(f"{where} is not a measurements header (expected scenario_id,...,row_crc32; got "
                                 f"{shown!r}); nothing was changed (move the file away or choose another --out)")
        return names

    def _read(self) -> tuple[list[str], list[dict]]:
        header = self._check_header()
        text = self._bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]  # the text after the last newline is an unfinished line
        rows = []
        self.skipped_lines = 0
        self.problems = []
        for number_, line in enumerate(complete[1:], start=2):
            line = line.rstrip("\r")
            row = _decode_line(line, header) if line else None
            if row is None:
                self.skipped_lines += 1
                why = "empty line" if not line else "checksum or column count does not match (altered or damaged)"
                self._note(number_, f"{why}: ignored")
            else:
                rows.append(row)
        if tail:
            self.skipped_lines += 1
            self._note(len(complete) + 1, "cut short (no newline: a write interrupted by a crash): ignored")
        if len(self.problems) > MAX_REPORTED_LINES:
            more = len(self.problems) - MAX_REPORTED_LINES
            self.problems = self.problems[:MAX_REPORTED_LINES] + [f"{self.path}: {more} more lines ignored"]
        return header, rows

    def _cut_partial_line(self) -> str | None:
        """A crash during a write can leave a last line without its newline: cut it off (and say so)."""
        data = self._bytes()
        if data.endswith(b"\n"):
            return None
        end = data.rfind(b"\n") + 1
        try:
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise VramcalcError(f"cannot repair {self.path}: {err.strerror or err}") from None
        line_number = data.count(b"\n") + 1
        return (f"{self.path} line {line_number}: cut short (no newline: a write interrupted by a crash): "
                f"removed ({len(data) - end} bytes)")

    def _migrate(self, header: list[str], rows: list[dict]) -> None:
        """Older columns: the same rows under the current header, only when that loses nothing."""
        self._check_migration(header)
        self._write_atomically(rows)

    def _check_migration(self, header: list[str]) -> None:
        lost_columns = [name for name in header if name not in self.columns]
        if lost_columns:
            raise DamagedRecords(f"{self.path} line 1: columns {', '.join(lost_columns[:5])} are not columns of "
                                 f"this vramcalc; nothing was changed (use the vramcalc that wrote the file, or "
                                 f"another --out)")
        if self.skipped_lines:
            raise DamagedRecords(f"{self.path}: has older columns and {self.skipped_lines} damaged lines; not "
                                 f"migrated, since rewriting would lose them (move the file away, or remove "
                                 f"those lines)")

    def _write_atomically(self, rows: list[dict]) -> None:
        from ..files import write_atomic

        header = io.StringIO()
        csv.writer(header, lineterminator="\n").writerow(self.columns)
        data = header.getvalue().encode("utf-8") + b"".join(encode_row(row, self.columns) for row in rows)
        write_atomic(self.path, data)


def _looks_like_row(line: str) -> bool:
    """A data row of any column set: its last field is an 8-digit hex checksum of the rest."""
    body, _, crc = line.rpartition(",")
    return bool(body) and len(crc) == 8 and crc == f"{zlib.crc32(body.encode('utf-8')):08x}"


# -- reading rows back as numbers ----------------------------------------------------------------------
def number(row: dict, key: str) -> float | None:
    """A numeric cell, or None when empty."""
    value = row.get(key)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
