"""The measurement CSV: one row per scenario, appended and made durable as soon as it is measured.

Crash safety: each row is one line (messages lose their line breaks), written with a single ``write`` on an
``O_APPEND`` descriptor and ``fsync``-ed before the next scenario starts, and ends with ``row_crc32``, the CRC-32
of the rest of the line. A reader keeps only lines whose checksum matches, so a line cut short by a crash (or power
loss) is ignored; on reopening, a last line without its newline is cut off before anything is appended. The header
is written to a temporary file and renamed into place. The columns are documented in ``calibration/README.md``.
"""

from __future__ import annotations

import csv
import datetime
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..options import Term

TENSOR_TERMS = tuple(term.value for term in Term if term.is_tensor)
SETUP_COLUMNS = ("method", "precision", "optimizer", "batch_size", "seq_len", "grad_ckpt", "attn", "lora_rank",
                 "lora_targets", "lora_dropout", "quant", "double_quant", "compute_dtype", "virtual_tokens",
                 "adapter_dtype", "grad_accum", "loss", "num_gpus", "sharding")

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
    "worker_seconds", "wall_seconds", "loss_value",
    # the trace (the CPU probe's tracker)
    *(f"trace_{term}_bytes" for term in TENSOR_TERMS), "trace_peak_tensor_bytes", "trace_phase", "trace_paged_bytes",
    # measured / estimated
    "ratio_allocated_to_est_peak_tensor", "ratio_reserved_to_est_peak_tensor", "ratio_nvml_to_est_total",
    "ratio_trace_to_est_peak_tensor",
    "row_crc32",
)
STATUSES = ("ok", "oom", "error")
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
            "build_seconds", "warmup_seconds", "step_seconds")},
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
    values = next(csv.reader([body]))
    if len(values) != len(columns) - 1:
        return None
    return dict(zip(columns[:-1], values))


@dataclass
class RecordFile:
    """The run's CSV. ``open()`` creates, repairs (drops a half-written last line) or migrates it (new columns);
    ``append()`` commits one row; ``rows()`` reads every intact row."""

    path: Path
    columns: tuple[str, ...] = COLUMNS
    skipped_lines: int = 0

    def open(self) -> "RecordFile":
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._write_atomically([])
            return self
        self._cut_partial_line()
        header, rows = self._read()
        if header != list(self.columns):
            self._write_atomically(rows)  # older columns: same rows under the current header
        return self

    def rows(self) -> list[dict]:
        """Every intact row, in file order (a scenario recorded twice keeps its last row)."""
        if not self.path.exists():
            return []
        _, rows = self._read()
        latest = {row["scenario_id"]: row for row in rows}
        return list(latest.values())

    def done_ids(self) -> set[str]:
        return {row["scenario_id"] for row in self.rows()}

    def append(self, row: dict) -> None:
        data = encode_row(row, self.columns)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- internals -------------------------------------------------------------------------------------
    def _read(self) -> tuple[list[str], list[dict]]:
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")
        complete = lines[:-1]  # the text after the last newline is an unfinished line
        if not complete:
            return [], []
        header = next(csv.reader([complete[0]]))
        rows = []
        self.skipped_lines = 0
        for line in complete[1:]:
            if not line:
                continue
            row = _decode_line(line, header)
            if row is None:
                self.skipped_lines += 1
            else:
                rows.append(row)
        return header, rows

    def _cut_partial_line(self) -> None:
        """A crash during a write can leave a last line without its newline: cut it off."""
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        end = data.rfind(b"\n") + 1
        with open(self.path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())

    def _write_atomically(self, rows: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        header = io.StringIO()
        csv.writer(header, lineterminator="\n").writerow(self.columns)
        with open(tmp, "wb") as f:
            f.write(header.getvalue().encode("utf-8"))
            for row in rows:
                f.write(encode_row(row, self.columns))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
