"""Searches over one setup: the fewest GPUs it fits on (1, 2, 4, 8 and whole nodes: powers of two probed in order,
then the first bracket that fits bisected) and the largest micro-batch that fits a GPU (a galloping search from a
linear guess, then bisection, every step an ``estimate()``). Both need the standard library only, and neither holds
a list of every candidate: the GPU counts are a lazy ``GpuCounts`` sequence, so a limit of 10^9 GPUs (searched up to
the estimator's bound, 2^20) costs about 20 probes and no memory.

Offload is the setup's own ``offload`` option (``TrainingSetup.offload``: optimizer | params), estimated by the
term functions like any other option: the searches only choose the GPU count, the sharding and the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..breakdown import MemoryBreakdown
from ..catalogue import get_gpu, get_model
from ..errors import VramcalcError, positive_int, positive_number
from ..estimator import estimate
from ..facts import GPUS_PER_NODE
from ..options import Method, Offload, Precision, Quant, QuantStorage, Sharding
from .. import training_setup as _training_setup

DEFAULT_MAX_GPUS = 512
# The largest --max-gpus accepted: 10^9 GPUs is beyond any cluster (the largest announced are ~10^6); above it the
# value is a typo, and one error line.
MAX_GPUS_LIMIT = 10**9
# What the estimator itself accepts (training_setup.MAX_OPTION, far past any real job): the searches stop there, so a
# larger --max-gpus is searched up to the estimator's bound and reported as that bound; the largest micro-batch
# looked for is the batch bound, and reaching it is reported as "at least", never as the answer.
_BOUNDS = getattr(_training_setup, "MAX_OPTION", {})
MAX_GPUS_SEARCHED = _BOUNDS.get("num_gpus", 2**20)
MAX_MICRO_BATCH = _BOUNDS.get("batch_size", 2**24)
DEFAULT_MULTI_GPU_SHARDING = Sharding.FSDP  # full sharding (ZeRO-3 equivalent) when one GPU is not enough
# Offloading needs an engine that shards the optimizer (training_setup._check_offload): FSDP2's CPUOffloadPolicy
# moves parameters, gradients and optimizer states together (--offload params), so an optimizer-only offload runs
# on DeepSpeed ZeRO-3 (offload_optimizer), the full-sharding equivalent of FSDP.
DEFAULT_OFFLOAD_SHARDING = {Offload.OPTIMIZER: Sharding.ZERO3, Offload.PARAMS: Sharding.FSDP}
# TrainingSetup accepts DeepSpeed ZeRO with offload on one GPU (ZeRO-Offload's single-GPU case) and other sharded
# engines from two GPUs on (training_setup._check_combination): an offloading setup is searched from one GPU.
MIN_OFFLOAD_GPUS = 1


def positive_count(value, what: str) -> int:
    """A count: first any positive number (the plan's wording), then a whole one."""
    return positive_int(positive_number(value, what), what)


def gpu_limit(value) -> int:
    """``--max-gpus``: a whole number from 1 to ``MAX_GPUS_LIMIT`` (else one ``VramcalcError`` line), searched up to
    ``MAX_GPUS_SEARCHED``, the estimator's own bound: the count returned is the one the search really uses."""
    top = positive_count(value, "maximum number of GPUs")
    if top > MAX_GPUS_LIMIT:
        raise VramcalcError(f"maximum number of GPUs must be at most {MAX_GPUS_LIMIT:,}, got {value!r}")
    return min(top, MAX_GPUS_SEARCHED)


class GpuCounts(Sequence):
    """The GPU counts a plan tries, in order: 1, 2, 4, then whole nodes of eight, then ``top`` itself (from
    ``low`` on; ``[top]`` when none is left). ``tail=False``: without ``top`` unless it is one of those (a cap
    that a plan strategy must stay under, not a count the user asked for). Lazy: indexing and ``position`` are
    arithmetic, never a list."""

    def __init__(self, top: int, low: int = 1, tail: bool = True):
        self.top = top
        small = [n for n in (1, 2, 4) if low <= n <= top and n < GPUS_PER_NODE]
        first_node = max(GPUS_PER_NODE, -(-low // GPUS_PER_NODE) * GPUS_PER_NODE)
        nodes = range(first_node, top + 1, GPUS_PER_NODE)
        tail = [top] if tail and top >= low and top not in small and top % GPUS_PER_NODE else []
        if not (small or nodes or tail) and top >= low:
            small = [top]
        self._parts = (small, nodes, tail)

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        for part in self._parts:
            if 0 <= index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError("GPU count index out of range")

    def position(self, count: int) -> int | None:
        """The index of ``count`` among the counts, or None."""
        offset = 0
        for part in self._parts:
            if count in part:
                return offset + part.index(count)
            offset += len(part)
        return None

    def __repr__(self) -> str:
        return f"GpuCounts({list(self[:6])}{', ...' if len(self) > 6 else ''} up to {self.top})"


def gpu_counts(max_gpus: int, min_gpus: int = 1) -> GpuCounts:
    """GPU counts a plan tries: 1, 2, 4, 8, then whole nodes of eight, up to ``max_gpus`` (from ``min_gpus``)."""
    return GpuCounts(gpu_limit(max_gpus), min_gpus)


def offload_of(options: dict) -> Offload:
    return Offload.parse(options.get("offload") or Offload.NONE, "offload")


def sharding_for(count: int, sharding=None, offload: Offload = Offload.NONE) -> str:
    """The sharding ``count`` GPUs run: none on one GPU without offload; otherwise the given sharding, or full
    sharding (FSDP; DeepSpeed ZeRO-3 for an optimizer-only offload) when none or 'none' is given."""
    if count == 1 and offload is Offload.NONE:
        return Sharding.NONE.value
    default = DEFAULT_OFFLOAD_SHARDING.get(offload, DEFAULT_MULTI_GPU_SHARDING)
    chosen = Sharding.parse(sharding, "sharding") if sharding is not None else default
    return (default if chosen is Sharding.NONE else chosen).value


def counts_to_try(options: dict, max_gpus: int = DEFAULT_MAX_GPUS) -> list[int]:
    """The GPU counts a search tries: the pinned ``num_gpus`` alone, else ``gpu_counts`` (from two GPUs for an
    offloading setup)."""
    if options.get("num_gpus") is not None:
        return [positive_count(options["num_gpus"], "number of GPUs")]
    return gpu_counts(max_gpus, MIN_OFFLOAD_GPUS if offload_of(options) is not Offload.NONE else 1)


def _power_positions(counts) -> list[int]:
    """Indices of the powers of two among ``counts`` and of its last count, in order (about log2 of the top)."""
    last = len(counts) - 1
    if hasattr(counts, "power_positions"):  # strategies.ScaledCounts: tp x the powers of two
        return counts.power_positions()
    if not isinstance(counts, GpuCounts):
        return [i for i, n in enumerate(counts) if n & (n - 1) == 0 or i == last]
    positions, power = set(), 1
    while power <= counts.top:
        index = counts.position(power)
        if index is not None:
            positions.add(index)
        power *= 2
    return sorted(positions | {last})


def at_count(options: dict, count: int) -> dict:
    """``options`` with ``num_gpus`` set to ``count``, the sharding that count runs (``sharding_for``) and, for QLoRA,
    the 4-bit storage that sharding wants (``with_4bit_storage``)."""
    return with_4bit_storage(dict(options, num_gpus=count,
                                  sharding=sharding_for(count, options.get("sharding"), offload_of(options))))


def with_4bit_storage(options: dict) -> dict:
    """QLoRA sharded by FSDP2 or ZeRO-3 packs its 4-bit codes in bf16 unless ``quant_storage`` is given: FSDP-QLoRA
    as bitsandbytes (``docs/source/fsdp_qlora.md``) and peft (``docs/source/accelerate/fsdp.md``) set it up, so that
    the engine shards the 4-bit weights (``terms/distributed.shards_4bit``); with uint8 accelerate keeps them whole on
    every rank. Not for int8 weights, nor DeepSpeed's fp16 engine (``training_setup._check_quant_storage``)."""
    if options.get("quant_storage") is not None:
        return options
    try:
        method = Method.parse(options.get("method") or Method.FULL, "method")
        sharding = Sharding.parse(options.get("sharding") or Sharding.NONE, "sharding")
        quant = Quant.parse(options.get("quant") or Quant.NF4, "quantization")
        precision = Precision.parse(options.get("precision") or Precision.BF16, "precision")
    except VramcalcError:
        return options  # resolve_setup names the bad value
    fp16_deepspeed = sharding.is_deepspeed and precision in (Precision.FP16, Precision.MIXED_FP16, Precision.FP16_TRUE)
    if method is not Method.QLORA or sharding not in (Sharding.FSDP, Sharding.ZERO3) or quant is Quant.INT8 \
            or fp16_deepspeed:
        return options
    return dict(options, quant_storage=QuantStorage.BF16.value)


def _fits(breakdown: MemoryBreakdown, memory_bytes: int) -> bool:
    return breakdown.total_bytes <= memory_bytes


def smallest_gpu_count(model, gpu, *, max_gpus: int = DEFAULT_MAX_GPUS,
                       **options) -> tuple[int, MemoryBreakdown] | None:
    """The fewest GPUs (1, 2, 4, 8, then whole nodes) on which the setup fits, with its breakdown; None when no
    count up to ``max_gpus`` is enough. ``num_gpus`` in ``options`` pins the count.

    Memory per GPU does not only fall as GPUs are added: FSDP2 shards each parameter on dim 0, so a stacked expert
    tensor of E experts over more than E ranks is padded to one expert per rank, and its all-gather grows with the
    ranks (Mixtral, 8 experts, LoRA: fits 2 H100s, not 16 or more). So the counts are not bisected as a whole: the
    powers of two (and ``max_gpus``) are tried in order, and the first bracket [previous power, power] that fits is
    bisected, where memory falls with the count. Expert counts are powers of two, so the padding's turning point
    is one of the probes.
    """
    spec, device = get_model(model), get_gpu(gpu)
    counts = counts_to_try(options, max_gpus)
    options.pop("num_gpus", None)

    def attempt(count: int) -> MemoryBreakdown | None:
        breakdown = estimate(spec, gpu=device, **at_count(options, count))
        return breakdown if _fits(breakdown, device.memory_bytes) else None

    return first_fit(counts, attempt)


def first_fit(counts, attempt) -> tuple[int, MemoryBreakdown] | None:
    """The first of ``counts`` for which ``attempt(count)`` gives a breakdown (one that fits), with it; None when
    none does. The powers of two (and the last count) are tried in order and the first bracket that fits is
    bisected (``smallest_gpu_count`` says why): about 2 log2(len(counts)) attempts."""
    def at(index: int):
        breakdown = attempt(counts[index])
        return None if breakdown is None else (counts[index], breakdown)

    previous = -1
    for probe in _power_positions(counts):
        found = at(probe)
        if found is not None:
            low, high = previous + 1, probe  # counts[low:high] are untried; the answer is the first that fits
            while low < high:
                middle = (low + high) // 2
                smaller = at(middle)
                if smaller is not None:
                    found, high = smaller, middle
                else:
                    low = middle + 1
            return found
        previous = probe
    return None


def max_batch_size(model, gpu, *, limit: int = MAX_MICRO_BATCH, **options) -> int:
    """The largest micro-batch (sequences per GPU) whose step fits the GPU; 0 when not even one sequence fits;
    ``limit`` when even that fits (the caller says "at least").

    Every step is ``estimate()`` itself, so the answer is exact whatever the terms do. Device memory grows with the
    batch (activations and logits are linear in it, the rest is constant): the total at batch sizes 1 and 2 gives
    a linear guess; a galloping search from it (steps 1, 2, 4, ... up or down) brackets the answer and bisection
    ends it: about 2 log2(|guess error|) + 4 estimates, the standard library only.
    """
    if "batch_size" in options:
        raise VramcalcError("max_batch_size searches the batch size: leave --batch-size out")
    spec, device = get_model(model), get_gpu(gpu)
    top = positive_count(limit, "micro-batch limit")
    memory = device.memory_bytes

    def total(batch: int) -> int:
        try:
            return estimate(spec, gpu=device, batch_size=batch, **options).total_bytes
        except VramcalcError:
            if batch <= first + 1:
                raise  # the setup's own error, at the batch sizes every search starts from
            return memory + 1  # past the estimator's size bound (training_setup.oversize_error): it does not fit

    # the smallest batch the task runs: KTOTrainer's KL term needs two rows (task_setup.py), every other task one
    first = 2 if str(options.get("task", "")).strip().lower() == "kto" else 1
    one = total(first)
    if one > memory:
        return 0
    if top <= first:
        return first if top == first else 0
    two = total(first + 1)
    if two > memory:
        return first
    per_sequence = two - one
    guess = top if per_sequence <= 0 else min(top, max(first + 1, first + (memory - one) // per_sequence))
    if total(guess) <= memory:  # gallop up: low fits, high does not (or is past the limit)
        low, step = guess, 1
        while True:
            probe = low + step
            if probe > top:
                high = top + 1
                break
            if total(probe) > memory:
                high = probe
                break
            low, step = probe, step * 2
    else:  # gallop down to a size that fits (2 does)
        high, step = guess, 1
        while True:
            probe = max(first + 1, high - step)
            if total(probe) <= memory:
                low = probe
                break
            high, step = probe, step * 2
    while high - low > 1:  # low fits, high does not
        middle = (low + high) // 2
        if total(middle) <= memory:
            low = middle
        else:
            high = middle
    return low
