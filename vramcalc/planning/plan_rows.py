"""``plan``: for a model and setup, one row per catalogue GPU (the smallest GPU count that fits, the largest
micro-batch at that count, host RAM, tokens/s and the cost per million training tokens; with a token budget also the
hours and what the job costs to rent, buy and power) and, beside them, hosted fine-tuning services' prices for the
same tokens. Every memory figure is an ``estimate()``; time comes from the step-time model (``cost.step_for``) where
it has a rate for the GPU, else from the per-generation MFU; every price comes with its date and source
(data/cloud_prices.csv, data/gpu_list_prices.csv, the catalogue).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..catalogue import get_gpu, get_model, gpus
from ..cost import (
    DEFAULT_AMORTISATION_YEARS,
    DEFAULT_USD_PER_KWH,
    DEFAULT_USD_PER_KWH_SOURCE,
    SECONDS_PER_HOUR,
    TOKENS_PER_MILLION,
    amortised_buy_cost_usd,
    buy_cost_usd,
    buy_total_usd,
    checked_link_plan,
    cheapest_rates,
    decoder_shape,
    eager_attention_seconds_per_token,
    energy_cost_usd,
    energy_kwh,
    expert_parallel_shape,
    gpu_list_price,
    hosted_cost_usd,
    hosted_prices,
    matmul_dtype,
    network_port_price,
    peak_flop_per_s,
    pue,
    rent_cost_usd,
    server_cost_per_gpu,
    step_for,
    step_or_profile_utilisation,
    training_flops,
    training_time,
)
from ..errors import VramcalcError, positive_number
from ..estimator import estimate
from ..model import ModelSpec
from ..options import DeviceMap, Interconnect, Method, Offload, Sharding, Term
from ..terms.context_parallel import rank_view as cp_rank_view
from ..terms.expert_parallel import slot_share
from ..terms.tensor_parallel import rank_view
from ..training_setup import ResolvedSetup, resolve_setup
from ..units import BYTES_PER_GIB
from .host_memory import host_ram
from .ranking import RANK_BY, plan_summary, rank_rows
from .ranking import best_setup
from .search import (
    DEFAULT_MAX_GPUS,
    at_count,
    counts_to_try,
    gpu_limit,
    max_batch_size,
    offload_of,
    positive_count,
)
from .stamp import catalogue_stamp
from .strategies import candidates, chosen_knobs, parallelism_text

# integers, empty where they do not apply (nullable)
COUNT_COLUMNS = ("seq_len", "num_gpus", "tp", "ep", "cp", "micro_batch")
TERM_COLUMNS = tuple(f"{term.value}_gib" for term in Term)
# The cheapest published rate of each kind (data/cloud_prices.csv), each with where, when and from whom.
RATE_KINDS = ("on-demand", "spot", "reserved")
RATE_FIELDS = ("usd_per_gpu_hour", "provider", "region", "price_date", "source")
RATE_COLUMNS = tuple(f"{kind.replace('-', '')}_{field}" for kind in RATE_KINDS for field in RATE_FIELDS)
PLAN_COLUMNS = (
    "rank", "offer", "model", "stack", "method", "precision", "optimizer", "seq_len", "grad_ckpt", "attn", "matmul_dtype",
    "gpu", "gpu_memory_gib", "num_gpus", "parallelism", "sharding", "tp", "ep", "cp", "device_map", "offload",
    "quant_storage", "plan_chose", "interconnect", "interconnect_gb_per_s",
    "micro_batch", "fits", "device_gib",
    "headroom_gib", "phase",
    *TERM_COLUMNS,
    "host_ram_gib", "host_loading_gib", "host_offload_gib", "host_paged_optimizer_gib", "host_saving_gib",
    "train_tokens", "epochs", "model_flop_per_token", "hardware_flop_per_token", "mfu", "mfu_source",
    "step_seconds", "exposed_comm_seconds", "throughput_tokens_per_s", "usd_per_million_tokens", "train_hours",
    "gpu_hours",
    "rent_usd_per_gpu_hour", "rent_usd_per_hour", "rent_usd", "buy_usd", "buy_amortised_usd", "amortisation_years",
    "energy_kwh", "usd_per_kwh", "usd_per_kwh_source", "pue", "pue_source", "energy_usd", "cost_usd",
    *RATE_COLUMNS,
    "list_price_usd", "list_price_basis", "list_price_date", "list_price_source",
    "server_usd_per_gpu", "server_price_date", "server_price_source",
    "network_port_usd", "network_price_date", "network_price_source", "buy_total_usd",
    "provider", "hosted_usd_per_million_tokens", "price_date", "price_source",
    "note", "catalogue_version", "catalogue_date",
)


# the knobs plan may choose, in the order the plan_chose cell lists them
PLAN_CHOICE_ORDER = ("num_gpus", "sharding", "tp", "ep", "cp", "device_map", "quant_storage", "offload", "grad_ckpt")
PLAN_EXTRA = "plan"  # pip install 'vramcalc[plan]' (pandas, numpy): DataFrames from plan() and sweep()


def require_pandas(what: str):
    """pandas, or one ``VramcalcError`` line naming the extra that brings it."""
    try:
        import pandas
    except ImportError as err:
        raise VramcalcError(f"{what} returns a pandas DataFrame and needs the '{PLAN_EXTRA}' extra "
                            f"({err.name or 'pandas'} is missing): pip install 'vramcalc[{PLAN_EXTRA}]'") from None
    return pandas


@dataclass(frozen=True)
class PlanRows:
    """A plan as plain rows (``rows``: one dict per GPU type or hosted service, ranked, every key a PLAN_COLUMNS
    name; missing values are absent or None, never 0), its one-line ``summary``, the setup's ``warnings`` and the
    catalogue it came from. Standard library only: the CLI prints it through ``vramcalc.export``."""

    rows: list
    summary: str
    warnings: tuple
    catalogue_version: str
    catalogue_date: str


def plan_rows(model, *, tokens=None, epochs=1, gpus=None, max_gpus: int = DEFAULT_MAX_GPUS, rank_by: str = "cost",
              usd_per_kwh: float = DEFAULT_USD_PER_KWH, amortisation_years: float = DEFAULT_AMORTISATION_YEARS,
              mfu: float | None = None, hosted: bool = True, **options) -> PlanRows:
    """``plan()`` as plain rows (``PlanRows``), with the standard library only. Arguments as ``plan()``."""
    spec = get_model(model)
    tokens = positive_number(tokens, "token count") if tokens is not None else None
    epochs = positive_number(epochs, "number of epochs")
    positive_number(usd_per_kwh, "electricity price ($/kWh)")
    positive_number(amortisation_years, "amortisation horizon (years)")
    max_gpus = gpu_limit(max_gpus)
    limit = positive_count(options["num_gpus"], "number of GPUs") if options.get("num_gpus") is not None else max_gpus
    if rank_by not in RANK_BY:
        raise VramcalcError(f"unknown ranking {rank_by!r}; choose one of: {', '.join(RANK_BY)}")
    devices = gpus_of(gpus)
    options = {key: value for key, value in options.items() if value is not None}
    if any(options.get(key) not in (None, 1) for key in ("pp",)) or options.get("pp_schedule") is not None \
            or options.get("pp_microbatches") is not None:
        raise VramcalcError("--pp is estimated one setup at a time (vramcalc estimate); plan does not search "
                            "pipeline layouts")
    checked = resolve_setup(spec, **_as_searched(options, max_gpus))  # bad options fail once, before any GPU
    notes = list(checked.warnings)
    if checked.setup.interconnect is Interconnect.NVLINK and gpus is None:  # named GPUs without NVLink: an error
        lacking = [device.name for device in devices if not device.nvlink_bidir_gb_s]
        devices = [device for device in devices if device.nvlink_bidir_gb_s]
        if lacking:
            notes.append(f"--interconnect nvlink: left out the GPUs without NVLink ({', '.join(lacking)})")
    stamp = catalogue_stamp()
    kwh_source = DEFAULT_USD_PER_KWH_SOURCE if usd_per_kwh == DEFAULT_USD_PER_KWH else "given (usd_per_kwh)"
    prices = dict(usd_per_kwh=usd_per_kwh, usd_per_kwh_source=kwh_source, amortisation_years=amortisation_years)
    per_million = tokens is None
    rows = [_gpu_row(spec, device, tokens, epochs, max_gpus, mfu, prices, dict(options), rank_by, per_million)
            for device in devices]
    if hosted:
        rows += _hosted_rows(spec, tokens, epochs, options, max_gpus)
    for row in rows:
        row["catalogue_version"], row["catalogue_date"] = stamp.version, stamp.date
    rows = rank_rows(rows, rank_by, per_million=per_million)
    return PlanRows(rows, plan_summary(rows, spec, limit, rank_by, per_million=per_million), tuple(notes),
                    stamp.version, stamp.date)


def gpus_of(names):
    """The catalogue GPUs to plan for: all of them when ``names`` is None, else each name (an empty list, or a name
    that is blank, is an error: never read as "all")."""
    if names is None:
        return gpus()
    if isinstance(names, str):
        names = names.split(",")
    names = list(names)
    if not names or any(not isinstance(name, str) or not name.strip() for name in names):
        raise VramcalcError(f"no GPUs to plan for: give catalogue GPU names, got {names!r}")
    return [get_gpu(name.strip()) for name in names]


def plan(model, *, tokens=None, epochs=1, gpus=None, max_gpus: int = DEFAULT_MAX_GPUS, rank_by: str = "cost",
         usd_per_kwh: float = DEFAULT_USD_PER_KWH, amortisation_years: float = DEFAULT_AMORTISATION_YEARS,
         mfu: float | None = None, hosted: bool = True, gpus_to_try=None, **options):
    """One row per catalogue GPU (and per matching hosted service), ranked by cost or time; a pandas DataFrame
    (the ``plan`` extra: ``pip install 'vramcalc[plan]'``; ``plan_rows`` gives the same rows without pandas).

    ``tokens`` is the dataset size in tokens, trained ``epochs`` times (None: no hours or totals, the cost per
    million training tokens and the tokens/s only, ranked by those); ``gpus`` the catalogue GPUs to try (default:
    all; ``gpus_to_try`` is its deprecated old name). ``options`` are the TrainingSetup fields
    (``offload="optimizer"`` or ``"params"`` included); a given ``batch_size`` or ``num_gpus`` is kept, otherwise
    the largest micro-batch and the smallest count are found. ``frame.attrs["summary"]`` says in one line what fits,
    or plainly that nothing does; ``frame.attrs["warnings"]`` holds the setup's warnings, for the caller to show.
    """
    if gpus_to_try is not None:
        if gpus is not None:
            raise VramcalcError("give gpus= (gpus_to_try is its deprecated old name), not both")
        warnings.warn("plan(gpus_to_try=...) is deprecated: use gpus=...", DeprecationWarning, stacklevel=2)
        gpus = gpus_to_try
    pandas = require_pandas("vramcalc.plan()")
    result = plan_rows(model, tokens=tokens, epochs=epochs, gpus=gpus, max_gpus=max_gpus, rank_by=rank_by,
                       usd_per_kwh=usd_per_kwh, amortisation_years=amortisation_years, mfu=mfu, hosted=hosted,
                       **options)
    return plan_frame(result, pandas)


def plan_frame(result: PlanRows, pandas=None):
    """``PlanRows`` as the DataFrame ``plan()`` returns: PLAN_COLUMNS, nullable integer counts and booleans, and
    ``attrs`` summary / warnings / catalogue_version / catalogue_date."""
    pandas = pandas or require_pandas("vramcalc.plan()")
    frame = pandas.DataFrame(result.rows, columns=list(PLAN_COLUMNS))
    for column in COUNT_COLUMNS + ("rank",):
        frame[column] = frame[column].astype("Int64")
    frame["fits"] = frame["fits"].astype("boolean")
    frame["quant_storage"] = frame["quant_storage"].astype("string")  # a word, empty but for QLoRA rows
    frame.attrs["summary"] = result.summary
    frame.attrs["warnings"] = list(result.warnings)
    frame.attrs["catalogue_version"], frame.attrs["catalogue_date"] = result.catalogue_version, result.catalogue_date
    return frame


def _as_searched(options: dict, max_gpus: int) -> dict:
    """The options as given, checked once before any GPU: ``device_map`` or a given sharding on 2 GPUs when no count
    is given; a given count of data-parallel GPUs with the sharding plan gives it; an offloading setup, which needs
    a GPU count and a sharding to be valid, at the count the search starts from; ``--task kto`` without a batch
    size at the two rows KTOTrainer needs."""
    if "batch_size" not in options and str(options.get("task", "")).strip().lower() == "kto":
        options = dict(options, batch_size=2)  # KTOTrainer's KL term needs two rows (task_setup.py)
    if str(options.get("device_map") or "none").strip().lower() != "none" and options.get("num_gpus") is None:
        options = dict(options, num_gpus=2)  # device_map auto spreads the layers over 2 GPUs or more
    given = {key for key, value in options.items() if value is not None}
    for degree in ("tp", "ep", "cp"):
        if degree in given and str(options[degree]).strip() == "1":
            given.discard(degree)  # --tp 1, --ep 1, --cp 1: no such parallelism
    if "sharding" in given and str(options["sharding"]).strip().lower() != Sharding.NONE.value and \
            not given & {"num_gpus", "tp", "cp"} and offload_of(options) is Offload.NONE:
        if "ep" in given:  # EP over FSDP ranks: two groups at least (parallel_degrees.check_expert_degree)
            return dict(options, num_gpus=2 * positive_count(options["ep"], "expert-parallel degree"))
        return dict(options, num_gpus=2)  # a sharding shards over 2 GPUs or more
    if {"ep", "num_gpus"} <= given and "sharding" not in given:
        n, ep = (positive_count(options[knob], what) for knob, what in (("num_gpus", "number of GPUs"),
                                                                        ("ep", "expert-parallel degree")))
        if n > ep:  # EP over FSDP ranks, the only engine it runs on (parallel_degrees.check_expert_degree)
            options = dict(options, sharding=Sharding.FSDP.value)
    # --ep / --cp alone imply their GPUs (parallel_degrees.implied_num_gpus)
    data_parallel = not {"sharding", "tp", "ep", "cp", "device_map"} & given
    if offload_of(options) is Offload.NONE and not (data_parallel and "num_gpus" in given):
        return options
    return at_count(options, counts_to_try(options, max_gpus)[0])


def _setup_columns(spec: ModelSpec, resolved: ResolvedSetup) -> dict:
    setup = resolved.setup
    return {
        "model": spec.name, "stack": setup.stack.value, "method": setup.method.value, "precision": setup.precision.value,
        "optimizer": setup.optimizer.value, "seq_len": setup.seq_len, "grad_ckpt": setup.grad_ckpt.value,
        "attn": resolved.attn_used.value, "matmul_dtype": matmul_dtype(resolved),
    }


def _gpu_row(spec, device, tokens, epochs, max_gpus, mfu, prices, options, rank_by="cost",
             per_million=False) -> dict:
    """Fit, batch, time and cost of the setup on one GPU type: every strategy that fits on its fewest GPUs
    (``strategies.candidates``: data parallel, FSDP-QLoRA, checkpointing, tensor parallel, device_map, expert and
    context parallel, then offload),
    each at its largest micro-batch, timed and priced; the cheapest by the plan's ranking figure is the row."""
    pinned_batch = options.pop("batch_size", None)
    fixed = dict(options, batch_size=pinned_batch) if pinned_batch is not None else options
    if pinned_batch is None and str(options.get("task", "")).strip().lower() == "kto":
        fixed = dict(options, batch_size=2)  # KTOTrainer's KL term needs two rows (task_setup.py): fit from 2
    row = {"offer": "gpu", "gpu": device.name, "gpu_memory_gib": device.memory_bytes / BYTES_PER_GIB,
           "train_tokens": tokens, "epochs": epochs, "price_date": device.cloud_price_date or None,
           "price_source": device.cloud_price_basis or None, **prices}
    row.update(_setup_columns(spec, resolve_setup(spec, **_as_searched(fixed, max_gpus))))
    found = candidates(spec, device, fixed, max_gpus)
    if not found:
        limit = options.get("num_gpus") or max_gpus
        row.update(fits=False, note=f"does not fit on {limit} x {device.name}")
        return row
    rows = [_candidate_row(spec, device, tokens, epochs, mfu, prices, options, pinned_batch, candidate, dict(row))
            for candidate in found]
    return best_setup(rows, rank_by, per_million=per_million)


def _candidate_row(spec, device, tokens, epochs, mfu, prices, options, pinned_batch, candidate, row) -> dict:
    """One strategy's row: its largest micro-batch (or the pinned one), memory, host RAM, time and cost."""
    at_found = candidate.options
    batch = pinned_batch or max_batch_size(spec, device, **at_found)
    breakdown = estimate(spec, gpu=device, batch_size=batch, **at_found)
    resolved = resolve_setup(spec, batch_size=batch, **at_found)
    setup = resolved.setup
    used = breakdown.total_bytes
    host = host_ram(spec, resolved, breakdown)
    chosen = chosen_knobs(candidate.strategy, options, setup)
    row.update(_setup_columns(spec, resolved))
    row.update(
        fits=True, num_gpus=setup.num_gpus, parallelism=parallelism_text(setup, chosen),
        sharding=setup.sharding.value, tp=setup.tp, ep=setup.ep, cp=setup.cp, device_map=setup.device_map.value,
        offload=setup.offload.value,
        plan_chose=",".join(knob for knob in PLAN_CHOICE_ORDER if knob in chosen) or None, micro_batch=batch,
        quant_storage=setup.quant_storage.value if setup.method is Method.QLORA else None,
        **_interconnect_columns(device, resolved),
        device_gib=used / BYTES_PER_GIB, headroom_gib=(device.memory_bytes - used) / BYTES_PER_GIB,
        phase=breakdown.phase.value,
        host_ram_gib=host.total_bytes / BYTES_PER_GIB, host_loading_gib=host.loading_bytes / BYTES_PER_GIB,
        host_offload_gib=host.offload_bytes / BYTES_PER_GIB,
        host_paged_optimizer_gib=host.paged_optimizer_bytes / BYTES_PER_GIB,
        host_saving_gib=host.saving_bytes / BYTES_PER_GIB,
    )
    row.update({f"{term}_gib": value / BYTES_PER_GIB for term, value in breakdown.terms().items()})
    row.update(_time_and_cost(spec, resolved, device, tokens, epochs, mfu, prices,
                              breakdown.details.get("paged_optimizer_bytes", 0)))
    if "grad_ckpt" in chosen:
        row["note"] = "; ".join(filter(None, ["plan turned on gradient checkpointing (--grad-ckpt " +
                                              f"{setup.grad_ckpt.value}); pin --no-grad-ckpt to keep it off",
                                              row.get("note")]))
    return row


def _interconnect_columns(device, resolved: ResolvedSetup) -> dict:
    """The links a data-parallel ring over the row's GPUs runs on (``cost.link_plan``): 'nvlink', 'pcie', or
    'nvlink+infiniband' etc. across nodes, and the ring's GB/s per GPU and direction (a tensor- or expert-parallel
    group or a device_map pipeline: the links between its GPUs); empty on one GPU."""
    setup = resolved.setup
    # the group's own links (an --ep group may span nodes: cost.link_plan over its GPUs)
    model_parallel = setup.tp > 1 or setup.ep > 1 or setup.device_map is DeviceMap.AUTO
    links = checked_link_plan(device, setup) if setup.num_gpus > 1 and setup.sharding is not Sharding.NONE else \
        checked_link_plan(device, setup, setup.num_gpus) if setup.num_gpus > 1 and model_parallel else None
    if links is None:
        return {"interconnect": None, "interconnect_gb_per_s": None}
    return {"interconnect": links.word, "interconnect_gb_per_s": links.ring_gb_s}


def _price_columns(device, n: int) -> dict:
    """The cheapest on-demand, spot and reserved rates, the list price, the server share and the buy total, each
    with its date and source (``cost.cheapest_rates``, ``gpu_list_price``, ``server_cost_per_gpu``, ``buy_total_usd``)."""
    out: dict = {}
    for kind, rate in cheapest_rates(device.name).items():
        prefix = kind.replace("-", "")
        out.update({f"{prefix}_usd_per_gpu_hour": rate.usd_per_gpu_hour, f"{prefix}_provider": rate.provider,
                    f"{prefix}_region": rate.region, f"{prefix}_price_date": rate.price_date,
                    f"{prefix}_source": rate.source})
    unit = gpu_list_price(device)
    if unit is not None:
        out.update(list_price_usd=unit.value, list_price_basis=unit.basis or None,
                   list_price_date=unit.price_date or None, list_price_source=f"{unit.item}: {unit.source}")
    server = server_cost_per_gpu(device)
    if server is not None:
        out.update(server_usd_per_gpu=server.value, server_price_date=server.price_date,
                   server_price_source=f"data/gpu_list_prices.csv '{server.item}': {server.source}")
    port = network_port_price()
    if port is not None:  # buy_total_usd counts one switch port per GPU once the job spans servers
        out.update(network_port_usd=port.value, network_price_date=port.price_date,
                   network_price_source=f"data/gpu_list_prices.csv '{port.item}': {port.source}")
    out["buy_total_usd"] = buy_total_usd(device, n)
    factor = pue()
    if factor is not None:
        out.update(pue=factor.value, pue_source=f"{factor.source} ({factor.price_date})")
    return out


def _time_and_cost(spec, resolved, device, tokens, epochs, mfu, prices, paged_bytes: int = 0) -> dict:
    """Throughput, the cost per million training tokens and, with a token budget, hours and the rent / buy / energy
    bill; no time (and so no cost) when the GPU lacks the dtype.

    Seconds per token: a calibration profile's MFU, else ``mfu`` given, else the step-time model
    (``cost.step_or_profile_utilisation``), else the GPU generation's MFU on the FLOP count.
    tokens/s = busy GPUs / (s per token per GPU): every GPU under data, tensor, expert and context parallelism (a
    --tp rank is timed on its own slice, ``rank_view``, and a --cp rank on its s/C positions, as ``estimate`` times
    them; an --ep group's tokens are shared by its E GPUs), one under ``device_map`` (a naive pipeline: one GPU
    computes at a time, while all of them are paid for).
    usd_per_million_tokens = $/GPU-hour x GPUs / (tokens/s x 3600) x 1e6 (the catalogue's on-demand rate).
    buy_usd = the GPU unit price (``cost.gpu_list_price``, the ``list_price_usd`` column's own figure) x GPUs;
    buy_amortised_usd = the job's straight-line share of ``buy_total_usd`` (GPUs, servers and network ports).
    energy_usd = GPU board power x GPUs x hours x PUE x $/kWh (energy_kwh is the GPUs' own, before the PUE)."""
    setup = resolved.setup
    flops = training_flops(spec, resolved)
    dtype = matmul_dtype(resolved)
    peak = peak_flop_per_s(device, dtype)
    n = setup.num_gpus
    price = device.cloud_usd_per_gpu_hour
    unit = gpu_list_price(device)
    out = {"model_flop_per_token": flops.model_flop_per_token, "hardware_flop_per_token": flops.hardware_flop_per_token,
           "rent_usd_per_gpu_hour": price, "rent_usd_per_hour": None if price is None else price * n,
           "buy_usd": buy_cost_usd(None if unit is None else unit.value, n), **_price_columns(device, n)}
    if peak is None:
        out["note"] = f"{device.name} has no {dtype} matmuls: no time or cost (try another --precision)"
        return out
    rank_spec, rank_resolved = rank_view(spec, resolved)  # --tp: one rank's slice, as estimate() times it
    rank_spec, rank_resolved = cp_rank_view(rank_spec, rank_resolved)  # --cp: its s/C positions, as estimate()
    busy = 1 if setup.device_map is DeviceMap.AUTO else n  # device_map: one GPU computes at a time
    # data-parallel ranks, each one micro-batch: a tp group, a cp ring and one ep group each share theirs (EP over
    # FSDP ranks does not: every rank its own batch, terms/expert_parallel.slot_share)
    shared = slot_share(resolved)
    ranks = 1 if setup.device_map is DeviceMap.AUTO else n // (setup.tp * setup.cp * shared)
    step_s_per_token, utilisation = step_or_profile_utilisation(rank_spec, rank_resolved, device, mfu, paged_bytes)
    if step_s_per_token is not None:
        tokens_per_s = busy / step_s_per_token
        step = step_for(rank_spec, rank_resolved, device, paged_bytes)  # cached: the step the time came from
        step_seconds = step.step_s
        if n > 1 and (setup.sharding is not Sharding.NONE or setup.ep > 1):
            out["exposed_comm_seconds"] = step.exposed_comm_s  # of step_seconds: collectives compute left exposed
    else:
        one = training_time(flops, 1.0, 1.0, busy * expert_group_share(spec, shared), peak, utilisation.mfu,
                            eager_attention_seconds_per_token(spec, resolved, device))
        tokens_per_s = one.tokens_per_s
        step_seconds = setup.batch_size * setup.seq_len * setup.grad_accum * ranks / tokens_per_s
    notes = []
    if device.cloud_usd_per_gpu_hour is None:
        notes.append("no cloud price in the catalogue")
    if unit is None:
        notes.append("no list price in the catalogue")
    out.update(
        mfu=utilisation.mfu, mfu_source=utilisation.source, throughput_tokens_per_s=tokens_per_s,
        step_seconds=step_seconds,
        usd_per_million_tokens=None if price is None else price * n / (tokens_per_s * SECONDS_PER_HOUR) * TOKENS_PER_MILLION,
        note="; ".join(notes) or None,
    )
    if tokens is None:
        return out
    hours = tokens * epochs / tokens_per_s / SECONDS_PER_HOUR
    kwh = energy_kwh(device.tdp_w, n, hours)
    rent = rent_cost_usd(price, n, hours)
    factor = out.get("pue") or 1.0
    out.update(
        train_hours=hours, gpu_hours=hours * n, rent_usd=rent, cost_usd=rent,
        buy_amortised_usd=amortised_buy_cost_usd(out["buy_total_usd"], 1, hours, prices["amortisation_years"]),
        energy_kwh=kwh, energy_usd=energy_cost_usd(None if kwh is None else kwh * factor, prices["usd_per_kwh"]),
    )
    return out


def expert_group_share(spec: ModelSpec, ep: int) -> float:
    """The share of an --ep group's GPUs whose FLOPs are the job's own, for the FLOP-count time (an MFU given or
    profiled): every rank computes the dense layers (attention, router, shared experts, lm_head) on all of the
    group's tokens and its n/E experts on 1/E of the routed pairs (``cost.expert_parallel_shape``), so per group
    token a rank multiplies P_rank = P_dense + P_routed/E active matmul parameters where the job needs
    P = P_dense + P_routed: E GPUs do the work of P / P_rank of them, a share P / (E · P_rank) each. ep 1: 1.
    Attention's own FLOPs (not matmul parameters) are repeated too and left out: the share is an upper bound."""
    if ep == 1:
        return 1.0
    whole, rank = decoder_shape(spec), expert_parallel_shape(spec, ep)
    return whole.active_matmul_params / (ep * rank.active_matmul_params)


def _hosted_rows(spec: ModelSpec, tokens: float, epochs: float, options: dict, max_gpus: int) -> list[dict]:
    """Hosted services whose open-weight size bracket and training kind match the model and method."""
    method = resolve_setup(spec, **_as_searched(options, max_gpus)).setup.method
    rows = []
    for price in hosted_prices():
        if not price.applies_to(spec.params / 1e9, method):
            continue
        row = {"offer": "hosted", "provider": price.provider, "model": spec.name, "method": method.value,
               "train_tokens": tokens, "epochs": epochs,
               "hosted_usd_per_million_tokens": price.usd_per_million_tokens,
               "usd_per_million_tokens": price.usd_per_million_tokens,
               "cost_usd": None if tokens is None else hosted_cost_usd(price, tokens, epochs),
               "price_date": price.price_date,
               "price_source": price.source, "note": price.offering}
        rows.append(row)
    return rows
