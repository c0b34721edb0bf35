"""plan, max_batch_size and sweep: from one memory estimate to a hardware decision, and to many at once.

``plan`` answers, for a model and setup, for every catalogue GPU: the smallest GPU count that fits (sharded with
FSDP, or the given sharding, when more than one), the largest micro-batch at that count, the host RAM, the time for
a token budget and what it costs to rent, buy and power; beside them, hosted fine-tuning services' prices for the same
tokens. Every memory figure is an ``estimate()``; every price comes from the catalogue with its date.

``sweep`` evaluates a grid of setups (100,000+) with numpy: rows are grouped by their categorical part (model, method,
precision, ...) and each group's batch sizes and sequence lengths go through ``peak_tensor_bytes_grid`` at once.

pandas and numpy are imported inside the functions that return or use them: importing this module stays light.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import math
from dataclasses import dataclass

from .breakdown import MemoryBreakdown
from .catalogue import GpuSpec, data_dir, get_gpu, get_model, gpus
from .cost import (
    DEFAULT_AMORTISATION_YEARS,
    DEFAULT_USD_PER_KWH,
    amortised_buy_cost_usd,
    buy_cost_usd,
    eager_attention_seconds_per_token,
    energy_cost_usd,
    energy_kwh,
    hosted_cost_usd,
    hosted_prices,
    job_utilisation,
    matmul_dtype,
    peak_flop_per_s,
    rent_cost_usd,
    training_flops,
    training_time,
)
from .errors import VramcalcError, positive_int, positive_number
from .estimator import estimate, peak_tensor_bytes_grid
from .model import ModelSpec
from .options import Choice, Method, Offload, Optimizer, Sharding, Term
from .profiles import runtime_profile
from .spreadsheet import safe_cell
from .terms import runtime
from .terms.distributed import DEEPSPEED_HOST_BUFFER_FACTOR, DEEPSPEED_HOST_BYTES_PER_PARAM, host_offload_bytes_per_node
from .terms.optimizer import optimizer_state_bytes
from .terms.parameters import stored_tensors
from .training_setup import (
    METHOD_SPECIFIC_OPTIONS,
    OFFLOAD_OPTIMIZERS,
    ResolvedSetup,
    TrainingSetup,
    options_for,
    resolve_setup,
)
from .units import BYTES_PER_GIB

DEFAULT_MAX_GPUS = 512
GPUS_PER_NODE = 8  # an HGX/DGX node; more GPUs are counted in nodes of eight
MAX_MICRO_BATCH = 65536  # the largest micro-batch max_batch_size looks for
DEFAULT_MULTI_GPU_SHARDING = Sharding.FSDP  # full sharding (ZeRO-3 equivalent) when one GPU is not enough
RANK_BY = ("cost", "time")

# DeepSpeed's host-memory rule for ZeRO-Offload (runtime/zero/stage_1_and_2.py
# ``estimate_zero2_model_states_mem_needs``): 16 bytes per parameter (fp32 master weights, gradients and two Adam
# moments) times ``additional_buffer_factor`` 1.5 (the constants live with the other engines' in terms/distributed.py).
OFFLOAD_HOST_BYTES_PER_PARAM = DEEPSPEED_HOST_BYTES_PER_PARAM[Offload.OPTIMIZER]
DEEPSPEED_BUFFER_FACTOR = DEEPSPEED_HOST_BUFFER_FACTOR
OFFLOADABLE_OPTIMIZERS = OFFLOAD_OPTIMIZERS  # DeepSpeedCPUAdam replaces torch AdamW

COUNT_COLUMNS = ("seq_len", "num_gpus", "micro_batch")  # integers, empty where they do not apply (nullable)
TERM_COLUMNS = tuple(f"{term.value}_gib" for term in Term)
PLAN_COLUMNS = (
    "rank", "offer", "model", "method", "precision", "optimizer", "seq_len", "grad_ckpt", "attn", "matmul_dtype",
    "gpu", "gpu_memory_gib", "num_gpus", "sharding", "micro_batch", "fits", "device_gib", "headroom_gib", "phase",
    *TERM_COLUMNS,
    "host_ram_gib", "host_loading_gib", "host_offload_gib", "host_paged_optimizer_gib",
    "train_tokens", "epochs", "model_flop_per_token", "hardware_flop_per_token", "mfu", "mfu_source",
    "throughput_tokens_per_s", "train_hours", "gpu_hours",
    "rent_usd_per_gpu_hour", "rent_usd_per_hour", "rent_usd", "buy_usd", "buy_amortised_usd", "amortisation_years",
    "energy_kwh", "usd_per_kwh", "energy_usd", "cost_usd",
    "provider", "hosted_usd_per_million_tokens", "price_date", "price_source",
    "note", "catalogue_version", "catalogue_date",
)


# -- catalogue stamp ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CatalogueStamp:
    """Which catalogue a plan was made from: the package version plus a hash of the data files, and the newest
    price date in them."""

    version: str
    date: str


CATALOGUE_FILES = ("gpus.csv", "models.csv", "hosted_finetuning.csv")


@functools.cache
def catalogue_stamp() -> CatalogueStamp:
    from . import __version__  # here, not at import: vramcalc/__init__ may import this module before defining it

    digest = hashlib.sha256()
    for name in CATALOGUE_FILES:
        digest.update((data_dir() / name).read_bytes())
    dates = [g.cloud_price_date for g in gpus() if g.cloud_price_date]
    dates += [price.price_date for price in hosted_prices() if price.price_date]
    return CatalogueStamp(f"{__version__}+{digest.hexdigest()[:12]}", max(dates))


# -- option handling ----------------------------------------------------------------------------------------------
def applicable_options(options: dict) -> dict:
    """The options that apply to the setup's method: resolve_setup rejects LoRA options with --method full and the
    like (training_setup._reject_foreign_options); a grid crossing methods with LoRA ranks drops them where foreign."""
    method = Method.parse(options.get("method") or Method.FULL, "method")
    foreign = set(METHOD_SPECIFIC_OPTIONS) - set(options_for(method))
    return {key: value for key, value in options.items() if key not in foreign}


def _count(value, what: str) -> int:
    """A count: first any positive number (the plan's wording), then a whole one."""
    return positive_int(positive_number(value, what), what)


def gpu_counts(max_gpus: int) -> list[int]:
    """GPU counts a plan tries: 1, 2, 4, 8, then whole nodes of eight, up to ``max_gpus``."""
    top = _count(max_gpus, "maximum number of GPUs")
    counts = [n for n in (1, 2, 4) if n <= top]
    counts += list(range(GPUS_PER_NODE, top + 1, GPUS_PER_NODE))
    if counts[-1] != top:
        counts.append(top)
    return counts


# -- device memory ------------------------------------------------------------------------------------------------
def device_bytes(breakdown: MemoryBreakdown, offload_optimizer: bool = False) -> int:
    """What the GPU must hold. With the optimizer offloaded to the host (ZeRO-Offload), its states leave every moment
    of the step, and the allocator slack shrinks with the tensor peak; the other moments stay as estimated."""
    if not offload_optimizer:
        return breakdown.total_bytes
    states = breakdown.terms_bytes[Term.OPTIMIZER_STATES]
    profile = runtime_profile(breakdown.gpu)
    peak = breakdown.peak_tensor_bytes - states
    return peak + breakdown.terms_bytes[Term.RUNTIME_OVERHEAD] + runtime.allocator_slack_bytes(profile, peak)


def _check_offload(optimizer, offload_optimizer: bool) -> None:
    if offload_optimizer and Optimizer.parse(optimizer or Optimizer.ADAMW, "optimizer") not in OFFLOADABLE_OPTIMIZERS:
        raise VramcalcError(
            f"optimizer offload moves torch AdamW states to the host (DeepSpeedCPUAdam); {optimizer!r} cannot be "
            "offloaded (paged optimizers page to the host by themselves)"
        )


def _fits(breakdown: MemoryBreakdown, gpu: GpuSpec, offload_optimizer: bool) -> bool:
    return device_bytes(breakdown, offload_optimizer) <= gpu.memory_bytes


def _sharding_for(count: int, sharding) -> str:
    if count == 1:
        return Sharding.NONE.value
    chosen = Sharding.parse(sharding, "sharding") if sharding is not None else DEFAULT_MULTI_GPU_SHARDING
    return (DEFAULT_MULTI_GPU_SHARDING if chosen is Sharding.NONE else chosen).value


def smallest_gpu_count(model, gpu, *, max_gpus: int = DEFAULT_MAX_GPUS, offload_optimizer: bool = False,
                       **options) -> tuple[int, MemoryBreakdown] | None:
    """The fewest GPUs (1, 2, 4, 8, then whole nodes) on which the setup fits, with its breakdown; None when even
    ``max_gpus`` are not enough. Above one GPU the memory per GPU only falls as GPUs are added, so the counts are
    bisected. ``num_gpus`` in ``options`` pins the count."""
    spec, device = get_model(model), get_gpu(gpu)
    _check_offload(options.get("optimizer"), offload_optimizer)
    sharding = options.pop("sharding", None)
    pinned = options.pop("num_gpus", None)
    counts = [_count(pinned, "number of GPUs")] if pinned is not None else gpu_counts(max_gpus)

    def attempt(count: int) -> MemoryBreakdown:
        return estimate(spec, gpu=device, num_gpus=count, sharding=_sharding_for(count, sharding), **options)

    first = attempt(counts[0])
    if _fits(first, device, offload_optimizer):
        return counts[0], first
    low, high = 1, len(counts)  # counts[low:high] are untried; the answer is the first that fits
    found = None
    while low < high:
        middle = (low + high) // 2
        breakdown = attempt(counts[middle])
        if _fits(breakdown, device, offload_optimizer):
            found, high = (counts[middle], breakdown), middle
        else:
            low = middle + 1
    return found


def max_batch_size(model, gpu, *, offload_optimizer: bool = False, limit: int = MAX_MICRO_BATCH, **options) -> int:
    """The largest micro-batch (sequences per GPU) whose step fits the GPU; 0 when not even one sequence fits.

    Vectorised: the tensor peaks of batch sizes 1, 2, 4, ... bracket the answer, then every size in the bracket is
    evaluated at once (``peak_tensor_bytes_grid``); runtime overhead does not depend on the batch, allocator slack is
    its calibrated fraction of the peak. The answer is confirmed with ``estimate()`` itself.
    """
    import numpy

    if "batch_size" in options:
        raise VramcalcError("max_batch_size searches the batch size: leave --batch-size out")
    spec, device = get_model(model), get_gpu(gpu)
    top = _count(limit, "micro-batch limit")
    _check_offload(options.get("optimizer"), offload_optimizer)
    resolved = resolve_setup(spec, **options)
    base = estimate(spec, gpu=device, **options)
    if not _fits(base, device, offload_optimizer):
        return 0
    removed = base.terms_bytes[Term.OPTIMIZER_STATES] if offload_optimizer else 0
    overhead = base.terms_bytes[Term.RUNTIME_OVERHEAD]
    fraction = runtime_profile(device).allocator_slack_fraction

    def fitting(batch_sizes):
        peak, _ = peak_tensor_bytes_grid(spec, resolved, batch_sizes, resolved.setup.seq_len)
        peak = peak - removed
        total = peak + overhead + numpy.floor(fraction * peak).astype(numpy.int64)
        return total <= device.memory_bytes

    powers = numpy.unique(numpy.minimum(2 ** numpy.arange(0, top.bit_length() + 1, dtype=numpy.int64), top))
    fit = fitting(powers)
    low = int(powers[fit].max()) if fit.any() else 1  # batch 1 fits: estimate() said so above
    if low < top:
        bracket = numpy.arange(low, min(2 * low, top) + 1, dtype=numpy.int64)
        low = int(bracket[fitting(bracket)].max())
    while low > 0 and not _fits(estimate(spec, gpu=device, batch_size=low, **options), device, offload_optimizer):
        low -= 1  # the scalar estimate is the reference; the grid agrees with it by construction
    return low


# -- host RAM -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostRam:
    """Host memory one node needs (bytes)."""

    loading_bytes: int  # the checkpoint as loaded, once per process that loads it
    offload_bytes: int  # optimizer states, master weights and gradients offloaded to the host
    paged_optimizer_bytes: int  # bitsandbytes paged states, when evicted from the GPU

    @property
    def total_bytes(self) -> int:
        return self.loading_bytes + self.offload_bytes + self.paged_optimizer_bytes


def host_ram(spec: ModelSpec, resolved: ResolvedSetup, breakdown: MemoryBreakdown,
             offload_optimizer: bool = False) -> HostRam:
    """Host RAM per node of ``GPUS_PER_NODE`` GPUs.

    loading: the checkpoint in its load dtype (16-bit for QLoRA, which quantizes on the GPU) passes through host
      memory (page cache of the memory-mapped safetensors, then the tensors themselves): counted once per process
      that loads the full model: once per node under zero3/fsdp (rank 0 with ``cpu_ram_efficient_loading``,
      ``deepspeed.zero.Init``), once per GPU otherwise (assumption; an upper bound that keeps the node out of swap).
    offload: 16 B per trainable parameter × 1.5, split over the nodes (DeepSpeed ZeRO-Offload estimator).
    paged: each GPU's paged optimizer states, all evicted at once.
    """
    setup = resolved.setup
    gpus_per_node = min(setup.num_gpus, GPUS_PER_NODE)
    nodes = -(-setup.num_gpus // GPUS_PER_NODE)
    load_bytes_per_param = 2 if setup.method is Method.QLORA else setup.precision.param_dtype.bits // 8
    loaders = 1 if setup.sharding in (Sharding.ZERO3, Sharding.FSDP) else gpus_per_node
    loading = spec.params * load_bytes_per_param * loaders
    offload = 0
    if offload_optimizer:
        trainable = breakdown.details["trainable_params"]
        offload = math.ceil(OFFLOAD_HOST_BYTES_PER_PARAM * trainable * DEEPSPEED_BUFFER_FACTOR / nodes)
    if setup.offload is not Offload.NONE:  # the setup's own --offload (terms/distributed.py)
        offload = host_offload_bytes_per_node(spec, resolved)
    paged = breakdown.details["paged_optimizer_bytes"] * gpus_per_node
    return HostRam(loading, offload, paged)


# -- plan ---------------------------------------------------------------------------------------------------------
def plan(model, *, tokens, epochs=1, gpus_to_try=None, max_gpus: int = DEFAULT_MAX_GPUS, rank_by: str = "cost",
         usd_per_kwh: float = DEFAULT_USD_PER_KWH, amortisation_years: float = DEFAULT_AMORTISATION_YEARS,
         mfu: float | None = None, offload_optimizer: bool = False, hosted: bool = True, **options):
    """One row per catalogue GPU (and per matching hosted service), ranked by cost or time; a pandas DataFrame.

    ``tokens`` is the dataset size in tokens, trained ``epochs`` times. ``options`` are the TrainingSetup fields;
    a given ``batch_size`` or ``num_gpus`` is kept, otherwise the largest micro-batch and the smallest count are
    found. ``frame.attrs["summary"]`` says in one line what fits, or plainly that nothing does.
    """
    import pandas

    spec = get_model(model)
    tokens = positive_number(tokens, "token count")
    epochs = positive_number(epochs, "number of epochs")
    positive_number(usd_per_kwh, "electricity price ($/kWh)")
    positive_number(amortisation_years, "amortisation horizon (years)")
    limit = _count(options["num_gpus"], "number of GPUs") if options.get("num_gpus") is not None else max(
        gpu_counts(max_gpus))
    if rank_by not in RANK_BY:
        raise VramcalcError(f"unknown ranking {rank_by!r}; choose one of: {', '.join(RANK_BY)}")
    devices = [get_gpu(name) for name in gpus_to_try] if gpus_to_try else gpus()
    if not devices:
        raise VramcalcError("no GPUs to plan for")
    options = {key: value for key, value in options.items() if value is not None}
    resolve_setup(spec, **options)  # bad options fail once, before any GPU is tried
    stamp = catalogue_stamp()
    prices = dict(usd_per_kwh=usd_per_kwh, amortisation_years=amortisation_years)
    rows = [_gpu_row(spec, device, tokens, epochs, max_gpus, mfu, offload_optimizer, prices, dict(options))
            for device in devices]
    if hosted:
        rows += _hosted_rows(spec, tokens, epochs, options)
    for row in rows:
        row["catalogue_version"], row["catalogue_date"] = stamp.version, stamp.date
    frame = pandas.DataFrame(rows, columns=list(PLAN_COLUMNS))
    for column in COUNT_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    frame["fits"] = frame["fits"].astype("boolean")
    frame["grad_ckpt"] = frame["grad_ckpt"].astype("boolean")
    frame = rank_plan(frame, rank_by)
    frame.attrs["summary"] = plan_summary(frame, spec, limit, rank_by)
    frame.attrs["catalogue_version"], frame.attrs["catalogue_date"] = stamp.version, stamp.date
    return frame


def _setup_columns(spec: ModelSpec, resolved: ResolvedSetup) -> dict:
    setup = resolved.setup
    return {
        "model": spec.name, "method": setup.method.value, "precision": setup.precision.value,
        "optimizer": setup.optimizer.value, "seq_len": setup.seq_len, "grad_ckpt": setup.grad_ckpt,
        "attn": resolved.attn_used.value, "matmul_dtype": matmul_dtype(resolved),
    }


def _gpu_row(spec, device, tokens, epochs, max_gpus, mfu, offload_optimizer, prices, options) -> dict:
    """Fit, batch, time and cost of the setup on one GPU type."""
    pinned_batch = options.pop("batch_size", None)
    fixed = dict(options, batch_size=pinned_batch) if pinned_batch is not None else options
    row = {"offer": "gpu", "gpu": device.name, "gpu_memory_gib": device.memory_bytes / BYTES_PER_GIB,
           "train_tokens": tokens, "epochs": epochs, "price_date": device.cloud_price_date or None,
           "price_source": device.cloud_price_basis or None, **prices}
    row.update(_setup_columns(spec, resolve_setup(spec, **fixed)))
    found = smallest_gpu_count(spec, device, max_gpus=max_gpus, offload_optimizer=offload_optimizer, **fixed)
    if found is None:
        limit = options.get("num_gpus") or max_gpus
        row.update(fits=False, note=f"does not fit on {limit} x {device.name}")
        return row
    count, breakdown = found
    at_count = dict(options, num_gpus=count, sharding=breakdown.inputs["sharding"])
    batch = pinned_batch or max_batch_size(spec, device, offload_optimizer=offload_optimizer, **at_count)
    breakdown = estimate(spec, gpu=device, batch_size=batch, **at_count)
    resolved = resolve_setup(spec, batch_size=batch, **at_count)
    used = device_bytes(breakdown, offload_optimizer)
    host = host_ram(spec, resolved, breakdown, offload_optimizer)
    row.update(_setup_columns(spec, resolved))
    row.update(
        fits=True, num_gpus=count, sharding=resolved.setup.sharding.value, micro_batch=batch,
        device_gib=used / BYTES_PER_GIB, headroom_gib=(device.memory_bytes - used) / BYTES_PER_GIB,
        phase=breakdown.phase.value,
        host_ram_gib=host.total_bytes / BYTES_PER_GIB, host_loading_gib=host.loading_bytes / BYTES_PER_GIB,
        host_offload_gib=host.offload_bytes / BYTES_PER_GIB,
        host_paged_optimizer_gib=host.paged_optimizer_bytes / BYTES_PER_GIB,
    )
    terms = breakdown.terms()
    if offload_optimizer:
        terms[Term.OPTIMIZER_STATES.value] = 0
        terms[Term.ALLOCATOR_SLACK.value] = used - sum(value for key, value in terms.items()
                                                       if key != Term.ALLOCATOR_SLACK.value)
    row.update({f"{term}_gib": value / BYTES_PER_GIB for term, value in terms.items()})
    row.update(_time_and_cost(spec, resolved, device, tokens, epochs, mfu, prices))
    return row


def _time_and_cost(spec, resolved, device, tokens, epochs, mfu, prices) -> dict:
    """Hours, throughput and the rent / buy / energy bill; no time (and so no cost) when the GPU lacks the dtype."""
    setup = resolved.setup
    flops = training_flops(spec, resolved)
    dtype = matmul_dtype(resolved)
    peak = peak_flop_per_s(device, dtype)
    n = setup.num_gpus
    price = device.cloud_usd_per_gpu_hour
    out = {"model_flop_per_token": flops.model_flop_per_token, "hardware_flop_per_token": flops.hardware_flop_per_token,
           "rent_usd_per_gpu_hour": price, "rent_usd_per_hour": None if price is None else price * n,
           "buy_usd": buy_cost_usd(device.list_price_usd, n)}
    if peak is None:
        out["note"] = f"{device.name} has no {dtype} matmuls: no time or cost (try another --precision)"
        return out
    utilisation = job_utilisation(device, setup.method, mfu)
    time = training_time(flops, tokens, epochs, setup.num_gpus, peak, utilisation.mfu,
                         eager_attention_seconds_per_token(spec, resolved, device))
    kwh = energy_kwh(device.tdp_w, n, time.hours)
    rent = rent_cost_usd(price, n, time.hours)
    notes = []
    if device.cloud_usd_per_gpu_hour is None:
        notes.append("no cloud price in the catalogue")
    if device.list_price_usd is None:
        notes.append("no list price in the catalogue")
    out.update(
        mfu=utilisation.mfu, mfu_source=utilisation.source, throughput_tokens_per_s=time.tokens_per_s,
        train_hours=time.hours, gpu_hours=time.gpu_hours, rent_usd=rent, cost_usd=rent,
        buy_amortised_usd=amortised_buy_cost_usd(device.list_price_usd, n, time.hours, prices["amortisation_years"]),
        energy_kwh=kwh, energy_usd=energy_cost_usd(kwh, prices["usd_per_kwh"]),
        note="; ".join(notes) or None,
    )
    return out


def _hosted_rows(spec: ModelSpec, tokens: float, epochs: float, options: dict) -> list[dict]:
    """Hosted services whose open-weight size bracket and training kind match the model and method."""
    resolved = resolve_setup(spec, **options)
    method = resolved.setup.method
    rows = []
    for price in hosted_prices():
        if not price.applies_to(spec.params / 1e9, method):
            continue
        row = {"offer": "hosted", "provider": price.provider, "model": spec.name, "method": method.value,
               "train_tokens": tokens, "epochs": epochs,
               "hosted_usd_per_million_tokens": price.usd_per_million_tokens,
               "cost_usd": hosted_cost_usd(price, tokens, epochs), "price_date": price.price_date,
               "price_source": price.source, "note": price.offering}
        rows.append(row)
    return rows


def rank_plan(frame, rank_by: str = "cost"):
    """Rows that can run, cheapest (or fastest) first, ranked 1..k; then rows without that figure; then rows that
    do not fit. Ties go to the other figure."""
    import pandas

    first, second = ("cost_usd", "train_hours") if rank_by == "cost" else ("train_hours", "cost_usd")
    runnable = frame["fits"].fillna(True).astype(bool)
    has_metric = frame[first].notna() & runnable
    order = frame.assign(_group=(~has_metric).astype(int) + (~runnable).astype(int))
    order = order.sort_values(["_group", first, second], kind="stable", na_position="last").drop(columns="_group")
    ranked = has_metric.loc[order.index].to_numpy()
    order = order.reset_index(drop=True)
    order["rank"] = pandas.array([i + 1 if ok else None for i, ok in enumerate(ranked)], dtype="Int64")
    order.attrs = dict(frame.attrs)
    return order


def plan_summary(frame, spec: ModelSpec, gpu_limit: int, rank_by: str) -> str:
    """One line: the best option, or plainly that nothing in the catalogue fits."""
    gpu_rows = frame[frame["offer"] == "gpu"]
    fitting = gpu_rows[gpu_rows["fits"].astype(bool)]
    if fitting.empty:
        return (f"nothing in the catalogue fits {spec.name} with this setup, even on {gpu_limit} GPUs of any type "
                f"({len(gpu_rows)} tried)")
    best = frame[frame["rank"] == 1]
    if best.empty:
        return f"{len(fitting)} of {len(gpu_rows)} GPU types fit {spec.name}; none has a price to rank by {rank_by}"
    row = best.iloc[0]
    metric = f"${row['cost_usd']:,.0f}" if rank_by == "cost" else f"{row['train_hours']:,.1f} h"
    if row["offer"] == "hosted":
        what = f"hosted by {row['provider']}"
    else:
        what = f"{int(row['num_gpus'])} x {row['gpu']}, micro-batch {int(row['micro_batch'])}"
    return f"{len(fitting)} of {len(gpu_rows)} GPU types fit {spec.name}; best by {rank_by}: {what} ({metric})"


# -- output -------------------------------------------------------------------------------------------------------
def _cell(value):
    """A spreadsheet cell: empty for missing values (never 0), numbers as numbers, text escaped (safe_cell)."""
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
        return _cell(value.item())
    return safe_cell(value)


def frame_csv(frame) -> str:
    """CSV text of a DataFrame: its column order, every cell through ``_cell``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([safe_cell(str(column)) for column in frame.columns])
    for row in frame.itertuples(index=False, name=None):
        writer.writerow([_cell(value) for value in row])
    return buffer.getvalue()


def write_csv(frame, path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write(frame_csv(frame))


def frame_records(frame) -> list[dict]:
    """JSON-ready rows: missing values as null."""
    return [{column: (None if _cell(value) == "" and not isinstance(value, str) else _json_value(value))
             for column, value in zip(frame.columns, row)} for row in frame.itertuples(index=False, name=None)]


def _json_value(value):
    if hasattr(value, "item"):
        return value.item()
    return value


PLAN_TABLE_COLUMNS = ("rank", "offer", "gpu", "provider", "num_gpus", "micro_batch", "device_gib", "host_ram_gib",
                      "train_hours", "rent_usd", "buy_usd", "energy_kwh", "cost_usd", "note")


def plan_table(frame) -> str:
    """A compact plain-text view of a plan (GiB = 2^30 bytes; '-' where a figure does not apply or is unknown)."""
    from .cli import _table

    columns = [c for c in PLAN_TABLE_COLUMNS if c in frame.columns]
    rows = [{c: _display(row[c], c) for c in columns} for _, row in frame.iterrows()]
    return _table(rows, columns).rstrip("\n")


def _display(value, column: str) -> str:
    value = _cell(value)
    if value == "":
        return "-"
    if isinstance(value, float):
        if column.endswith("_usd"):
            return f"{value:,.0f}"
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


# -- CLI verbs (the parsers are in cli.py) --------------------------------------------------------------------
def _given(args, *names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def plan_command(args, fmt: str) -> str:
    """``vramcalc plan``: the plan as a table (with its one-line summary), JSON or CSV; ``--output`` writes the CSV."""
    import json
    import sys

    from .cli import setup_kwargs

    options = setup_kwargs(args)
    for warning in resolve_setup(get_model(args.model), **options).warnings:
        sys.stderr.write(f"warning: {warning}\n")
    kwargs = _given(args, "epochs", "max_gpus", "rank_by", "mfu", "usd_per_kwh", "amortisation_years")
    if args.gpus:
        kwargs["gpus_to_try"] = [name.strip() for name in args.gpus.split(",") if name.strip()]
    frame = plan(args.model, tokens=args.tokens, offload_optimizer=args.offload_optimizer, hosted=args.hosted,
                 **kwargs, **options)
    summary = frame.attrs["summary"]
    if args.output:
        write_csv(frame, args.output)
    if fmt == "json":
        return json.dumps({"summary": summary, "catalogue_version": frame.attrs["catalogue_version"],
                           "catalogue_date": frame.attrs["catalogue_date"], "rows": frame_records(frame)},
                          indent=2) + "\n"
    if fmt == "csv":
        return "" if args.output else frame_csv(frame)
    stamp = catalogue_stamp()
    lines = [summary, "", plan_table(frame), "",
             f"(GiB = 2^30 bytes; $ from catalogue {stamp.version}, prices up to {stamp.date}; '-' = none, never 0)"]
    if args.output:
        lines.append(f"wrote {args.output} ({len(frame)} rows)")
    return "\n".join(lines) + "\n"


def max_batch_command(args, fmt: str) -> str:
    """``vramcalc max-batch``: the largest micro-batch on one GPU, or that not even one sequence fits."""
    import json

    from .cli import setup_kwargs

    options = setup_kwargs(args)
    if "batch_size" in options:
        raise VramcalcError("max-batch searches the batch size: leave --batch-size out")
    spec, device = get_model(args.model), get_gpu(args.gpu)
    batch = max_batch_size(spec, device, offload_optimizer=args.offload_optimizer, **options)
    at = estimate(spec, gpu=device, batch_size=max(batch, 1), **options)
    used = device_bytes(at, args.offload_optimizer)
    row = {"model": spec.name, "gpu": device.name, "seq_len": at.inputs["seq_len"], "max_batch_size": batch,
           "device_bytes": used, "gpu_memory_bytes": device.memory_bytes}
    if fmt == "json":
        return json.dumps(row, indent=2) + "\n"
    if fmt == "csv":
        import pandas

        return frame_csv(pandas.DataFrame([row]))
    if batch == 0:
        return (f"{spec.name} does not fit on one {device.name} even at micro-batch 1: it needs "
                f"{used / BYTES_PER_GIB:.2f} GiB of {device.memory_gib:.2f} GiB (GiB = 2^30 bytes)\n")
    return (f"{spec.name} on {device.name}: largest micro-batch {batch} at seq_len {row['seq_len']}, using "
            f"{used / BYTES_PER_GIB:.2f} GiB of {device.memory_gib:.2f} GiB (GiB = 2^30 bytes)\n")


# -- sweep --------------------------------------------------------------------------------------------------------
NUMERIC_AXES = ("batch_size", "seq_len")
SWEEP_KEYS = ("model", "gpu") + tuple(TrainingSetup.__dataclass_fields__)


def _grid_frame(grid):
    """A DataFrame of setups: a dict of lists is crossed (every combination), a DataFrame or list of dicts is taken
    row by row."""
    import pandas

    if isinstance(grid, pandas.DataFrame):
        frame = grid.reset_index(drop=True).copy()
    elif isinstance(grid, dict):
        axes = {key: list(values) if isinstance(values, (list, tuple, range)) or hasattr(values, "__array__")
                else [values] for key, values in grid.items()}
        empty = [key for key, values in axes.items() if not values]
        if empty:
            raise VramcalcError(f"sweep axis {empty[0]!r} has no values")
        frame = pandas.MultiIndex.from_product(list(axes.values()), names=list(axes)).to_frame(index=False)
    else:
        frame = pandas.DataFrame(list(grid))
    unknown = [column for column in frame.columns if column not in SWEEP_KEYS]
    if unknown:
        raise VramcalcError(f"unknown sweep column {unknown[0]!r}; columns are: {', '.join(SWEEP_KEYS)}")
    if "model" not in frame.columns:
        raise VramcalcError("a sweep needs a 'model' column")
    return frame


def sweep(grid):
    """Peak and total device memory of every setup in ``grid`` (a dict of lists to cross, or a DataFrame / list of
    dicts, one setup per row), as a DataFrame: the inputs, then ``peak_tensor_bytes``, ``phase``,
    ``runtime_overhead_bytes``, ``allocator_slack_bytes``, ``total_bytes``, ``total_gib`` and, with a ``gpu`` column,
    ``gpu_memory_bytes`` and ``fits``. Each figure equals ``estimate()``'s for that setup. A setup that cannot be
    estimated gets its one-line reason in ``error`` and no figures; options foreign to a row's method are ignored."""
    import numpy
    import pandas

    frame = _grid_frame(grid)
    size = len(frame)
    axes = {}
    for axis, default in (("batch_size", 1), ("seq_len", TrainingSetup.seq_len)):
        values = pandas.to_numeric(frame[axis], errors="coerce") if axis in frame.columns else pandas.Series(
            numpy.full(size, default))
        axes[axis] = values.to_numpy(dtype=float, na_value=numpy.nan)
    peak = numpy.zeros(size, dtype=numpy.int64)
    overhead = numpy.zeros(size, dtype=numpy.int64)
    slack = numpy.zeros(size, dtype=numpy.int64)
    memory = numpy.zeros(size, dtype=numpy.int64)
    phase = numpy.full(size, None, dtype=object)
    error = numpy.full(size, None, dtype=object)
    valid = numpy.ones(size, dtype=bool)
    for axis, what in (("batch_size", "batch size"), ("seq_len", "sequence length")):
        bad = ~(numpy.isfinite(axes[axis]) & (axes[axis] > 0) & (numpy.mod(axes[axis], 1) == 0))
        error[bad & valid] = f"{what} must be a positive integer"
        valid &= ~bad
    keys = [c for c in frame.columns if c not in NUMERIC_AXES + ("gpu",)]
    groups = frame.groupby(keys, dropna=False, sort=False).indices
    gpu_column = frame["gpu"].to_numpy(dtype=object) if "gpu" in frame.columns else None
    for key, positions in groups.items():
        key = key if isinstance(key, tuple) else (key,)
        rows = positions[valid[positions]]
        if len(rows) == 0:
            continue
        try:
            spec, resolved, paged = _sweep_group(dict(zip(keys, key)), axes, rows)
            b = axes["batch_size"][rows].astype(numpy.int64)
            s = axes["seq_len"][rows].astype(numpy.int64)
            peaks, phases = peak_tensor_bytes_grid(spec, resolved, b, s)
            names = gpu_column[rows] if gpu_column is not None else numpy.full(len(rows), None, dtype=object)
            for mask, device in _gpu_parts(names):
                where = rows[mask]
                profile = runtime_profile(device)
                peak[where] = peaks[mask]
                phase[where] = phases[mask]
                overhead[where] = runtime.runtime_overhead_bytes(profile, device, resolved.setup.num_gpus, paged)
                slack[where] = numpy.floor(profile.allocator_slack_fraction * peaks[mask]).astype(numpy.int64)
                memory[where] = device.memory_bytes if device is not None else 0
        except VramcalcError as err:
            error[rows] = str(err)
            valid[rows] = False
    out = frame.copy()
    total = peak + overhead + slack
    for column, values in (("peak_tensor_bytes", peak), ("runtime_overhead_bytes", overhead),
                           ("allocator_slack_bytes", slack), ("total_bytes", total)):
        out[column] = pandas.array(numpy.where(valid, values, 0), dtype="Int64")
        out.loc[~valid, column] = pandas.NA
    out["phase"] = numpy.where(valid, phase, None)
    out["total_gib"] = numpy.where(valid, total / BYTES_PER_GIB, numpy.nan)
    if gpu_column is not None:
        out["gpu_memory_bytes"] = pandas.array(numpy.where(valid, memory, 0), dtype="Int64")
        out.loc[~valid, "gpu_memory_bytes"] = pandas.NA
        out["fits"] = pandas.array(numpy.where(valid, total <= memory, False), dtype="boolean")
        out.loc[~valid, "fits"] = pandas.NA
    out["error"] = error
    return out


def _gpu_parts(names):
    """(mask, GpuSpec or None) for each distinct GPU name among a group's rows (missing names: no GPU)."""
    import numpy

    missing = numpy.array([name is None or name != name for name in names], dtype=bool)
    if missing.any():
        yield missing, None
    for name in dict.fromkeys(names[~missing]):
        yield (names == name) & ~missing, get_gpu(name)


def _sweep_group(categorical: dict, axes: dict, rows) -> tuple[ModelSpec, ResolvedSetup, int]:
    """The model, resolved setup (at the group's first batch shape) and paged optimizer bytes of one group."""
    model = categorical.pop("model")
    if model is None or model != model:
        raise VramcalcError("model is missing")
    options = {key: value for key, value in categorical.items() if value is not None and value == value}
    options = applicable_options(options)
    spec = get_model(model)
    first = rows[0]
    resolved = resolve_setup(spec, batch_size=int(axes["batch_size"][first]), seq_len=int(axes["seq_len"][first]),
                             **options)
    paged = optimizer_state_bytes(stored_tensors(spec, resolved), resolved.setup.optimizer).paged_bytes
    return spec, resolved, paged


__all__ = ["plan", "max_batch_size", "sweep", "smallest_gpu_count", "host_ram", "HostRam", "catalogue_stamp",
           "CatalogueStamp", "write_csv", "frame_csv", "PLAN_COLUMNS"]
