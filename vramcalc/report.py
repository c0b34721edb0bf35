"""``vramcalc report``: the hardware tables people quote, regenerated from the model itself, as Markdown and CSV.

Three tables, every figure computed by ``plan()`` / ``estimate()`` and the cost model, none typed in:
  hardware   for each size class (a representative catalogue model per class) and each chosen model, and for full
             fine-tuning, LoRA and QLoRA: the GPUs needed of each type, host RAM, $/hour and total cost for a stated
             token budget;
  techniques for a chosen model: LoRA, QLoRA, an 8-bit optimizer, gradient checkpointing and flash attention against
             the memory they save (one replica, one GPU) and the speed they cost or give (the cost model's tokens/s);
  budgets    for budget bands, which buy or rent configuration trains which model size with which method.
The representative models and the budget bands are choices (named below); everything derived from them is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .breakdown import GIB_NOTE
from .catalogue import get_gpu, get_model
from .cost import (
    eager_attention_seconds_per_token,
    job_utilisation,
    matmul_dtype,
    peak_flop_per_s,
    positive_number,
    training_flops,
)
from .errors import VramcalcError
from .estimator import estimate
from .export import rows_csv
from .files import make_folder, write_atomic
from .planning import DEFAULT_MAX_GPUS, applicable_options, catalogue_stamp, gpu_limit, plan_rows, require_pandas
from .training_setup import resolve_setup
from .units import BYTES_PER_GIB


@dataclass(frozen=True)
class SizeClass:
    label: str
    min_params_b: float
    max_params_b: float | None  # exclusive; None: open-ended
    representative: str  # a catalogue model whose total parameters fall in the class


# 70B-class models are 70.6B (Llama-3.3-70B), hence the 75B upper edge of "30-70B".
SIZE_CLASSES = (
    SizeClass("7-14B", 7, 15, "llama-3.1-8b"),
    SizeClass("30-70B", 30, 75, "llama-3.3-70b"),
    SizeClass("100B+", 100, 400, "mistral-large-2407"),
    SizeClass("400B+", 400, None, "llama-3.1-405b"),
)
REPORT_METHODS = ("full", "lora", "qlora")


@dataclass(frozen=True)
class Budget:
    label: str
    low_usd: float
    high_usd: float | None  # None: open-ended ("$500k+")

    @property
    def spend_usd(self) -> float:
        """The amount the band is evaluated at: its top, or its floor when it has no top."""
        return self.high_usd if self.high_usd is not None else self.low_usd


BUDGETS = (Budget("$5k-20k", 5_000, 20_000), Budget("$50k-200k", 50_000, 200_000), Budget("$500k+", 500_000, None))
DEFAULT_REPORT_TOKENS = 1_000_000_000  # a stated token budget: 1B dataset tokens, one epoch
DEFAULT_TECHNIQUES_MODEL = "llama-3.1-8b"
DEFAULT_SPEED_GPU = "h100-sxm"  # the reference GPU of the techniques table's speed column


def size_class(params: int) -> str:
    """The label of the class holding ``params`` total parameters, or 'other'."""
    billions = params / 1e9
    for cls in SIZE_CLASSES:
        if billions >= cls.min_params_b and (cls.max_params_b is None or billions < cls.max_params_b):
            return cls.label
    return "other"


def budget_bands(amounts_usd) -> tuple[Budget, ...]:
    """Budgets from plain amounts (each its own band); zero or negative amounts are errors."""
    bands = []
    for amount in amounts_usd:
        value = positive_number(amount, "budget ($)")
        bands.append(Budget(f"${value:,.0f}", value, value))
    return tuple(bands)


# -- hardware by size class ---------------------------------------------------------------------------------------
HARDWARE_COLUMNS = (
    "size_class", "model", "params_b", "active_params_b", "method", "matmul_dtype", "gpu", "fits", "num_gpus", "sharding",
    "micro_batch", "device_gib", "host_ram_gib", "rent_usd_per_hour", "train_hours", "rent_usd", "buy_usd", "note",
    "train_tokens", "seq_len", "catalogue_version", "catalogue_date",
)


def hardware_rows(models, *, tokens=DEFAULT_REPORT_TOKENS, epochs=1, max_gpus: int = DEFAULT_MAX_GPUS,
                  **options) -> list[dict]:
    """One row per (model, method, GPU type): GPUs needed, micro-batch, host RAM, $/hour and cost for the tokens
    (plain dicts with HARDWARE_COLUMNS keys; the standard library only)."""
    rows = []
    specs = {spec.name: spec for spec in (get_model(name) for name in models)}
    for spec in specs.values():
        for method in REPORT_METHODS:
            setup = applicable_options(dict(options, method=method))
            planned = plan_rows(spec, tokens=tokens, epochs=epochs, max_gpus=max_gpus, hosted=False, **setup).rows
            for row in sorted(planned, key=lambda r: _gpu_order(r.get("gpu"))):
                extra = dict(size_class=size_class(spec.params), params_b=spec.params / 1e9,
                             active_params_b=spec.active_params / 1e9)
                rows.append({column: {**row, **extra}.get(column) for column in HARDWARE_COLUMNS})
    return rows


def hardware_table(models, **kwargs):
    """``hardware_rows`` as a pandas DataFrame (the ``plan`` extra)."""
    return _frame(hardware_rows(models, **kwargs), HARDWARE_COLUMNS)


def _frame(rows: list[dict], columns):
    return require_pandas("this report table").DataFrame(rows, columns=list(columns))


def _gpu_order(name: str) -> int:
    from .catalogue import gpus

    order = [gpu.name for gpu in gpus()]
    return order.index(name) if name in order else len(order)


# -- techniques ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Technique:
    name: str
    before: dict  # options of the setup without the technique (on top of the defaults)
    after: dict  # options with it


TECHNIQUES = (
    Technique("LoRA", {}, {"method": "lora"}),
    Technique("QLoRA", {}, {"method": "qlora"}),
    Technique("8-bit AdamW", {}, {"optimizer": "adamw-8bit"}),
    Technique("gradient checkpointing", {}, {"grad_ckpt": True}),
    Technique("flash attention (vs eager)", {"attn": "eager"}, {"attn": "flash"}),
    Technique("QLoRA + checkpointing + flash", {}, {"method": "qlora", "grad_ckpt": True, "attn": "flash"}),
)
TECHNIQUE_COLUMNS = ("model", "technique", "change", "without_gib", "with_gib", "saved_gib", "saved_pct",
                     "peak_phase_without", "peak_phase_with", "speed_ratio", "speed_gpu", "seq_len", "batch_size", "catalogue_version", "catalogue_date")


def seconds_per_token(spec, resolved, gpu) -> float:
    """One GPU's seconds per dataset token under the cost model (FLOPs at the job's utilisation, plus eager
    attention's HBM traffic); used for speed ratios, where the peak cancels."""
    peak = peak_flop_per_s(gpu, matmul_dtype(resolved))
    if peak is None:
        raise VramcalcError(f"{gpu.name} has no {matmul_dtype(resolved)} matmuls: pick another speed GPU")
    utilisation = job_utilisation(gpu, resolved.setup.method)
    flops = training_flops(spec, resolved).hardware_flop_per_token
    return flops / (peak * utilisation.mfu) + eager_attention_seconds_per_token(spec, resolved, gpu)


def technique_rows(model, *, speed_gpu: str = DEFAULT_SPEED_GPU, **options) -> list[dict]:
    """Each technique against the same setup without it: device memory of one replica on one GPU (whether or not a
    GPU holds it), the memory saved, and the speed ratio (tokens/s with / without) on ``speed_gpu`` (plain dicts)."""
    spec = get_model(model)
    gpu = get_gpu(speed_gpu)
    stamp = catalogue_stamp()
    base = {key: value for key, value in options.items() if value is not None}
    base.pop("num_gpus", None)
    base.pop("sharding", None)
    rows = []
    for technique in TECHNIQUES:
        before = applicable_options({**base, **technique.before})
        after = applicable_options({**base, **technique.before, **technique.after})
        without, with_ = estimate(spec, **before), estimate(spec, **after)
        ratio = (seconds_per_token(spec, resolve_setup(spec, **before), gpu)
                 / seconds_per_token(spec, resolve_setup(spec, **after), gpu))
        saved = without.total_bytes - with_.total_bytes
        rows.append({
            "model": spec.name, "technique": technique.name, "change": _change(without.inputs, with_.inputs),
            "without_gib": without.total_bytes / BYTES_PER_GIB, "with_gib": with_.total_bytes / BYTES_PER_GIB,
            "saved_gib": saved / BYTES_PER_GIB, "saved_pct": 100 * saved / without.total_bytes,
            "peak_phase_without": without.phase.value, "peak_phase_with": with_.phase.value,
            "speed_ratio": ratio, "speed_gpu": gpu.name, "seq_len": with_.inputs["seq_len"],
            "batch_size": with_.inputs["batch_size"], "catalogue_version": stamp.version,
            "catalogue_date": stamp.date,
        })
    return rows


def techniques_table(model, *, speed_gpu: str = DEFAULT_SPEED_GPU, **options):
    """``technique_rows`` as a pandas DataFrame (the ``plan`` extra)."""
    return _frame(technique_rows(model, speed_gpu=speed_gpu, **options), TECHNIQUE_COLUMNS)


def _change(before: dict, after: dict) -> str:
    """The resolved inputs that differ, e.g. 'method full -> lora, lora_rank 8, lora_targets qv'."""
    keys = ("method", "precision", "optimizer", "grad_ckpt", "attn_used", "lora_rank", "lora_targets", "quant",
            "double_quant")
    parts = []
    for key in keys:
        if before.get(key) != after.get(key):
            parts.append(f"{key} {before.get(key)} -> {after.get(key)}")
        elif after.get("method") in ("lora", "qlora") and key in ("lora_rank", "lora_targets") \
                and before.get("method") != after.get("method"):
            parts.append(f"{key} {after.get(key)}")
    return ", ".join(parts)


# -- budgets ------------------------------------------------------------------------------------------------------
BUDGET_COLUMNS = ("budget", "spend_usd", "size_class", "model", "method", "buy_config", "buy_usd", "rent_config",
                  "rent_usd", "rent_hours", "catalogue_version", "catalogue_date")


def _missing(value) -> bool:
    """None, NaN or pandas NA: a figure the catalogue does not have (never read as 0)."""
    if value is None:
        return True
    try:
        return bool(value != value)
    except TypeError:
        return True


def _records(rows) -> list[dict]:
    return rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)


def budget_rows(hardware, budgets=BUDGETS) -> list[dict]:
    """For each band (evaluated at its top, or its floor when open-ended) and each (model, method): the cheapest
    purchase (GPU list prices only) and the cheapest rental of the token budget that the spend covers. A band that
    buys or rents nothing says so in one row. ``hardware``: ``hardware_rows`` (or its DataFrame)."""
    stamp = catalogue_stamp()
    rows = []
    groups: dict = {}
    for row in _records(hardware):
        if row.get("fits") is True or (not _missing(row.get("fits")) and bool(row.get("fits"))):
            groups.setdefault((row["model"], row["method"]), []).append(row)
    for band in budgets:
        spend = band.spend_usd
        found = False
        for (model, method), group in groups.items():
            buy = min((r for r in group if not _missing(r.get("buy_usd")) and r["buy_usd"] <= spend),
                      key=lambda r: r["buy_usd"], default=None)
            rent = min((r for r in group if not _missing(r.get("rent_usd")) and r["rent_usd"] <= spend),
                       key=lambda r: r["rent_usd"], default=None)
            if buy is None and rent is None:
                continue
            found = True
            row = {"budget": band.label, "spend_usd": spend, "size_class": group[0]["size_class"],
                   "model": model, "method": method, "catalogue_version": stamp.version, "catalogue_date": stamp.date}
            if buy is not None:
                row.update(buy_config=f"{int(buy['num_gpus'])} x {buy['gpu']}", buy_usd=buy["buy_usd"])
            if rent is not None:
                row.update(rent_config=f"{int(rent['num_gpus'])} x {rent['gpu']}", rent_usd=rent["rent_usd"],
                           rent_hours=rent["train_hours"])
            rows.append(row)
        if not found:
            rows.append({"budget": band.label, "spend_usd": spend, "model": "nothing in the catalogue",
                         "catalogue_version": stamp.version, "catalogue_date": stamp.date})
    return [{column: row.get(column) for column in BUDGET_COLUMNS} for row in rows]


def budget_table(hardware, budgets=BUDGETS):
    """``budget_rows`` as a pandas DataFrame (the ``plan`` extra)."""
    return _frame(budget_rows(hardware, budgets), BUDGET_COLUMNS)


# -- the report ---------------------------------------------------------------------------------------------------
TABLE_COLUMNS = {"hardware": HARDWARE_COLUMNS, "techniques": TECHNIQUE_COLUMNS, "budgets": BUDGET_COLUMNS}


@dataclass(frozen=True)
class Report:
    markdown: str
    rows: dict  # name -> list of row dicts (hardware, techniques, budgets); standard library only

    @property
    def tables(self) -> dict:
        """name -> pandas DataFrame of the same rows (the ``plan`` extra)."""
        return {name: _frame(rows, TABLE_COLUMNS[name]) for name, rows in self.rows.items()}

    def write(self, directory) -> list[Path]:
        """report.md and one CSV per table (unit-suffixed headers, catalogue stamp, cells escaped), each written
        atomically (``files.write_atomic``): a failure is one ``VramcalcError`` line and leaves no partial file."""
        folder = make_folder(directory)
        written = [write_atomic(folder / "report.md", self.markdown)]
        for name, rows in self.rows.items():
            written.append(write_atomic(folder / f"{name}.csv", rows_csv(rows, TABLE_COLUMNS[name])))
        return written


def report(models=(), *, tokens=DEFAULT_REPORT_TOKENS, epochs=1, budgets=BUDGETS, speed_gpu: str = DEFAULT_SPEED_GPU,
           max_gpus: int = DEFAULT_MAX_GPUS, **options) -> Report:
    """The three tables for the size classes plus ``models`` (the techniques table for each of ``models``, or for
    ``DEFAULT_TECHNIQUES_MODEL``). ``options`` are TrainingSetup fields applied to every row (not ``method``)."""
    options = {key: value for key, value in options.items() if value is not None}
    if "method" in options:
        raise VramcalcError("report covers full, lora and qlora: leave --method out")
    tokens = positive_number(tokens, "token count")
    epochs = positive_number(epochs, "number of epochs")
    max_gpus = gpu_limit(max_gpus)
    chosen = [get_model(name) for name in models]
    everything = [get_model(cls.representative) for cls in SIZE_CLASSES] + chosen
    hardware = hardware_rows(everything, tokens=tokens, epochs=epochs, max_gpus=max_gpus, **options)
    techniques = [row for name in (chosen or [DEFAULT_TECHNIQUES_MODEL])
                  for row in technique_rows(name, speed_gpu=speed_gpu, **options)]
    budget = budget_rows(hardware, budgets)
    rows = {"hardware": hardware, "techniques": techniques, "budgets": budget}
    return Report(render_markdown(rows, tokens, epochs, options, max_gpus), rows)


def _grouped(rows: list[dict], key: str) -> dict:
    """Rows grouped by ``row[key]``, groups in order of first appearance."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return groups


# -- Markdown -----------------------------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _usd(value) -> str:
    if _missing(value):
        return "no price"
    return f"${value:,.0f}" if value >= 100 else f"${value:,.2f}"


def _number(value, digits: int = 1) -> str:
    if _missing(value):
        return "-"
    return f"{value:,.{digits}f}"


def render_markdown(tables: dict, tokens: float, epochs: float, options: dict, max_gpus: int) -> str:
    stamp = catalogue_stamp()
    setup = ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "the estimator's defaults"
    parts = [
        "# vramcalc reference tables",
        "",
        f"Catalogue {stamp.version}, prices up to {stamp.date}. Token budget {tokens:,.0f} tokens x {epochs:g} "
        f"epoch(s). Setup: {setup} (bf16, AdamW, seq_len 2048, no checkpointing, sdpa unless set; LoRA r=8 on q,v). "
        f"{GIB_NOTE}. More than one GPU means FSDP full sharding; counts go 1, 2, 4, then whole nodes of 8, up to "
        f"{max_gpus}. Cloud prices are on-demand $/GPU-hour from the catalogue; 'no price' means the catalogue has "
        "none (never read it as 0). Time uses the model-FLOPs utilisation of each GPU generation (vramcalc.cost).",
        "",
        "## Hardware by model size",
        "",
        _hardware_markdown(_records(tables["hardware"])),
        "## Techniques: memory saved and speed",
        "",
        _techniques_markdown(_records(tables["techniques"])),
        "## What a budget buys or rents",
        "",
        _budget_markdown(_records(tables["budgets"]), tokens, epochs),
    ]
    return "\n".join(parts) + "\n"


def _hardware_markdown(hardware: list[dict]) -> str:
    out = []
    for model, frame in _grouped(hardware, "model").items():
        first = frame[0]
        out.append(f"### {model} ({first['size_class']}, {first['params_b']:.1f}B parameters, "
                   f"{first['active_params_b']:.1f}B active)")
        out.append("")
        header = ["GPU"]
        for method in REPORT_METHODS:
            header += [f"{method} GPUs", f"{method} host RAM GiB", f"{method} $/h", f"{method} total"]
        rows = []
        for gpu, by_gpu in _grouped(frame, "gpu").items():
            row = [gpu]
            for method in REPORT_METHODS:
                match = [r for r in by_gpu if r["method"] == method]
                if not match or _missing(match[0]["fits"]) or not bool(match[0]["fits"]):
                    row += ["does not fit", "-", "-", "-"]
                    continue
                r = match[0]
                row += [str(int(r["num_gpus"])), _number(r["host_ram_gib"], 0), _usd(r["rent_usd_per_hour"]),
                        _total_cell(r)]
            rows.append(row)
        out.append(markdown_table(header, rows))
        out.append("")
    return "\n".join(out)


def _total_cell(row) -> str:
    """The job's rent, 'no price' without a catalogue price, or why there is no time (a dtype the GPU lacks)."""
    if not _missing(row["rent_usd"]):
        return _usd(row["rent_usd"])
    if _missing(row["rent_usd_per_hour"]):
        return "no price"
    return f"no {row['matmul_dtype']} matmuls"


def _techniques_markdown(techniques) -> str:
    out = []
    for model, frame in _grouped(techniques, "model").items():
        first = frame[0]
        out.append(f"### {model} (one replica on one GPU, batch {first['batch_size']}, seq_len {first['seq_len']}; "
                   f"speed on {first['speed_gpu']})")
        out.append("")
        rows = [[r["technique"], r["change"], _number(r["without_gib"]), _number(r["with_gib"]),
                 _number(r["saved_gib"]), f"{r['saved_pct']:.0f}%",
                 f"{r['peak_phase_without']} -> {r['peak_phase_with']}", f"{r['speed_ratio']:.2f}x"]
                for r in frame]
        out.append(markdown_table(["technique", "change", "without GiB", "with GiB", "saved GiB", "saved",
                                   "peak at", "speed (tokens/s ratio)"], rows))
        out.append("")
    return "\n".join(out)


def _budget_markdown(budgets, tokens: float, epochs: float) -> str:
    out = [f"Buy: GPU list prices only (no server, network, power); rent: the {tokens:,.0f}-token x {epochs:g} job "
           "on demand. Each band is evaluated at its top (open bands at their floor).", ""]
    rows = []
    for r in budgets:
        if r["model"] == "nothing in the catalogue":
            rows.append([r["budget"], "nothing in the catalogue", "-", "-", "-"])
            continue
        buy = f"{r['buy_config']} ({_usd(r['buy_usd'])})" if isinstance(r["buy_config"], str) else "-"
        rent = (f"{r['rent_config']} ({_usd(r['rent_usd'])}, {_number(r['rent_hours'])} h)"
                if isinstance(r["rent_config"], str) else "-")
        rows.append([r["budget"], f"{r['model']} ({r['size_class']})", r["method"], buy, rent])
    out.append(markdown_table(["budget", "model", "method", "buy", "rent"], rows))
    out.append("")
    return "\n".join(out)
