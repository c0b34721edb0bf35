"""Which parallel setups ``plan`` searches on one GPU type, and how it names the one it chose.

A *strategy* is a way to lay the job over GPUs, as the knobs the user did not pin:

    data parallel    ``--sharding`` (none on one GPU, else the user's, else FSDP: full sharding), with QLoRA's 4-bit
                     codes packed in bf16 under FSDP / ZeRO-3 (FSDP-QLoRA, ``search.with_4bit_storage``)
    tensor parallel  ``--tp 2|4|8`` inside one node (``facts.GPUS_PER_NODE``), the families
                     ``parallel_degrees.TP_FAMILIES`` covers; dp = N / tp data-parallel ranks shard the rank's slice
                     with FSDP (transformers' ``(dp, tp)`` mesh, ``parallel_degrees``)
    device_map auto  the decoder layers in order over 2, 4 or 8 GPUs of one box, one GPU computing at a time
                     (accelerate's big-model inference map, ``terms/device_map.py``)

each with the setup's own gradient checkpointing and, when the user did not say and the setup does not checkpoint,
with ``grad_ckpt=full`` too; and, only when none of these fits on any count searched, data parallelism with
``--offload params`` (FSDP2 ``CPUOffloadPolicy`` / ZeRO-3 ``offload_param``), then ``--offload optimizer``
(ZeRO-3 ``offload_optimizer``), on hosts of at most ``PLAN_HOST_RAM_BYTES_PER_NODE`` each. A knob the user gave
(``sharding``, ``tp``, ``device_map``, ``offload``, ``quant_storage``, ``grad_ckpt``, ``num_gpus``) is kept: no
strategy changes it. Every candidate is a full ``estimate()``; the plan row builder (``plan_rows._gpu_row``) then
gives each candidate that fits its largest micro-batch, times and prices it, and keeps the cheapest by the plan's
ranking figure (``ranking.best_setup``), fewest GPUs on a tie.

Pruning (``candidates``): each strategy's GPU count is searched as ``search.first_fit`` searches the data-parallel
one (powers of two, then bisection); the strategies come in order of how much they change the job (the user's setup
first, then tensor parallelism, then device_map, each plain before checkpointed), and a later one is kept only when
it fits on fewer GPUs than every earlier one. Tensor parallelism and device_map need two GPUs or more, so they are
never tried where one GPU is enough. Offload is tried only when nothing else fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from ..breakdown import MemoryBreakdown
from ..errors import VramcalcError
from ..estimator import estimate
from ..facts import GPUS_PER_NODE
from ..options import DeviceMap, GradCkpt, Method, Offload, QuantStorage, Sharding
from ..training_setup import resolve_setup
from .host_memory import host_ram
from .search import DEFAULT_MULTI_GPU_SHARDING, GpuCounts, at_count, first_fit, positive_count, with_4bit_storage

# the knobs a strategy sets, each kept when the user gives it (with num_gpus, which every search keeps)
STRATEGY_KNOBS = ("sharding", "tp", "device_map", "offload", "quant_storage", "grad_ckpt")
TP_DEGREES = (2, 4, 8)  # a tensor-parallel group inside one node of GPUS_PER_NODE GPUs
OFFLOADS = (Offload.PARAMS, Offload.OPTIMIZER)  # tried in this order, only when nothing fits without offload
# The host RAM per node an offload that plan chooses may use (``host_memory.host_ram``): 2 TB, the system memory of an
# 8-GPU NVIDIA DGX H100/H200 (DGX H100/H200 User Guide, "Hardware Overview": 2 TB DDR5), the usual ceiling of a
# training server. An offload the user gives is estimated whatever the host needs (the row shows host_ram_gib).
PLAN_HOST_RAM_BYTES_PER_NODE = 2 * 10**12


class Layout(str, Enum):
    """How a strategy lays the model over its GPUs."""

    DATA_PARALLEL = "data parallel"
    TENSOR_PARALLEL = "tensor parallel"
    DEVICE_MAP = "device_map auto"


@dataclass(frozen=True)
class Strategy:
    """One way to run the job: a layout, its tensor-parallel degree, and the knobs plan sets on top of the user's
    (``grad_ckpt``, ``offload``: None leaves the user's or the default). ``baseline``: the user's own setup,
    whose errors are the user's (raised); any other strategy that the setup refuses is skipped."""

    layout: str
    tp: int = 1
    grad_ckpt: str | None = None
    offload: str | None = None
    baseline: bool = False

    def options(self, base: dict, count: int) -> dict:
        """The estimate options of this strategy on ``count`` GPUs."""
        options = dict(base)
        if self.grad_ckpt is not None:
            options["grad_ckpt"] = self.grad_ckpt
        if self.offload is not None:
            options["offload"] = self.offload
        if self.layout == Layout.DATA_PARALLEL:
            return at_count(options, count)
        if self.layout == Layout.TENSOR_PARALLEL:
            sharding = Sharding.NONE.value if count == self.tp else options.get("sharding") or \
                DEFAULT_MULTI_GPU_SHARDING.value
            return with_4bit_storage(dict(options, tp=self.tp, num_gpus=count, sharding=sharding))
        return dict(options, device_map=DeviceMap.AUTO.value, num_gpus=count, sharding=Sharding.NONE.value)

    def counts(self, base: dict, top: int, low: int = 1, tail: bool = True):
        """The GPU counts this strategy tries, from ``low`` up to ``top`` (the pinned ``num_gpus`` alone, if it is
        in that range and suits the layout); ``tail``: ``top`` itself is a count to try (the user's limit), not
        only a cap (``GpuCounts``)."""
        pinned = base.get("num_gpus")
        if pinned is not None:
            count = positive_count(pinned, "number of GPUs")
            suits = {Layout.DATA_PARALLEL: True, Layout.TENSOR_PARALLEL: count % self.tp == 0,
                     Layout.DEVICE_MAP: 2 <= count <= GPUS_PER_NODE}[self.layout]
            return [count] if suits and low <= count <= top else []
        if self.layout == Layout.DATA_PARALLEL:
            return GpuCounts(top, low, tail) if top >= low else []
        if self.layout == Layout.TENSOR_PARALLEL:
            return ScaledCounts(GpuCounts(top // self.tp, -(-low // self.tp), tail), self.tp) \
                if top >= max(low, self.tp) else []
        top = min(top, GPUS_PER_NODE)  # accelerate places the layers over the GPUs of one machine
        return GpuCounts(top, max(2, low), tail) if top >= max(2, low) else []


class ScaledCounts(Sequence):
    """``scale`` x each count of a ``GpuCounts`` (tensor-parallel jobs: tp x dp GPUs), lazy like it."""

    def __init__(self, counts: GpuCounts, scale: int):
        self.inner, self.scale = counts, scale

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.scale * n for n in self.inner[index]]
        return self.scale * self.inner[index]

    def power_positions(self) -> list[int]:
        from .search import _power_positions

        return _power_positions(self.inner)


@dataclass(frozen=True)
class Candidate:
    """A strategy on its fewest GPUs: the estimate options there (no batch size) and the breakdown that fits."""

    strategy: Strategy
    count: int
    options: dict
    breakdown: MemoryBreakdown


def pinned_knobs(options: dict) -> frozenset:
    """The strategy knobs (and ``num_gpus``) the user gave."""
    return frozenset(key for key in STRATEGY_KNOBS + ("num_gpus",) if options.get(key) is not None)


def families(spec, options: dict, offload: Offload | None) -> list[tuple[Strategy, Strategy | None]]:
    """The strategies to try, in order, without offload (``offload`` None) or with that offload: pairs of a
    strategy with the setup's own checkpointing and, when plan may turn it on, the same with ``grad_ckpt=full``
    (None otherwise). The first pair of the no-offload level holds the user's own setup (``baseline``)."""
    pinned = pinned_knobs(options)
    checkpoint = "grad_ckpt" not in pinned and _default_grad_ckpt(spec, options) is GradCkpt.NONE

    def pair(layout, tp=1, baseline=False):
        plain = Strategy(layout, tp=tp, offload=None if offload is None else offload.value, baseline=baseline)
        checked = Strategy(layout, tp=tp, grad_ckpt=GradCkpt.FULL.value, offload=plain.offload) if checkpoint \
            else None
        return plain, checked

    if offload is not None:  # data parallel with the offload, on its full-sharding engine
        return [pair(Layout.DATA_PARALLEL)]
    tp = positive_count(options["tp"], "tensor-parallel degree") if options.get("tp") is not None else 1
    if tp > 1:  # the user's tensor-parallel degree
        return [pair(Layout.TENSOR_PARALLEL, tp, baseline=True)]
    if str(options.get("device_map") or DeviceMap.NONE.value).strip().lower() != DeviceMap.NONE.value:
        return [pair(Layout.DEVICE_MAP, baseline=True)]
    out = [pair(Layout.DATA_PARALLEL, baseline=True)]
    if "tp" not in pinned and "offload" not in pinned and _sharding_composes_with_tp(options):
        out += [pair(Layout.TENSOR_PARALLEL, degree) for degree in TP_DEGREES]
    if not pinned & {"device_map", "sharding", "offload", "tp"}:
        out.append(pair(Layout.DEVICE_MAP))
    return out


def _sharding_composes_with_tp(options: dict) -> bool:
    """Tensor parallelism's data-parallel ranks shard with FSDP (``parallel_degrees.check_degrees``)."""
    sharding = options.get("sharding")
    return sharding is None or str(sharding).strip().lower() in (Sharding.NONE.value, Sharding.FSDP.value)


def _default_grad_ckpt(spec, options: dict) -> GradCkpt:
    """The checkpointing the setup runs when plan sets none (the default, or the stack's preset)."""
    try:
        chosen = {key: value for key, value in options.items() if key in ("stack", "method", "task")}
        return resolve_setup(spec, **chosen).setup.grad_ckpt
    except VramcalcError:
        return GradCkpt.NONE


def candidates(spec, device, options: dict, max_gpus: int) -> list[Candidate]:
    """Every strategy that fits ``device`` on its fewest GPUs, each on fewer GPUs than the ones before it, in the
    order tried; offloading ones only when no other fits. Empty when nothing fits up to ``max_gpus``.

    Pruning: of a pair (``families``), the checkpointed strategy is searched first: checkpointing never adds
    memory, so where it fits nowhere the plain one does not either, and where it fits on c GPUs the plain one is
    searched from c up (and kept beside it only when it needs more GPUs). Tensor parallelism is searched from the
    fewest GPUs its largest accepted degree fits on (``_tensor_parallel_floor``), and not at all when that degree
    fits nowhere. Offload params saves more than offload optimizer: when the first fits nowhere, the second is not
    tried."""
    levels = [None] if options.get("offload") is not None else [None, *OFFLOADS]
    limit = positive_count(options["num_gpus"], "number of GPUs") if options.get("num_gpus") is not None \
        else max_gpus
    top = limit
    found: list[Candidate] = []
    for offload in levels:
        tp_low = None  # the fewest GPUs any tensor-parallel strategy could fit on (``_tensor_parallel_floor``)
        for plain, checked in families(spec, options, offload):
            if top < 1:
                return found
            low = 1
            if plain.layout == Layout.TENSOR_PARALLEL and not plain.baseline:
                if tp_low is None:
                    tp_low = _tensor_parallel_floor(spec, device, options, top, top == limit)
                if tp_low == 0:
                    continue
                low = tp_low
            saving = _fewest(spec, device, options, checked, top, low, tail=top == limit) if checked is not None \
                else None
            if checked is not None and saving is None:
                if plain.baseline:
                    _fewest(spec, device, options, plain, 0)  # the user's own errors, raised
                if offload is not None:
                    return found  # the most saving offload fits nowhere
                continue
            kept = _fewest(spec, device, options, plain, top, low=saving.count if saving else low, tail=top == limit)
            pair = [kept] + ([saving] if saving is not None and (kept is None or saving.count < kept.count) else [])
            found += [candidate for candidate in pair if candidate is not None]
            if found:
                top = min(candidate.count for candidate in found) - 1  # a later strategy must save GPUs
        if found:
            return found
    return found


def _tensor_parallel_floor(spec, device, options: dict, top: int, tail: bool) -> int:
    """The fewest GPUs the most saving tensor-parallel strategy fits on (the largest degree the setup accepts,
    checkpointed when plan may checkpoint), 0 when it fits nowhere up to ``top``, 1 when it fits on its own degree
    (no floor): on as many GPUs, a smaller degree splits the layers' activations and weights over fewer ranks and
    shards the rest as far, so it holds at least as much; on fewer GPUs each holds more still."""
    pairs = [pair for pair in families(spec, options, None)
             if pair[0].layout == Layout.TENSOR_PARALLEL and not pair[0].baseline]
    for plain, checked in reversed(pairs):  # the largest degree first
        strategy = checked or plain
        counts = strategy.counts(options, top, 1, tail)
        if not len(counts):
            continue
        try:
            resolve_setup(spec, **strategy.options(options, counts[0]))
        except VramcalcError:
            continue  # this degree is refused (heads it does not divide): try the next smaller one
        found = _fewest(spec, device, options, strategy, top, tail=tail)
        if found is None:
            return 0
        # on exactly its degree, a smaller degree may still fit fewer GPUs (a larger share each): no floor
        return found.count if found.count > strategy.tp else 1
    return 0


def _fewest(spec, device, options: dict, strategy: Strategy, top: int, low: int = 1,
            tail: bool = True) -> Candidate | None:
    """The strategy on the fewest of its counts from ``low`` to ``top`` that fit, or None (also when the setup
    refuses it). The user's own setup (``baseline``) raises the setup's errors, at its first count even when
    ``top`` is 0."""
    try:
        counts = strategy.counts(options, max(top, 1) if strategy.baseline else top, low, tail)
    except VramcalcError:
        if strategy.baseline:
            raise
        return None
    if not len(counts):
        return None
    try:  # a refused strategy (tp on an MoE, offload with a paged optimizer, ...) is refused at any count
        resolve_setup(spec, **strategy.options(options, counts[0]))
    except VramcalcError:
        if strategy.baseline:
            raise
        return None
    if top < 1:
        return None

    def attempt(count: int) -> MemoryBreakdown | None:
        at = strategy.options(options, count)
        try:
            breakdown = estimate(spec, gpu=device, **at)
        except VramcalcError:
            if strategy.baseline:
                raise
            return None  # refused at this count only (a global batch size that the count does not divide)
        if breakdown.total_bytes > device.memory_bytes:
            return None
        if strategy.offload is not None and \
                host_ram(spec, resolve_setup(spec, **at), breakdown).total_bytes > PLAN_HOST_RAM_BYTES_PER_NODE:
            return None  # an offload plan chose needs a host that holds what it moves there
        return breakdown

    found = first_fit(counts, attempt)
    if found is None:
        return None
    count, breakdown = found
    without_batch = {k: v for k, v in options.items() if k != "batch_size"}
    return Candidate(strategy, count, strategy.options(without_batch, count), breakdown)


def parallelism_text(setup, chosen: frozenset = frozenset()) -> str:
    """The ``parallelism`` cell: how the row's GPUs run the job, in plan's words, e.g. 'fsdp x2, 4-bit storage
    bf16, offload params', 'tp 4 x dp 2 (fsdp)', 'device_map auto x2', '1 GPU'."""
    n, tp = setup.num_gpus, setup.tp
    if setup.device_map is DeviceMap.AUTO:
        parts = [f"device_map auto x{n}"]
    elif tp > 1:
        dp = n // tp
        parts = [f"tp {tp}" + (f" x dp {dp} ({setup.sharding.value})" if dp > 1 else "")]
    elif setup.sharding is Sharding.NONE:
        parts = ["1 GPU" if n == 1 else f"{n} independent copies"]
    else:
        parts = [f"{setup.sharding.value} x{n}"]
    if setup.method is Method.QLORA and setup.quant_storage is not QuantStorage.UINT8 and \
            setup.sharding in (Sharding.FSDP, Sharding.ZERO3):
        parts.append(f"4-bit storage {setup.quant_storage.value}")
    if setup.offload is not Offload.NONE:
        parts.append(f"offload {setup.offload.value}")
    if "grad_ckpt" in chosen:
        parts.append(f"grad ckpt {setup.grad_ckpt.value} (plan)")
    return ", ".join(parts)


def chosen_knobs(strategy: Strategy, options: dict, setup) -> frozenset:
    """The knobs plan set that the user did not give: what the ``plan_chose`` cell lists."""
    pinned = pinned_knobs(options)
    chosen = set()
    if strategy.grad_ckpt is not None:
        chosen.add("grad_ckpt")
    if strategy.offload is not None:
        chosen.add("offload")
    if "num_gpus" not in pinned:
        chosen.add("num_gpus")
    if "sharding" not in pinned and setup.sharding is not Sharding.NONE:
        chosen.add("sharding")
    if "tp" not in pinned and setup.tp > 1:
        chosen.add("tp")
    if "device_map" not in pinned and setup.device_map is not DeviceMap.NONE:
        chosen.add("device_map")
    if "quant_storage" not in pinned and setup.method is Method.QLORA and setup.quant_storage is not QuantStorage.UINT8:
        chosen.add("quant_storage")
    return frozenset(chosen)
