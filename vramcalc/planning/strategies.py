"""Which parallel setups ``plan`` searches on one GPU type, and how it names the one it chose.

A *strategy* is a way to lay the job over GPUs, as the knobs the user did not pin:

    data parallel    ``--sharding`` (none on one GPU, else the user's, else FSDP: full sharding), with QLoRA's 4-bit
                     codes packed in bf16 under FSDP / ZeRO-3 (FSDP-QLoRA, ``search.with_4bit_storage``)
    tensor parallel  ``--tp 2|4|8`` inside one node (``facts.GPUS_PER_NODE``), the families
                     ``parallel_degrees.TP_FAMILIES`` covers; dp = N / tp data-parallel ranks shard the rank's slice
                     with FSDP (transformers' ``(dp, tp)`` mesh, ``parallel_degrees``)
    device_map auto  the decoder layers in order over 2, 4 or 8 GPUs of one box, one GPU computing at a time
                     (accelerate's big-model inference map, ``terms/device_map.py``)
    expert parallel  ``--ep E`` for the MoE families ``parallel_degrees.EP_FAMILIES`` covers: E ranks share one
                     batch, each holding n/E experts and the dense layers whole, on exactly E GPUs (the layout the
                     estimate models, ``parallel_degrees.check_expert_degree``: no FSDP beside it), E a GPU count
                     that divides the expert count n
    EP over FSDP     ``--ep E --num-gpus N --sharding fsdp`` for the same families: every rank its own batch, the
                     dense layers FSDP-sharded over all N, each rank's n/E experts over the efsdp = N/E ranks that
                     hold the same ones (transformers' ``DistributedConfig(fsdp_size=N, ep_size=E)``,
                     ``parallel_degrees.check_expert_degree``); E a divisor of n from 2 up to the GPU type's node
                     (``cost.link_facts``' node_gpus: the all-to-all stays on the node link), N a multiple of E above
                     it that divides n: where N does not divide n FSDP2 pads every rank's expert shard (the estimate
                     warns), so those GPUs hold padding and plain FSDP covers such counts; not searched
    context parallel ``--cp 2|4|8`` for dense full-attention decoders under SDPA: a ring of C ranks inside one node
                     splits every sequence in C (torch's ring attention), FSDP2 shards over dp_shard x C = N GPUs
                     (accelerate's ``dp_shard_cp``, ``parallel_degrees.check_context_parallel``); not with --tp
                     unless the user gives both (the estimate accepts cp x tp; neither is traced with the other)

each with the setup's own gradient checkpointing and, when the user did not say and the setup does not checkpoint,
with ``grad_ckpt=full`` too; and, only when none of these fits on any count searched, data parallelism with
``--offload params`` (FSDP2 ``CPUOffloadPolicy`` / ZeRO-3 ``offload_param``), then ``--offload optimizer``
(ZeRO-3 ``offload_optimizer``), on hosts of at most ``PLAN_HOST_RAM_BYTES_PER_NODE`` each. A knob the user gave
(``sharding``, ``tp``, ``ep``, ``cp``, ``device_map``, ``offload``, ``quant_storage``, ``grad_ckpt``, ``num_gpus``) is
kept: no strategy changes it. Every candidate is a full ``estimate()``; the plan row builder (``plan_rows._gpu_row``)
then gives each candidate that fits its largest micro-batch, times and prices it, and keeps the cheapest by the plan's
ranking figure (``ranking.best_setup``), fewest GPUs on a tie.

Pruning (``candidates``): each strategy's GPU count is searched as ``search.first_fit`` searches the data-parallel
one (powers of two, then bisection); the strategies come in order of how much they change the job (the user's setup
first, then tensor parallelism, then device_map, then context parallelism, each plain before checkpointed), and a
later one is kept only when it fits on fewer GPUs than every earlier one. Tensor parallelism, device_map and the
ring need two GPUs or more, so they are never tried where one GPU is enough. Offload is tried only when nothing else
fits. Context parallelism tries its largest ring first: on as many GPUs or more, a larger ring holds less (1/C of
the activations, the same FSDP shards or smaller), so where it fits nowhere the smaller rings are not tried. A ring
is in the chain, kept only where it saves GPUs, because per token it does a data-parallel rank's work plus the
ring's K/V traffic and its partial-attention merges (which the step-time model does not charge): where FSDP alone
fits on as few GPUs, the ring buys nothing but a finer split of the micro-batch.

Expert parallelism is searched beside that chain, over every count up to the limit, and kept whenever it fits (not
where one GPU is enough): its gain is time more than GPUs (an EP group never gathers the experts, which FSDP
all-gathers every step, but repeats the dense layers' work on each of its ranks), so whether it is cheaper than
FSDP or device_map on as many GPUs is the ranking's call, not the GPU count's.

EP over FSDP is searched beside the chain too, one degree E at a time from the largest: on as many GPUs a larger
group gathers fewer experts per layer (n/E) for the same shards (dense 1/N, experts n/N), so it holds no more. So a
smaller E' is not searched on the counts from 2E to below E's fewest, where E did not fit (it may still fit fewer
GPUs, from 2E' < 2E), and not at all where E fits nowhere (memory falls with N where N divides n, so E' on fewer
GPUs holds more still). Each E that fits is a candidate on its fewest GPUs, for the ranking to price: a smaller group
sends fewer tokens over the all-to-all but gathers more experts per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from ..breakdown import MemoryBreakdown
from ..cost import link_facts
from ..errors import VramcalcError
from ..estimator import estimate
from ..facts import GPUS_PER_NODE
from ..options import DeviceMap, GradCkpt, Method, Offload, QuantStorage, Sharding
from ..parallel_degrees import EP_FAMILIES
from ..training_setup import resolve_setup
from .host_memory import host_ram
from .search import DEFAULT_MULTI_GPU_SHARDING, GpuCounts, at_count, first_fit, positive_count, with_4bit_storage

# the knobs a strategy sets, each kept when the user gives it (with num_gpus, which every search keeps)
STRATEGY_KNOBS = ("sharding", "tp", "ep", "cp", "device_map", "offload", "quant_storage", "grad_ckpt")
TP_DEGREES = (2, 4, 8)  # a tensor-parallel group inside one node of GPUS_PER_NODE GPUs
# a context-parallel ring inside one node: its K/V exchanges hide behind the attention kernels on NVLink, not on the
# inter-node links (step_time: exposed = max(0, cp comm - attention time))
CP_DEGREES = (2, 4, 8)
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
    EXPERT_PARALLEL = "expert parallel"
    EXPERT_OVER_FSDP = "expert parallel over fsdp"
    CONTEXT_PARALLEL = "context parallel"


@dataclass(frozen=True)
class Strategy:
    """One way to run the job: a layout, its tensor- or context-parallel degree, and the knobs plan sets on top of
    the user's (``grad_ckpt``, ``offload``: None leaves the user's or the default). ``baseline``: the user's own setup,
    whose errors are the user's (raised); any other strategy that the setup refuses is skipped. Expert parallelism
    runs on exactly ep GPUs, so its degree is the count searched: ``experts`` (the model's n) says which counts it
    may take (those dividing n). EP over FSDP runs its ``ep`` over N GPUs, N a multiple of ep above it that divides
    n (the user's own N, any multiple, when ``baseline``)."""

    layout: str
    tp: int = 1
    grad_ckpt: str | None = None
    offload: str | None = None
    baseline: bool = False
    cp: int = 1
    experts: int = 0
    ep: int = 1

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
        if self.layout == Layout.EXPERT_PARALLEL:  # one group sharing one batch: no data-parallel engine
            ep = options["ep"] if _given_degree(options, "ep") else count  # the user's --ep, else the count
            return dict(options, ep=ep, num_gpus=count, sharding=Sharding.NONE.value)
        if self.layout == Layout.EXPERT_OVER_FSDP:  # FSDP2 over all N ranks, the experts over efsdp = N / ep
            return dict(options, ep=self.ep, num_gpus=count, sharding=Sharding.FSDP.value)
        if self.layout == Layout.CONTEXT_PARALLEL:  # FSDP2 over dp_shard x cp, the only engine accelerate runs cp on
            return dict(options, cp=self.cp, num_gpus=count, sharding=Sharding.FSDP.value)
        return dict(options, device_map=DeviceMap.AUTO.value, num_gpus=count, sharding=Sharding.NONE.value)

    def counts(self, base: dict, top: int, low: int = 1, tail: bool = True, ruled_out: tuple = ()):
        """The GPU counts this strategy tries, from ``low`` up to ``top`` (the pinned ``num_gpus`` alone, if it is
        in that range and suits the layout); ``tail``: ``top`` itself is a count to try (the user's limit), not
        only a cap (``GpuCounts``); ``ruled_out``: EP over FSDP leaves out the counts of these ``range``\ s (where a
        larger degree did not fit, ``_beside_chain_candidates``)."""
        pinned = base.get("num_gpus")
        if pinned is not None:
            count = positive_count(pinned, "number of GPUs")
            suits = {Layout.DATA_PARALLEL: True, Layout.TENSOR_PARALLEL: count % self.tp == 0,
                     Layout.DEVICE_MAP: 2 <= count <= GPUS_PER_NODE,
                     Layout.CONTEXT_PARALLEL: count % (self.cp * self.tp) == 0,
                     Layout.EXPERT_PARALLEL: count > 1 and self._divides_experts(count),
                     Layout.EXPERT_OVER_FSDP: self.baseline or (count > self.ep and count % self.ep == 0 and
                                                                self._divides_experts(count))}[self.layout]
            return [count] if suits and low <= count <= top else []
        if self.layout == Layout.DATA_PARALLEL:
            return GpuCounts(top, low, tail) if top >= low else []
        if self.layout in (Layout.TENSOR_PARALLEL, Layout.CONTEXT_PARALLEL):
            degree = self.tp * (self.cp if self.layout == Layout.CONTEXT_PARALLEL else 1)  # cp x tp GPUs a ring
            return ScaledCounts(GpuCounts(top // degree, -(-low // degree), tail), degree) \
                if top >= max(low, degree) else []
        if self.layout == Layout.EXPERT_PARALLEL:  # the GPU counts that divide the experts (a short list)
            if _given_degree(base, "ep"):  # the user's --ep: its own count
                count = positive_count(base["ep"], "expert-parallel degree")
                return [count] if max(low, 2) <= count <= top else []
            return [n for n in GpuCounts(top, max(2, low), tail) if self._divides_experts(n)] \
                if top >= max(2, low) else []
        if self.layout == Layout.EXPERT_OVER_FSDP:  # multiples of ep above it that divide the experts
            over = [n for n in range(2 * self.ep, min(top, self.experts) + 1, self.ep)
                    if n >= low and self._divides_experts(n) and not any(n in gone for gone in ruled_out)]
            if not over and self.baseline:  # the user's --ep over FSDP where no count divides n: every multiple
                over = ScaledCounts(GpuCounts(top // self.ep, max(2, -(-low // self.ep)), tail), self.ep) \
                    if top >= max(low, 2 * self.ep) else []
            return over
        top = min(top, GPUS_PER_NODE)  # accelerate places the layers over the GPUs of one machine
        return GpuCounts(top, max(2, low), tail) if top >= max(2, low) else []

    def _divides_experts(self, count: int) -> bool:
        """``count`` GPUs can hold the experts in equal whole shares (transformers' ``MoEParamShard``)."""
        return self.experts > 0 and self.experts % count == 0


def _given_degree(options: dict, knob: str) -> bool:
    """The user gave a parallel degree other than 1 (``--tp 1``, ``--ep 1``, ``--cp 1``: none)."""
    return options.get(knob) is not None and str(options[knob]).strip() != "1"


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
    pair = _pair_maker(spec, options, offload)
    if offload is not None:  # data parallel with the offload, on its full-sharding engine
        return [pair(Layout.DATA_PARALLEL)]
    tp = positive_count(options["tp"], "tensor-parallel degree") if options.get("tp") is not None else 1
    if _given_degree(options, "cp"):  # the user's context-parallel ring (on its --tp groups, if given)
        return [pair(Layout.CONTEXT_PARALLEL, tp, baseline=True,
                     cp=positive_count(options["cp"], "context-parallel degree"))]
    if _given_degree(options, "ep"):  # the user's expert-parallel group, or EP over FSDP ranks
        if _ep_over_fsdp_given(options):
            return [pair(Layout.EXPERT_OVER_FSDP, baseline=True, experts=spec.num_experts,
                         ep=positive_count(options["ep"], "expert-parallel degree"))]
        return [pair(Layout.EXPERT_PARALLEL, baseline=True, experts=spec.num_experts)]
    if tp > 1:  # the user's tensor-parallel degree
        return [pair(Layout.TENSOR_PARALLEL, tp, baseline=True)]
    if str(options.get("device_map") or DeviceMap.NONE.value).strip().lower() != DeviceMap.NONE.value:
        return [pair(Layout.DEVICE_MAP, baseline=True)]
    out = [pair(Layout.DATA_PARALLEL, baseline=True)]
    if "tp" not in pinned and "offload" not in pinned and _sharding_composes_with_tp(options):
        out += [pair(Layout.TENSOR_PARALLEL, degree) for degree in TP_DEGREES]
    if not pinned & {"device_map", "sharding", "offload", "tp"}:
        out.append(pair(Layout.DEVICE_MAP))
    if not spec.is_moe and not pinned & {"cp", "offload"} and _sharding_composes_with_tp(options):
        out += [pair(Layout.CONTEXT_PARALLEL, cp=degree) for degree in sorted(CP_DEGREES, reverse=True)]
    return out


def _pair_maker(spec, options: dict, offload: Offload | None):
    """``pair(layout, tp, baseline, **degrees)``: the strategy with the setup's own checkpointing and, when plan may
    turn it on, the same with ``grad_ckpt=full`` (None otherwise)."""
    checkpoint = "grad_ckpt" not in pinned_knobs(options) and _default_grad_ckpt(spec, options) is GradCkpt.NONE

    def pair(layout, tp=1, baseline=False, **degrees):
        plain = Strategy(layout, tp=tp, offload=None if offload is None else offload.value, baseline=baseline,
                         **degrees)
        checked = Strategy(layout, tp=tp, grad_ckpt=GradCkpt.FULL.value, offload=plain.offload, **degrees) \
            if checkpoint else None
        return plain, checked

    return pair


def beside_chain(spec, options: dict, node_gpus: int = GPUS_PER_NODE) -> list[tuple[Strategy, Strategy | None]]:
    """The strategies searched beside ``families``' chain (module docstring), as pairs like ``families``', for an
    MoE model of ``parallel_degrees.EP_FAMILIES``: expert parallelism as one group (not where the user pinned a
    sharding other than none, nor ``--ep``: then ``families`` holds the user's own), then EP over FSDP for each
    degree E (``expert_over_fsdp_degrees``, largest first; the user's ``--ep`` alone where given and not already
    ``families``' own; not where the user pinned a sharding other than fsdp). None where the user pinned a knob both
    would change (``--tp``, ``--cp``, ``--device-map``, ``--offload``)."""
    if not spec.is_moe or spec.family not in EP_FAMILIES or _given_degree(options, "tp") or \
            _given_degree(options, "cp") or options.get("offload") is not None or \
            str(options.get("device_map") or DeviceMap.NONE.value).strip().lower() != DeviceMap.NONE.value:
        return []
    if options.get("ep") is not None and (not _given_degree(options, "ep") or _ep_over_fsdp_given(options)):
        return []  # --ep 1, or the user's own EP over FSDP (``families``)
    pair = _pair_maker(spec, options, None)
    sharding = str(options.get("sharding") or "").strip().lower()
    out = []
    if options.get("ep") is None and sharding in ("", Sharding.NONE.value):
        out.append(pair(Layout.EXPERT_PARALLEL, experts=spec.num_experts))
    if sharding in ("", Sharding.FSDP.value):
        degrees = [positive_count(options["ep"], "expert-parallel degree")] if options.get("ep") is not None \
            else expert_over_fsdp_degrees(spec.num_experts, node_gpus)
        out += [pair(Layout.EXPERT_OVER_FSDP, experts=spec.num_experts, ep=ep) for ep in degrees]
    return out


def expert_over_fsdp_degrees(experts: int, node_gpus: int) -> list[int]:
    """The EP degrees plan searches over FSDP ranks, largest first: the divisors of the expert count from 2 up to a
    node of ``node_gpus`` GPUs (the group's all-to-all on the node link) and at most half the experts (N = kE with
    k >= 2 dividing n/E: some multiple of E above it divides the experts)."""
    return [ep for ep in range(min(node_gpus, experts // 2), 1, -1) if experts % ep == 0]


def _ep_over_fsdp_given(options: dict) -> bool:
    """The user's --ep runs over FSDP ranks: ``--sharding fsdp`` or a ``--num-gpus`` above --ep given with it."""
    if str(options.get("sharding") or "").strip().lower() == Sharding.FSDP.value:
        return True
    return options.get("num_gpus") is not None and \
        positive_count(options["num_gpus"], "number of GPUs") > positive_count(options["ep"], "expert-parallel degree")


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
    """Every strategy that fits ``device`` on its fewest GPUs, each of ``families``' chain on fewer GPUs than the
    ones before it, in the order tried, then the expert-parallel one if it fits (``beside_chain``: on its own fewest
    GPUs, whatever the chain found; not where one GPU is enough); offloading ones only when no other fits. Empty
    when nothing fits up to ``max_gpus``.

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
        ring_fits_nowhere_up_to = 0  # the most GPUs a larger context-parallel ring was searched on in vain
        for plain, checked in families(spec, options, offload):
            if top < 1:
                break  # one GPU is enough
            ring = plain.layout == Layout.CONTEXT_PARALLEL and not plain.baseline
            if ring:
                searched = _ring_counts(spec, options, checked or plain, top, top == limit)
                if searched is None or searched <= ring_fits_nowhere_up_to:
                    continue
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
                if ring:
                    ring_fits_nowhere_up_to = max(ring_fits_nowhere_up_to, searched)
                continue
            kept = _fewest(spec, device, options, plain, top, low=saving.count if saving else low, tail=top == limit)
            if ring and kept is None and saving is None:
                ring_fits_nowhere_up_to = max(ring_fits_nowhere_up_to, searched)
            pair = [kept] + ([saving] if saving is not None and (kept is None or saving.count < kept.count) else [])
            found += [candidate for candidate in pair if candidate is not None]
            if found:
                top = min(candidate.count for candidate in found) - 1  # a later strategy must save GPUs
        if offload is None and top >= 1:
            found += _beside_chain_candidates(spec, device, options, limit)
        if found:
            return found
    return found


def _ring_counts(spec, options: dict, strategy: Strategy, top: int, tail: bool) -> int | None:
    """The most GPUs a context-parallel strategy is searched on up to ``top``, or None when it has no count there
    or the setup refuses it (a sequence its ring does not divide in 2 x cp chunks, a sliding-window model, ...):
    only a ring searched in vain rules out the smaller ones (module docstring)."""
    counts = strategy.counts(options, top, 1, tail)
    if not len(counts):
        return None
    try:
        resolve_setup(spec, **strategy.options(options, counts[0]))
    except VramcalcError:
        return None
    return counts[len(counts) - 1]


def _beside_chain_candidates(spec, device, options: dict, limit: int) -> list[Candidate]:
    """The strategies of ``beside_chain`` that fit, each on its fewest GPUs up to ``limit`` (checkpointed first,
    the plain one from there up, as in ``candidates``)."""
    found: list[Candidate] = []
    facts = link_facts(device)
    # EP over FSDP, largest degree E first: a smaller degree holds no less on as many GPUs (module docstring), so it
    # is not tried on the counts from 2E (E's first) below E's fewest, and not at all where E fits nowhere
    ruled_out: list[range] = []
    for plain, checked in beside_chain(spec, options, facts.node_gpus if facts else GPUS_PER_NODE):
        first = checked or plain
        over_fsdp = plain.layout == Layout.EXPERT_OVER_FSDP
        if over_fsdp and ruled_out and ruled_out[-1].stop > limit:
            continue  # a larger degree fits nowhere: this one does not either
        gone = tuple(ruled_out) if over_fsdp else ()
        if over_fsdp and not len(first.counts(options, limit, ruled_out=gone)):
            continue  # no count for this degree under the limit (2E GPUs or more): it rules nothing out
        saving = _fewest(spec, device, options, first, limit, ruled_out=gone)
        if over_fsdp:
            ruled_out.append(range(2 * plain.ep, limit + 1 if saving is None else saving.count))
        if saving is None:
            continue
        kept = _fewest(spec, device, options, plain, limit, low=saving.count, ruled_out=gone) \
            if checked is not None else None
        found += [kept] if kept is not None else []
        if kept is None or saving.count < kept.count:
            found.append(saving)
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
            tail: bool = True, ruled_out: tuple = ()) -> Candidate | None:
    """The strategy on the fewest of its counts from ``low`` to ``top`` that fit, or None (also when the setup
    refuses it). The user's own setup (``baseline``) raises the setup's errors, at its first count even when
    ``top`` is 0."""
    try:
        counts = strategy.counts(options, max(top, 1) if strategy.baseline else top, low, tail, ruled_out)
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
    bf16, offload params', 'tp 4 x dp 2 (fsdp)', 'device_map auto x2', 'ep 8', 'ep 8 over fsdp x64', 'cp 4 x dp 2 (fsdp)', '1 GPU'."""
    n, tp = setup.num_gpus, setup.tp
    ep, cp = setup.ep, setup.cp
    if setup.device_map is DeviceMap.AUTO:
        parts = [f"device_map auto x{n}"]
    elif cp > 1:  # FSDP2 shards over dp_shard x cp (x tp) = N: the ring's ranks are FSDP ranks too
        dp = n // (cp * tp)
        parts = [f"cp {cp}" + (f" x tp {tp}" if tp > 1 else "") + (f" x dp {dp}" if dp > 1 else "") +
                 f" ({setup.sharding.value})"]
    elif ep > 1 and n > ep:  # EP over FSDP ranks: every rank its own batch, the experts over N / ep of them
        parts = [f"ep {ep} over {setup.sharding.value} x{n}"]
    elif ep > 1:  # one group sharing one batch (parallel_degrees.check_expert_degree)
        parts = [f"ep {ep}"]
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
    for degree in ("ep", "cp"):
        if degree not in pinned and getattr(setup, degree) > 1:
            chosen.add(degree)
    if "device_map" not in pinned and setup.device_map is not DeviceMap.NONE:
        chosen.add("device_map")
    if "quant_storage" not in pinned and setup.method is Method.QLORA and setup.quant_storage is not QuantStorage.UINT8:
        chosen.add("quant_storage")
    return frozenset(chosen)
