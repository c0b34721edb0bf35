"""``vramcalc report``: the hardware tables people quote, regenerated from the model itself, as Markdown and CSV.

Four tables, every figure computed by ``plan()`` / ``estimate()``, the step-time model and the price tables, none
typed in:
  hardware   for each size class (a representative catalogue model per class) and each chosen model, and for full
             fine-tuning, LoRA and QLoRA: the GPUs needed of each type, host RAM, tokens/s, $/hour and total cost for a
             stated token budget;
  techniques for a chosen model: LoRA, QLoRA, prompt tuning, an 8-bit optimizer, gradient checkpointing and flash
             attention against a stated baseline (full fine-tuning at the user's batch and sequence length): the memory
             they save (one replica, one GPU) and the speed they cost or give (``cost.step_for``'s tokens/s);
  budgets    for budget bands, the fastest cluster each band buys (GPUs, server and network, at most
             ``MAX_BUY_GPUS``) and the tokens it rents, per model size and method;
  open vs closed  hosted fine-tuning APIs (data/hosted_finetuning.csv) beside renting and buying, for the same tokens.
The representative models, the budget bands and the cluster cap are choices (named below); everything derived from
them is computed. Report defaults follow how people run each method: QLoRA with gradient checkpointing
(``REPORT_METHOD_DEFAULTS``) unless ``grad_ckpt`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .breakdown import GIB_NOTE
from .catalogue import get_gpu, get_model
from .cost import (
    DEFAULT_AMORTISATION_YEARS,
    HOURS_PER_YEAR,
    TOKENS_PER_MILLION,
    eager_attention_seconds_per_token,
    hosted_cost_usd,
    hosted_prices,
    matmul_dtype,
    network_port_price,
    peak_flop_per_s,
    positive_number,
    step_or_profile_utilisation,
    training_flops,
)
from .facts import GPUS_PER_NODE
from .errors import VramcalcError
from .estimator import estimate
from .export import rows_csv
from .files import make_folder, write_atomic
from .options import Method, Stack
from .planning import DEFAULT_MAX_GPUS, applicable_options, catalogue_stamp, gpu_limit, plan_rows, require_pandas
from .stacks import preset
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
# How each method is usually run, where it differs from vramcalc's defaults: QLoRA with gradient checkpointing, since
# peft's ``prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)`` (peft/utils/other.py) turns it on
# by default and the QLoRA recipes call it. Applied unless the caller gives ``grad_ckpt``.
REPORT_METHOD_DEFAULTS = {"qlora": {"grad_ckpt": "full"}}
# The largest cluster a buyer is offered: eight 8-GPU servers, the GPUs one 64-port InfiniBand switch joins on a single
# tier (the switch priced in data/gpu_list_prices.csv). Workstation cards (no NVLink server in the catalogue) stop at
# one host of GPUS_PER_NODE.
MAX_BUY_GPUS = 64


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
    "size_class", "model", "params_b", "active_params_b", "method", "matmul_dtype", "grad_ckpt", "gpu", "fits",
    "num_gpus", "parallelism", "sharding", "micro_batch", "device_gib", "host_ram_gib", "throughput_tokens_per_s",
    "usd_per_million_tokens", "rent_usd_per_hour", "price_date", "price_source", "train_hours", "rent_usd", "buy_usd",
    "list_price_usd", "list_price_date", "list_price_source", "server_usd_per_gpu", "server_price_date",
    "buy_total_usd", "note", "train_tokens", "seq_len", "catalogue_version", "catalogue_date",
)


def method_options(options: dict, method: str) -> dict:
    """The options a report row of ``method`` runs with: the caller's, over the chosen stack's preset (applied by
    ``resolve_setup``), over REPORT_METHOD_DEFAULTS for the method where the stack's preset does not set the option
    (``--stack axolotl`` leaves QLoRA without checkpointing, as axolotl does)."""
    stack_knobs = {knob.option for knob in preset(Stack.parse(options.get("stack") or "hf", "stack"))
                   .knobs_for(Method.parse(method, "method"))}
    defaults = {key: value for key, value in REPORT_METHOD_DEFAULTS.get(method, {}).items() if key not in stack_knobs}
    return applicable_options({**defaults, **options, "method": method})


def hardware_rows(models, *, tokens=DEFAULT_REPORT_TOKENS, epochs=1, max_gpus: int = DEFAULT_MAX_GPUS,
                  **options) -> list[dict]:
    """One row per (model, method, GPU type): GPUs needed, micro-batch, host RAM, $/hour and cost for the tokens
    (plain dicts with HARDWARE_COLUMNS keys; the standard library only)."""
    rows = []
    specs = {spec.name: spec for spec in (get_model(name) for name in models)}
    for spec in specs.values():
        for method in REPORT_METHODS:
            setup = method_options(options, method)
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
    Technique("prompt tuning", {}, {"method": "prompt"}),
    Technique("8-bit AdamW", {}, {"optimizer": "adamw-8bit"}),
    Technique("gradient checkpointing", {"grad_ckpt": "none"}, {"grad_ckpt": "full"}),
    Technique("flash attention (vs eager)", {"attn": "eager"}, {"attn": "flash"}),
    Technique("QLoRA + checkpointing + flash", {}, {"method": "qlora", "grad_ckpt": "full", "attn": "flash"}),
)
TECHNIQUE_COLUMNS = ("model", "technique", "baseline", "change", "without_gib", "with_gib", "saved_gib", "saved_pct",
                     "peak_phase_without", "peak_phase_with", "speed_ratio", "speed_gpu", "seq_len", "batch_size",
                     "catalogue_version", "catalogue_date")


def seconds_per_token(spec, resolved, gpu) -> float:
    """One GPU's seconds per dataset token: the step-time model where it has a rate (``cost.step_for``), else FLOPs
    at the generation's utilisation plus eager attention's HBM traffic; used for speed ratios."""
    peak = peak_flop_per_s(gpu, matmul_dtype(resolved))
    if peak is None:
        raise VramcalcError(f"{gpu.name} has no {matmul_dtype(resolved)} matmuls: pick another speed GPU")
    per_token, utilisation = step_or_profile_utilisation(spec, resolved, gpu)
    if per_token is not None:
        return per_token
    flops = training_flops(spec, resolved).hardware_flop_per_token
    return flops / (peak * utilisation.mfu) + eager_attention_seconds_per_token(spec, resolved, gpu)


def describe_setup(inputs: dict) -> str:
    """A resolved setup in words: 'full fine-tuning, bf16, adamw, batch 1 x seq_len 2048, no checkpointing, sdpa'."""
    method = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA", "prompt": "prompt tuning"}.get(
        inputs["method"], inputs["method"])
    ckpt = {"none": "no checkpointing", "full": "full checkpointing", "selective": "selective checkpointing",
            "selective-op": "torchtitan's selective checkpointing", "reentrant": "full checkpointing (reentrant)",
            "wrapper": "full checkpointing (torch checkpoint_wrapper, KV cache on)"}.get(
        inputs["grad_ckpt"], f"checkpointing {inputs['grad_ckpt']}")
    parts = [method]
    if inputs["method"] in ("lora", "qlora"):
        parts[0] += f" r={inputs['lora_rank']} on {inputs['lora_targets']}"
    if inputs.get("modules_to_save"):  # peft's modules_to_save: trained whole beside the adapters
        parts[0] += f" + {inputs['modules_to_save']} trained whole"
    if inputs["method"] == "qlora":
        parts[0] += f" ({inputs['quant']} base)"
    parts += [inputs["precision"], inputs["optimizer"], f"batch {inputs['batch_size']} x seq_len {inputs['seq_len']}",
              ckpt, inputs.get("attn_used") or inputs["attn"]]
    return ", ".join(str(part) for part in parts)


def technique_rows(model, *, speed_gpu: str = DEFAULT_SPEED_GPU, **options) -> list[dict]:
    """Each technique against the same setup without it (the baseline: the caller's options, full fine-tuning unless
    given, at the caller's batch and sequence length): device memory of one replica on one GPU (whether or not a GPU
    holds it), the memory saved, and the speed ratio (tokens/s with / without) on ``speed_gpu`` (plain dicts)."""
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
            "model": spec.name, "technique": technique.name, "baseline": describe_setup(without.inputs),
            "change": _change(without.inputs, with_.inputs),
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
            "double_quant", "virtual_tokens")
    parts = []
    for key in keys:
        if before.get(key) != after.get(key):
            parts.append(f"{key} {before.get(key)} -> {after.get(key)}")
        elif after.get("method") in ("lora", "qlora") and key in ("lora_rank", "lora_targets") \
                and before.get("method") != after.get("method"):
            parts.append(f"{key} {after.get(key)}")
        elif after.get("method") == "prompt" and key == "virtual_tokens" and before.get("method") != "prompt":
            parts.append(f"{key} {after.get(key)}")
    return ", ".join(parts)


# -- budgets ------------------------------------------------------------------------------------------------------
BUDGET_COLUMNS = ("budget", "spend_usd", "size_class", "model", "method", "buy_config", "buy_usd", "buy_tokens_per_s",
                  "buy_hours", "rent_config", "rent_usd_per_million_tokens", "rent_tokens", "rent_usd", "rent_hours",
                  "catalogue_version", "catalogue_date")


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


def _fits(row) -> bool:
    return row.get("fits") is True or (not _missing(row.get("fits")) and bool(row.get("fits")))


def cluster_cost_usd(row: dict, num_gpus: int) -> float | None:
    """What ``num_gpus`` GPUs of a hardware row cost to buy: (GPU + server share) x GPUs, plus one InfiniBand port
    per GPU once they span servers (``cost.buy_total_usd``'s rule); None without a GPU price."""
    if _missing(row.get("list_price_usd")):
        return None
    server = 0.0 if _missing(row.get("server_usd_per_gpu")) else row["server_usd_per_gpu"]
    total = (row["list_price_usd"] + server) * num_gpus
    port = network_port_price()
    if num_gpus > GPUS_PER_NODE and port is not None:
        total += port.value * num_gpus
    return total


def cluster_sizes(need: int, cap: int) -> list[int]:
    """GPU counts a buyer can install, largest first: multiples of ``need`` up to one server (GPUS_PER_NODE), then
    whole servers (multiples of GPUS_PER_NODE that are also multiples of ``need``), up to ``cap``."""
    sizes = {n for n in range(need, min(cap, GPUS_PER_NODE) + 1, need)}
    sizes |= {n for n in range(GPUS_PER_NODE, cap + 1, GPUS_PER_NODE) if n % need == 0}
    return sorted(sizes, reverse=True)


def largest_cluster(row: dict, spend_usd: float) -> tuple[int, float] | None:
    """The most GPUs of a row's type the spend buys (``cluster_sizes`` of the count the setup needs, at most
    MAX_BUY_GPUS; GPUS_PER_NODE for cards without a server price: workstation hosts), with its cost; None if not even
    the count the setup needs."""
    need = int(row["num_gpus"])
    cap = MAX_BUY_GPUS if not _missing(row.get("server_usd_per_gpu")) else GPUS_PER_NODE
    for count in cluster_sizes(need, cap):
        cost = cluster_cost_usd(row, count)
        if cost is not None and cost <= spend_usd:
            return count, cost
    return None


def budget_rows(hardware, budgets=BUDGETS, *, tokens: float = DEFAULT_REPORT_TOKENS, epochs: float = 1) -> list[dict]:
    """For each band (evaluated at its top, or its floor when open-ended) and each (model, method):

    buy   the fastest cluster the spend buys: for each GPU type that fits, the most GPUs (``largest_cluster``: GPU,
          server share and network, capped) and its tokens/s, taken as the tokens/s at the count the setup needs
          times the number of such sets (data parallelism; an upper bound, communication grows); the fastest wins;
    rent  the cheapest rental per million training tokens and the tokens the spend trains at it, with the cost and
          hours of the report's own token budget (``tokens`` x ``epochs``) on it.
    A bigger band buys a bigger or faster cluster and rents more tokens, so the bands differ. A band that buys
    nothing and rents nothing says so in one row. ``hardware``: ``hardware_rows`` (or its DataFrame)."""
    stamp = catalogue_stamp()
    rows = []
    groups: dict = {}
    for row in _records(hardware):
        if _fits(row):
            groups.setdefault((row["model"], row["method"]), []).append(row)
    job_tokens = tokens * epochs
    for band in budgets:
        spend = band.spend_usd
        found = False
        for (model, method), group in groups.items():
            buy = None
            for r in group:
                if _missing(r.get("throughput_tokens_per_s")):
                    continue
                cluster = largest_cluster(r, spend)
                if cluster is None:
                    continue
                count, cost = cluster
                speed = r["throughput_tokens_per_s"] * count / int(r["num_gpus"])
                if buy is None or (speed, -cost) > (buy[2], -buy[1]):
                    buy = (f"{count} x {r['gpu']}", cost, speed)
            priced = [r for r in group if not _missing(r.get("usd_per_million_tokens"))]
            rent = min(priced, key=lambda r: r["usd_per_million_tokens"], default=None)
            rent_tokens = spend / rent["usd_per_million_tokens"] * TOKENS_PER_MILLION if rent else 0.0
            if buy is None and rent_tokens < 1:
                continue
            found = True
            row = {"budget": band.label, "spend_usd": spend, "size_class": group[0]["size_class"],
                   "model": model, "method": method, "catalogue_version": stamp.version, "catalogue_date": stamp.date}
            if buy is not None:
                row.update(buy_config=buy[0], buy_usd=buy[1], buy_tokens_per_s=buy[2],
                           buy_hours=job_tokens / buy[2] / 3600)
            if rent is not None:
                row.update(rent_config=f"{int(rent['num_gpus'])} x {rent['gpu']}",
                           rent_usd_per_million_tokens=rent["usd_per_million_tokens"], rent_tokens=rent_tokens,
                           rent_usd=rent["usd_per_million_tokens"] * job_tokens / TOKENS_PER_MILLION,
                           rent_hours=job_tokens / rent["throughput_tokens_per_s"] / 3600)
            rows.append(row)
        if not found:
            rows.append({"budget": band.label, "spend_usd": spend, "model": "nothing in the catalogue",
                         "catalogue_version": stamp.version, "catalogue_date": stamp.date})
    return [{column: row.get(column) for column in BUDGET_COLUMNS} for row in rows]


def budget_table(hardware, budgets=BUDGETS, **kwargs):
    """``budget_rows`` as a pandas DataFrame (the ``plan`` extra)."""
    return _frame(budget_rows(hardware, budgets, **kwargs), BUDGET_COLUMNS)


# -- open vs closed -----------------------------------------------------------------------------------------------
OPEN_CLOSED_COLUMNS = ("model", "option", "kind", "usd_per_million_tokens", "train_tokens", "epochs", "cost_usd",
                       "upfront_usd", "hours", "price_date", "source", "note", "catalogue_version", "catalogue_date")


def open_closed_rows(hardware, models, *, tokens: float = DEFAULT_REPORT_TOKENS, epochs: float = 1,
                     amortisation_years: float = DEFAULT_AMORTISATION_YEARS) -> list[dict]:
    """For each model, the same LoRA job (``tokens`` x ``epochs``) four ways: hosted fine-tuning of the open-weight
    model (data/hosted_finetuning.csv rows whose size bracket holds it), a closed model's hosted fine-tuning (a
    different model, for reference), renting (the cheapest GPU row per million tokens) and buying (the cluster the
    job needs at the lowest GPU + server + network price; its cost for the job is the straight-line share of the
    purchase over ``amortisation_years`` for the job's hours, the upfront price beside it). Hosted services bill
    tokens x epochs."""
    stamp = catalogue_stamp()
    rows = []
    hardware = _records(hardware)
    job_tokens = tokens * epochs
    for name in models:
        spec = get_model(name)
        lora = [r for r in hardware if r["model"] == spec.name and r["method"] == "lora" and _fits(r)]
        common = {"model": spec.name, "train_tokens": tokens, "epochs": epochs,
                  "catalogue_version": stamp.version, "catalogue_date": stamp.date}
        for price in hosted_prices():
            if price.model_access == "closed":
                kind, note = "hosted, closed model", f"{price.offering}: a different model, for reference"
            elif price.applies_to(spec.params / 1e9, resolve_setup(spec, method="lora").setup.method):
                kind, note = "hosted, open weights", price.offering
            else:
                continue
            rows.append({**common, "option": price.provider, "kind": kind,
                         "usd_per_million_tokens": price.usd_per_million_tokens,
                         "cost_usd": hosted_cost_usd(price, tokens, epochs), "price_date": price.price_date,
                         "source": price.source, "note": note})
        priced = [r for r in lora if not _missing(r.get("usd_per_million_tokens"))]
        rent = min(priced, key=lambda r: r["usd_per_million_tokens"], default=None)
        if rent is not None:
            rows.append({**common, "option": f"rent {int(rent['num_gpus'])} x {rent['gpu']}", "kind": "rent (on demand)",
                         "usd_per_million_tokens": rent["usd_per_million_tokens"],
                         "cost_usd": rent["usd_per_million_tokens"] * job_tokens / TOKENS_PER_MILLION,
                         "hours": job_tokens / rent["throughput_tokens_per_s"] / 3600,
                         "price_date": rent.get("price_date"),
                         "source": f"{rent.get('price_source')} (data/gpus.csv) x the step-time model's tokens/s"})
        buyable = [(cluster_cost_usd(r, int(r["num_gpus"])), r) for r in lora
                   if not _missing(r.get("throughput_tokens_per_s"))]
        buyable = [(cost, r) for cost, r in buyable if cost is not None]
        if buyable:
            cost, r = min(buyable, key=lambda item: item[0])
            hours = job_tokens / r["throughput_tokens_per_s"] / 3600
            share = cost * hours / (amortisation_years * HOURS_PER_YEAR)
            rows.append({**common, "option": f"buy {int(r['num_gpus'])} x {r['gpu']}", "kind": "buy",
                         "usd_per_million_tokens": share / job_tokens * TOKENS_PER_MILLION, "cost_usd": share,
                         "upfront_usd": cost, "hours": hours,
                         "price_date": "; ".join(f"{what} {date}" for what, date in
                                                 (("GPU", r.get("list_price_date")),
                                                  ("server", r.get("server_price_date"))) if not _missing(date))
                                       or None,
                         "source": f"{r.get('list_price_source')}; data/gpu_list_prices.csv server per GPU and "
                                   "network port",
                         "note": f"straight-line share over {amortisation_years:g} years for the job's hours; "
                                 "power not included"})
    return [{column: row.get(column) for column in OPEN_CLOSED_COLUMNS} for row in rows]


# -- the report ---------------------------------------------------------------------------------------------------
TABLE_COLUMNS = {"hardware": HARDWARE_COLUMNS, "techniques": TECHNIQUE_COLUMNS, "budgets": BUDGET_COLUMNS,
                 "open_vs_closed": OPEN_CLOSED_COLUMNS}


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
    """The four tables for the size classes plus ``models`` (the techniques and open-vs-closed tables for each of
    ``models``, or for ``DEFAULT_TECHNIQUES_MODEL``). ``options`` are TrainingSetup fields applied to every row (not
    ``method``); REPORT_METHOD_DEFAULTS fill what they leave out per method."""
    options = {key: value for key, value in options.items() if value is not None}
    if "method" in options:
        raise VramcalcError("report covers full, lora and qlora: leave --method out")
    tokens = positive_number(tokens, "token count")
    epochs = positive_number(epochs, "number of epochs")
    max_gpus = gpu_limit(max_gpus)
    chosen = [get_model(name) for name in models]
    everything = [get_model(cls.representative) for cls in SIZE_CLASSES] + chosen
    hardware = hardware_rows(everything, tokens=tokens, epochs=epochs, max_gpus=max_gpus, **options)
    focus = [spec.name for spec in chosen] or [DEFAULT_TECHNIQUES_MODEL]
    techniques = [row for name in focus for row in technique_rows(name, speed_gpu=speed_gpu, **options)]
    budget = budget_rows(hardware, budgets, tokens=tokens, epochs=epochs)
    hosted = open_closed_rows(hardware, focus, tokens=tokens, epochs=epochs)
    rows = {"hardware": hardware, "techniques": techniques, "budgets": budget, "open_vs_closed": hosted}
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


def settings_sentence(options: dict, model: str = DEFAULT_TECHNIQUES_MODEL) -> str:
    """The settings each method's rows really run with (resolved, every default filled in), in words."""
    spec = get_model(model)
    parts = []
    for method in REPORT_METHODS:
        inputs = estimate(spec, **method_options(options, method)).inputs
        text = describe_setup(inputs)
        if "batch_size" not in options:  # the hardware rows search it
            text = text.replace(f"batch {inputs['batch_size']} x ", "the largest micro-batch that fits x ")
        parts.append(text)
    return "; ".join(parts)


def render_markdown(tables: dict, tokens: float, epochs: float, options: dict, max_gpus: int) -> str:
    stamp = catalogue_stamp()
    given = ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "none (the estimator's defaults)"
    parts = [
        "# vramcalc reference tables",
        "",
        f"Catalogue {stamp.version}, prices up to {stamp.date}. Token budget {tokens:,.0f} tokens x {epochs:g} "
        f"epoch(s). Options given: {given}. Settings used: {settings_sentence(options)} (QLoRA rows checkpoint "
        f"unless grad_ckpt is given or the stack's preset sets it, as peft's prepare_model_for_kbit_training does). "
        f"{GIB_NOTE}. More than one GPU means FSDP full sharding; counts go 1, 2, 4, then whole nodes of 8, up to "
        f"{max_gpus}. Cloud prices are each GPU's reference on-demand $/GPU-hour in the catalogue (data/gpus.csv, "
        "dated and sourced in the CSV's price_date and price_source columns; spot and reserved rates per provider "
        "and region are in `vramcalc plan`'s CSV); 'no price' means the catalogue has none (never read it as 0). "
        "Time comes from the step-time model (vramcalc/step_time.py: matmuls and attention "
        "at achievable rates, memory-bound work at achievable memory bandwidth, host overhead, communication; "
        "benchmarks/throughput.md gives its error against published runs), or the model-FLOPs utilisation of the "
        "GPU generation where it has no rate.",
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
        "## Open vs closed: hosted fine-tuning beside renting and buying",
        "",
        _open_closed_markdown(_records(tables.get("open_vs_closed", [])), tokens, epochs),
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
            header += [f"{method} GPUs", f"{method} host RAM GiB", f"{method} tokens/s", f"{method} $/h",
                       f"{method} total"]
        rows = []
        for gpu, by_gpu in _grouped(frame, "gpu").items():
            row = [gpu]
            for method in REPORT_METHODS:
                match = [r for r in by_gpu if r["method"] == method]
                if not match or _missing(match[0]["fits"]) or not bool(match[0]["fits"]):
                    row += ["does not fit", "-", "-", "-", "-"]
                    continue
                r = match[0]
                row += [str(int(r["num_gpus"])), _number(r["host_ram_gib"], 0),
                        _number(r["throughput_tokens_per_s"], 0), _usd(r["rent_usd_per_hour"]), _total_cell(r)]
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
        baselines = list(dict.fromkeys(r["baseline"] for r in frame))
        out.append("Baseline (each row's 'without'): " + " | ".join(baselines) + ". Speed is tokens/s with the "
                   "technique / without it.")
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
    out = [f"Buy: the fastest cluster the band's spend buys (GPU list price + server share per GPU + one InfiniBand "
           f"port per GPU past one server; at most {MAX_BUY_GPUS} GPUs, {GPUS_PER_NODE} for workstation cards, whose "
           f"host is not priced), with its hours for the {tokens:,.0f}-token x {epochs:g} job (data-parallel scaling "
           "from the count the setup needs: an upper bound on speed). Rent: the cheapest on-demand $ per million "
           "training tokens, the tokens the band's spend trains at it, and the job's own cost. Each band is evaluated "
           "at its top (open bands at their floor).", ""]
    rows = []
    for r in budgets:
        if r["model"] == "nothing in the catalogue":
            rows.append([r["budget"], "nothing in the catalogue", "-", "-", "-"])
            continue
        buy = (f"{r['buy_config']} ({_usd(r['buy_usd'])}, {_number(r['buy_tokens_per_s'], 0)} tokens/s, "
               f"{_number(r['buy_hours'])} h)" if isinstance(r["buy_config"], str) else "-")
        rent = (f"{r['rent_config']} (${r['rent_usd_per_million_tokens']:,.2f}/M tokens: "
                f"{r['rent_tokens'] / 1e9:,.1f}B tokens; the job {_usd(r['rent_usd'])}, {_number(r['rent_hours'])} h)"
                if isinstance(r["rent_config"], str) else "-")
        rows.append([r["budget"], f"{r['model']} ({r['size_class']})", r["method"], buy, rent])
    out.append(markdown_table(["budget", "model", "method", "buy", "rent"], rows))
    out.append("")
    return "\n".join(out)


def _open_closed_markdown(rows, tokens: float, epochs: float) -> str:
    out = [f"The same LoRA job, {tokens:,.0f} tokens x {epochs:g} epoch(s): hosted services bill tokens x epochs; "
           "a closed model is a different model, shown for reference; buy is the purchase's straight-line share for "
           "the job's hours (upfront price beside it, power not included).", ""]
    for model, frame in _grouped(rows, "model").items():
        out.append(f"### {model}")
        out.append("")
        table = [[r["option"], r["kind"], f"${r['usd_per_million_tokens']:,.2f}", _usd(r["cost_usd"]),
                  _usd(r["upfront_usd"]) if not _missing(r["upfront_usd"]) else "-", _number(r["hours"]),
                  r["price_date"] or "-"] for r in frame]
        out.append(markdown_table(["option", "kind", "$ per million tokens", "cost", "upfront", "hours",
                                   "price date"], table))
        out.append("")
    return "\n".join(out)
