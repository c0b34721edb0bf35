"""Export helpers shared by the CLI, plan and report: rows as plain-text tables, CSV and JSON, with spreadsheet-safe
cells and terminal-safe text.

Formula-safe cells (CSV injection, OWASP "CSV Injection", https://owasp.org/www-community/attacks/CSV_Injection):
LibreOffice and Excel evaluate a cell that starts with ``=``, ``+``, ``-`` or ``@`` (and tab or carriage return), and
they skip leading blanks and line breaks before deciding. So a text cell whose first character after any leading
whitespace or control characters is one of those (or that starts with a tab, carriage return or line feed) is
prefixed with an apostrophe; numbers pass unchanged, negative ones included, and so does text that is exactly a
number ("-1.5"). Every CSV is written with ``\\r\\n`` row ends (RFC 4180) and ``QUOTE_MINIMAL``, so a field holding a
carriage return, a line feed, a quote or the delimiter is quoted and never splits a row.

Terminal-safe text (``terminal_text``): names from the user (a model folder) reach the table output with their
escape sequences removed and other control characters shown as ``\\xNN``: a folder named ``"\\x1b]0;pwned\\x07x"``
cannot retitle or clear the terminal.

pandas is never imported here: the frame helpers take a DataFrame that the caller already has; plain rows (lists of
dicts) need the standard library only.
"""

from __future__ import annotations

import csv
import io
import json
import re

from . import catalogue
from .breakdown import GIB_NOTE, MemoryBreakdown
from .files import write_atomic
from .options import Choice
from .units import BYTES_PER_GIB

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")
CSV_LINE_END = "\r\n"  # RFC 4180; with it csv's QUOTE_MINIMAL quotes any field holding \r or \n
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
# ECMA-48 escape sequences: CSI (ESC [ ... final byte), OSC / DCS / PM / APC strings (ended by BEL or ST), and
# two-character escapes; the 8-bit C1 forms too.
_ESCAPES = re.compile(r"(\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
                      r"|(\x1b[\]P^_X]|[\x9d\x90\x9e\x9f\x98])[^\x07\x1b\x9c]*(\x07|\x1b\\|\x9c)?"
                      r"|\x1b[ -~]?")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# -- cells --------------------------------------------------------------------------------------------------------
def _is_blank(char: str) -> bool:
    return char.isspace() or ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F


def safe_cell(value):
    """The value itself for numbers and booleans; text that a spreadsheet would read as a formula (a formula
    character after any leading whitespace or control characters, or a leading tab, CR or LF) gets a leading
    apostrophe. Text that is exactly a number stays as it is."""
    if isinstance(value, (bool, int, float)) or value is None:
        return "" if value is None else value
    text = str(value)
    if _NUMBER.fullmatch(text):
        return text
    first = next((char for char in text if not _is_blank(char)), "")
    if text.startswith(("\t", "\r", "\n")) or first in ("=", "+", "-", "@"):
        return "'" + text
    return text


def terminal_text(text: str) -> str:
    """``text`` safe to print on a terminal: escape sequences removed, other control characters (but line feeds)
    shown as ``\\xNN``."""
    text = _ESCAPES.sub("", str(text))
    return _CONTROLS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def cell(value):
    """A spreadsheet cell: empty for missing values (never 0), numbers as numbers, text escaped (``safe_cell``)."""
    if value is None:
        return ""
    try:
        if value != value:  # NaN, pandas NA
            return ""
    except TypeError:  # pandas NA refuses comparison
        return ""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 1e15 else float(f"{value:.10g}")
    if isinstance(value, Choice):
        return value.value
    if hasattr(value, "item"):  # numpy scalars
        return cell(value.item())
    return safe_cell(value)


def json_value(value):
    """A JSON-ready value: numpy scalars as Python numbers, NaN and pandas NA as null (never 0)."""
    if hasattr(value, "item"):
        value = value.item()
    if value is None:
        return None
    try:
        if value != value:
            return None
    except TypeError:
        return None
    if isinstance(value, Choice):
        return value.value
    return value


_json_value = json_value


def _writer(buffer):
    return csv.writer(buffer, lineterminator=CSV_LINE_END, quoting=csv.QUOTE_MINIMAL)


# -- rows of dicts ------------------------------------------------------------------------------------------------
def csv_text(rows: list[dict], header: list[str]) -> str:
    """CSV text: the header, then one line per row (missing keys empty), every cell through ``safe_cell``."""
    buffer = io.StringIO()
    writer = _writer(buffer)
    writer.writerow([safe_cell(key) for key in header])
    for row in rows:
        writer.writerow([safe_cell(row.get(key, "")) for key in header])
    return buffer.getvalue()


def rows_csv(rows: list[dict], header) -> str:
    """CSV text of plan-like rows: the header, then every cell through ``cell`` (missing and NaN empty, whole floats
    as integers)."""
    buffer = io.StringIO()
    writer = _writer(buffer)
    writer.writerow([safe_cell(key) for key in header])
    for row in rows:
        writer.writerow([cell(row.get(key)) for key in header])
    return buffer.getvalue()


def rows_json(rows: list[dict], header) -> list[dict]:
    """JSON-ready rows with every column of ``header``: missing values as null."""
    return [{key: json_value(row.get(key)) for key in header} for row in rows]


def table_text(rows: list[dict], header: list[str]) -> str:
    """A plain-text table: left-aligned columns as wide as their longest cell, two spaces apart."""
    cells = [[terminal_text(row.get(key, "")) for key in header] for row in rows]
    widths = [max(len(key), *(len(c[i]) for c in cells)) if cells else len(key) for i, key in enumerate(header)]
    lines = ["  ".join(key.ljust(w) for key, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines) + "\n"


def render_rows(rows: list[dict], fmt: str, note: str = "") -> str:
    """Rows as ``json``, ``csv`` or a ``table`` (followed by ``note`` in parentheses)."""
    header = list(rows[0]) if rows else []
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        return csv_text(rows, header)
    return table_text(rows, header) + (f"({note})\n" if note else "")


# -- DataFrames ---------------------------------------------------------------------------------------------------
def frame_csv(frame) -> str:
    """CSV text of a DataFrame: its column order, every cell through ``cell``."""
    buffer = io.StringIO()
    writer = _writer(buffer)
    writer.writerow([safe_cell(str(column)) for column in frame.columns])
    for row in frame.itertuples(index=False, name=None):
        writer.writerow([cell(value) for value in row])
    return buffer.getvalue()


def write_csv(frame, path) -> None:
    """Write ``frame`` (a DataFrame, or a list of row dicts) as CSV to ``path`` (UTF-8), atomically
    (``files.write_atomic``: a failure leaves the old file or none, and is one ``VramcalcError`` line)."""
    text = rows_csv(frame, list(frame[0]) if frame else []) if isinstance(frame, list) else frame_csv(frame)
    write_atomic(path, text)


def frame_records(frame) -> list[dict]:
    """JSON-ready rows: missing values as null."""
    return [{column: json_value(value) for column, value in zip(frame.columns, row)}
            for row in frame.itertuples(index=False, name=None)]


# -- one estimate -------------------------------------------------------------------------------------------------
def breakdown_row(result: MemoryBreakdown) -> dict:
    """One flat, unit-suffixed row: the setup, each term in bytes, and the totals in bytes and GiB."""
    row = {"model": result.model, "source": result.source, "phase": result.phase.value}
    for key, value in result.inputs.items():
        if key in ("model", "defaults", "origins"):
            continue
        if isinstance(value, dict):  # a summary (``sample_lengths``): one column per figure
            row.update({f"{key}_{name}": figure for name, figure in value.items()})
        else:
            row[key] = value
    row.update({f"{term}_bytes": value for term, value in result.terms().items()})
    row["peak_tensor_bytes"] = result.peak_tensor_bytes
    row["total_bytes"] = result.total_bytes
    row["total_gib"] = round(result.total_bytes / BYTES_PER_GIB, 2)
    for key in ("reserved_peak_bytes", "reserved_baseline_bytes"):  # trace(..., reserved=True) only
        if key in result.details:
            row[key] = result.details[key]
    for key in ("stream_pools_bytes", "length_ladders_bytes"):  # reserved beyond the total while the GPU has room
        if key in result.details:
            row[key] = result.details[key]
            row["reserved_bytes"] = result.reserved_bytes
    if result.gpu is not None:
        row["gpu"] = result.gpu.name
        row["fits"] = result.fits()
        row["headroom_gib"] = round(result.headroom_bytes() / BYTES_PER_GIB, 2)
    return row


def format_breakdown(result: MemoryBreakdown, fmt: str) -> str:
    """One estimate or trace as JSON (``to_dict``), a one-row CSV (``breakdown_row``) or its table."""
    if fmt == "json":
        return json.dumps(breakdown_document(result), indent=2) + "\n"
    if fmt == "csv":
        row = breakdown_row(result)
        return csv_text([row], list(row))
    return terminal_text(result.table()) + "\n"


def breakdown_document(result: MemoryBreakdown) -> dict:
    """The JSON of one estimate or trace (CLI ``--format json`` and the web API alike): ``to_dict()`` with ``inputs``
    limited to the options of its method (``applicable_inputs``)."""
    data = result.to_dict()
    if isinstance(data.get("inputs"), dict):
        data["inputs"] = applicable_inputs(data["inputs"])
    return data


def applicable_inputs(inputs: dict) -> dict:
    """``inputs`` without the options foreign to its method (no ``quant: nf4`` for a LoRA run, no ``lora_rank`` for
    full fine-tuning): ``training_setup.options_for`` says which method-specific options a method takes."""
    from .options import Method
    from .training_setup import METHOD_SPECIFIC_OPTIONS, options_for

    try:
        method = Method.parse(inputs.get("method"), "method")
    except Exception:  # an unknown method word: show everything
        return inputs
    foreign = set(METHOD_SPECIFIC_OPTIONS) - set(options_for(method))
    out = {key: value for key, value in inputs.items() if key not in foreign}
    if isinstance(out.get("defaults"), list):
        out["defaults"] = [key for key in out["defaults"] if key not in foreign]
    if isinstance(out.get("origins"), dict):
        out["origins"] = {key: origin for key, origin in out["origins"].items() if key not in foreign}
    return out


# -- the catalogues -----------------------------------------------------------------------------------------------
def model_rows(chosen=None) -> list[dict]:
    """The model catalogue (or the ``chosen`` models of it), one row per model (parameter counts are counts, not
    bytes), with its Hub id."""
    return [
        {
            "name": m.name,
            "hf_repo": m.hf_repo,
            "family": m.family,
            "params": m.params,
            "active_params": m.active_params,
            "layers": m.num_layers,
            "hidden_size": m.hidden_size,
            "vocab_size": m.vocab_size,
            "context": m.max_position_embeddings or "",
            "license": m.license,
        }
        for m in (catalogue.models() if chosen is None else chosen)
    ]


MODEL_TABLE_COLUMNS = ("name", "hf_repo", "family", "params_b", "active_b", "context")


def model_table_rows(chosen=None) -> list[dict]:
    """The models as the terminal table shows them (at most 120 columns): name, Hub id, family, parameters in
    billions (10^9), context; ``--format csv/json`` keep every column of ``model_rows`` (layers among them)."""
    return [{"name": row["name"], "hf_repo": row["hf_repo"], "family": row["family"],
             "params_b": f"{row['params'] / 1e9:.2f}", "active_b": f"{row['active_params'] / 1e9:.2f}",
             "context": row["context"]} for row in model_rows(chosen)]


def gpu_rows() -> list[dict]:
    """The GPU catalogue, one row per GPU; empty cells where the catalogue has no figure (never 0); ``source`` names
    the references of ``data/gpus_sources.md``."""
    return [
        {
            "name": g.name,
            "memory_bytes": g.memory_bytes,
            "memory_gib": round(g.memory_gib, 2),
            "bandwidth_gb_s": g.bandwidth_gb_s if g.bandwidth_gb_s is not None else "",
            "bf16_dense_tflops": g.bf16_dense_tflops if g.bf16_dense_tflops is not None else "",
            "fp8_dense_tflops": g.fp8_dense_tflops if g.fp8_dense_tflops is not None else "",
            "tdp_w": g.tdp_w if g.tdp_w is not None else "",
            "list_price_usd": g.list_price_usd if g.list_price_usd is not None else "",
            "cloud_usd_per_gpu_hour": g.cloud_usd_per_gpu_hour if g.cloud_usd_per_gpu_hour is not None else "",
            "cloud_price_date": g.cloud_price_date,
            "source": g.source,
        }
        for g in catalogue.gpus()
    ]


def models_text(fmt: str, chosen=None) -> str:
    """``vramcalc models``: every catalogue model, or the ``chosen`` ones (``catalogue.find_models``)."""
    if fmt == "table":
        return render_rows(model_table_rows(chosen), fmt, note="params_b, active_b: billions (10^9) of parameters; "
                                                               "--format csv or json for every column")
    return render_rows(model_rows(chosen), fmt)


def gpus_text(fmt: str) -> str:
    return render_rows(gpu_rows(), fmt, note=GIB_NOTE + "; source: data/gpus_sources.md")


def stack_rows() -> list[dict]:
    """One row per knob of each stack preset (``vramcalc/stacks.py``): the stack, the option, its value, the methods
    it holds for (blank: all), the source; a stack that sets nothing has one row with a blank option."""
    from .stacks import PRESETS

    rows = []
    for stack, preset in PRESETS.items():
        note = f"estimate only: {preset.estimate_only}" if preset.estimate_only else ""
        base = {"stack": stack.value, "version": preset.version, "summary": preset.summary, "note": note}
        if not preset.knobs:
            rows.append({**base, "option": "", "value": "", "methods": "", "source": "vramcalc defaults"})
        if preset.methods:  # the only methods the stack's own code runs (any other is refused)
            rows.append({**base, "option": "method", "value": "one of " + ",".join(m.value for m in preset.methods),
                         "methods": "", "source": preset.methods_source})
        for knob in preset.knobs:
            value = knob.value if not isinstance(knob.value, bool) else ("on" if knob.value else "off")
            rows.append({**base, "option": knob.option, "value": value,
                         "methods": ",".join(m.value for m in knob.methods), "source": knob.source})
    return rows


def stacks_text(fmt: str) -> str:
    """``vramcalc stacks``: the knobs of every stack; the table keeps stack, option, value and methods."""
    rows = stack_rows()
    if fmt == "table":
        short = [{key: row[key] for key in ("stack", "option", "value", "methods")} for row in rows]
        return render_rows(short, fmt, note="methods blank = every method; --format csv or json for each "
                                            "knob's source and the version read; explicit options override a stack")
    return render_rows(rows, fmt)
