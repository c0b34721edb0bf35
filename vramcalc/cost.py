"""Time and money of a fine-tuning job: FLOPs per token, utilisation, hours, and the rent, buy and energy bill.

FLOPs per trained token (``shared/reference/memory-math.md`` §9). Symbols: N_mm matmul parameters (every parameter
but the embedding, plus lm_head even when tied; MoE: the active ones), N_a trainable adapter parameters, L layers,
a heads, d_qk and d_v the per-head widths of q·kᵀ and of v (MLA: nope + rope and v_head_dim), s sequence length.

  attention forward      A = 2·L·a·s·(d_qk + d_v)       QKᵀ and PV, non-causal count (PaLM, Chowdhery et al. 2022,
                                                         App. B: 4·L·a·d·s when d_qk = d_v = d)
  full fine-tuning       6·N_mm + 3·A                    forward 2N, backward 4N (Kaplan et al. 2020; PaLM App. B)
  LoRA / QLoRA / prompt  4·N_mm + 6·N_a + 3·A            frozen weights skip their weight-gradient GEMMs, but the
                                                         input gradient still runs back through every layer
  + recomputation        + 2·N_mm (+ 2·N_a) + A          gradient checkpointing runs the forward twice

The model FLOPs (without recomputation) are the MFU definition's; the hardware FLOPs (with it) are what the GPU
executes. Time uses the hardware FLOPs: ``seconds per token = hardware FLOPs / (peak · utilisation)`` per GPU, so the
utilisation is the MFU of a run without checkpointing, and a checkpointed run takes 8/6 as long (full fine-tuning).
Eager attention adds the HBM traffic of its materialised ``[b, a, s, s]`` scores (a bandwidth term, not FLOPs).

Where ``data/achievable_rates.csv`` has rates for the GPU, time comes from the work of one step instead
(``step_for``: ``vramcalc/step_time.py`` — matmuls and attention at achievable rates, memory-bound bytes at the
achievable memory bandwidth (``step_time.achievable_bandwidth_gb_s``), host overhead per kernel, communication on the
ring's link with its overlap); an estimate on a named GPU carries its ``step_seconds``, ``tokens_per_second`` and
``mfu`` (``step_details``). Elsewhere, utilisation defaults per GPU generation come with their sources
(``MFU_BY_GENERATION``); an explicit MFU overrides both, and a calibration profile replaces the model
(``job_utilisation``, ``step_or_profile_utilisation``). Prices come from the catalogue and from data/cloud_prices.csv
and data/gpu_list_prices.csv, each with its date and source; a GPU without a price gets no cost (``None``), never 0.
"""

from __future__ import annotations

import csv
import functools
import statistics
from dataclasses import dataclass

from .catalogue import GpuSpec, data_dir, get_model
from .errors import VramcalcError, positive_number
from .facts import GPUS_PER_NODE
from .model import ModelSpec, ParamKind
from .options import Attention, Interconnect, Kernels, Loss, Method, Offload, Optimizer, Precision, Sharding
from .profiles import profile_data, runtime_profile
from . import step_time as _step
from .terms.distributed import Communication, communication_bytes_per_step
from .terms.parameters import stored_tensors
from .terms.runtime import RuntimeProfile
from .terms import expert_parallel as _ep
from .terms import tensor_parallel as _tp
from .terms import context_parallel as _cp
from .terms.activations import dtypes as _dtypes
from .training_setup import ResolvedSetup, resolve_setup

SECONDS_PER_HOUR = 3600
HOURS_PER_YEAR = 365 * 24
TFLOPS = 1e12  # the catalogue's dense peaks are in TFLOP/s
GB_PER_S = 1e9  # the catalogue's bandwidth is in GB/s (10^9 bytes)
W_PER_KW = 1000
TOKENS_PER_MILLION = 1_000_000

# US commercial-sector average retail price, 14.6 ¢/kWh: EIA Electric Power Monthly Table 5.6.A, as republished in
# energypricestoday.com/data/sources/electricity-prices.json (updated 2026-04-26). Override with usd_per_kwh.
DEFAULT_USD_PER_KWH = 0.146
DEFAULT_USD_PER_KWH_SOURCE = "EIA Electric Power Monthly Table 5.6.A, US commercial average (via energypricestoday.com, 2026-04-26)"
DEFAULT_AMORTISATION_YEARS = 3.0  # assumption: a common straight-line depreciation period for servers

# Eager attention (transformers ``eager_attention_forward``) moves each score of [b, a, s, s] through HBM as:
# the bf16 QKᵀ output (write 2), the scaling (read 2, write 2), the mask add (read 2, write 2), the fp32 softmax
# (read 2, write 4), its cast back (read 4, write 2) and the PV matmul's read (2): 24 bytes in forward. Backward is
# taken as twice the forward (assumption), so 72 bytes per score per layer, +24 more under recomputation.
EAGER_SCORE_FORWARD_BYTES = 24
EAGER_SCORE_BACKWARD_BYTES = 2 * EAGER_SCORE_FORWARD_BYTES

# QLoRA dequantizes every 4-bit weight before each matmul (bitsandbytes ``dequantize_4bit``) and its kernels reach a
# fraction of LoRA's throughput: memory-math §9 suggests 0.6-0.7 of LoRA (assumption, to be calibrated).
QLORA_THROUGHPUT_FACTOR = 0.65


@dataclass(frozen=True)
class Utilisation:
    """A model-FLOPs utilisation and where it comes from."""

    mfu: float
    source: str


# Default MFU of an HF Trainer + SDPA/FA2 fine-tuning run without recomputation, per GPU generation (the first word
# of the catalogue's ``architecture``). One source per row; "assumption" where none was found.
MFU_BY_GENERATION: dict[str, Utilisation] = {
    # memory-math §9 default for A100; fms-fsdp#67 ~48% by 6N on an FSDP-tuned stack; google/paxml#65 30-35%
    "Ampere": Utilisation(0.40, "default for Ampere: memory-math §9 (A100 0.40; fms-fsdp#67 48%, paxml#65 30-35%)"),
    # memory-math §9 default for H100; NVIDIA-NeMo/Automodel#646 34% Llama-3-70B (HF models); Llama 3 paper 38-43%
    "Hopper": Utilisation(0.30, "default for Hopper: memory-math §9 (H100 0.30; NeMo Automodel#646 34%)"),
    # pytorch/torchtitan#1201: 12% MFU against B200's 4.5 PFLOP/s sparse peak = 24% of the 2.25 dense (#1393)
    "Blackwell": Utilisation(0.24, "default for Blackwell: torchtitan#1201/#1393 (B200 ~24% of dense peak)"),
    # no published HF fine-tuning MFU found for Ada: between Ampere and Hopper (assumption)
    "Ada": Utilisation(0.35, "default for Ada: assumption (between Ampere 0.40 and Hopper 0.30)"),
    # PrimeIntellect-ai/prime-rl#1722: ~30-40% on MI325X (MI300X dies); pytorch/torchtitan#4779: 20-25% on MI350X
    "CDNA": Utilisation(0.30, "default for CDNA 3: prime-rl#1722 (~30-40% MI325X), torchtitan#4779 (20-25% MI350X)"),
    # fp16-only generations: no recent HF measurements found (assumption)
    "Turing": Utilisation(0.30, "default for Turing: assumption"),
    "Volta": Utilisation(0.30, "default for Volta: assumption"),
}
FALLBACK_UTILISATION = Utilisation(0.30, "default: assumption (unknown GPU generation)")


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs per dataset token: the MFU definition's, and what the GPU executes (with recomputation)."""

    model_flop_per_token: float
    hardware_flop_per_token: float


@dataclass(frozen=True)
class TrainingTime:
    """How long a job takes on ``num_gpus`` GPUs."""

    tokens_per_s: float  # dataset tokens per second, all GPUs together
    hours: float  # wall-clock
    gpu_hours: float


# -- FLOPs --------------------------------------------------------------------------------------------------------
def matmul_params(spec: ModelSpec) -> int:
    """N_mm: the parameters one token multiplies by: every active one but the embedding lookup, plus lm_head
    (counted even when tied to the embedding, since the tied matrix is still a [V, h] matmul)."""
    vocabulary_matrices = spec.inventory.numel(ParamKind.EMBEDDING, ParamKind.LM_HEAD)
    return spec.active_params - vocabulary_matrices + spec.vocab_size * spec.hidden_size


def attention_forward_flop_per_token(spec: ModelSpec, seq_len: int) -> int:
    """A = 2·L_attn·a·s·(d_qk + d_v): the QKᵀ and PV matmuls of one token against a sequence of ``seq_len`` in each
    attention layer (a hybrid's convolution layers have none; non-causal count, as PaLM App. B; causal kernels skip
    about half)."""
    return 2 * spec.num_attention_layers * spec.num_heads * seq_len * (spec.qk_head_dim + spec.v_dim)


def adapter_params(spec: ModelSpec, resolved: ResolvedSetup) -> int:
    """N_a: trainable parameters outside the base model (LoRA A and B, the prompt-tuning embedding)."""
    return sum(t.numel * t.count for t in stored_tensors(spec, resolved) if t.kind in ("adapter", "prompt"))


def lora_linears(spec: ModelSpec, resolved: ResolvedSetup) -> tuple[tuple[int, int, int], ...]:
    """(in, out, count) of each LoRA-adapted linear, from its lora_A (r, in) and lora_B (out, r) tensors; an adapted
    embedding is a lookup, not a GEMM, and is left out (``step_time.decoder_gemms``)."""
    adapters = {t.name: t for t in stored_tensors(spec, resolved) if t.kind == "adapter"}
    return tuple((a.shape[1], adapters[name[:-1] + "B"].shape[0], a.count) for name, a in adapters.items()
                 if name.endswith(".lora_A") and name[:-1] + "B" in adapters and "embed" not in name)


def training_flops(spec: ModelSpec, resolved: ResolvedSetup) -> TrainingFlops:
    """FLOPs per dataset token of one training step (see the module docstring). Prompt tuning processes its virtual
    tokens too: the per-token count is scaled by padded / data sequence length."""
    setup = resolved.setup
    s = setup.padded_seq_len
    n_mm = matmul_params(spec)
    attention = attention_forward_flop_per_token(spec, s)
    if setup.method is Method.FULL:
        n_a = 0
        model = 6 * n_mm + 3 * attention
    else:
        n_a = adapter_params(spec, resolved)
        model = 4 * n_mm + 6 * n_a + 3 * attention
    recompute = 2 * n_mm + 2 * n_a + attention if setup.grad_ckpt else 0
    per_data_token = s / setup.seq_len
    return TrainingFlops(model * per_data_token, (model + recompute) * per_data_token)


def eager_attention_seconds_per_token(spec: ModelSpec, resolved: ResolvedSetup, gpu: GpuSpec) -> float:
    """HBM time of eager attention's materialised scores per dataset token on one GPU:
    L·a·s·(24 + 48 [+ 24 recomputed]) bytes / B, B the GPU's achievable memory bandwidth
    (``step_time.achievable_bandwidth_gb_s``); 0 for sdpa and flash (scores never reach HBM)."""
    if resolved.attn_used is not Attention.EAGER or not gpu.bandwidth_gb_s:
        return 0.0
    setup = resolved.setup
    s = setup.padded_seq_len
    per_score = EAGER_SCORE_FORWARD_BYTES + EAGER_SCORE_BACKWARD_BYTES
    if setup.grad_ckpt:
        per_score += EAGER_SCORE_FORWARD_BYTES
    traffic_bytes = spec.num_attention_layers * spec.num_heads * s * per_score
    bandwidth_gb_s = _step.achievable_bandwidth_gb_s(gpu.name, gpu.bandwidth_gb_s, _step.rates_index(), gpu.memory_type)
    return traffic_bytes / (bandwidth_gb_s * GB_PER_S) * s / setup.seq_len


# -- peak and utilisation ------------------------------------------------------------------------------------------
def matmul_dtype(resolved: ResolvedSetup) -> str:
    """The dtype the matmuls run in: the autocast / parameter dtype, fp8 inputs under fp8, QLoRA's compute dtype
    (an fp32 QLoRA model's: bitsandbytes ``Linear4bit.set_compute_type`` takes its fp32 input's dtype)."""
    setup = resolved.setup
    if setup.method is Method.QLORA:
        return "fp32" if setup.precision is Precision.FP32 else setup.compute_dtype.value
    if setup.precision is Precision.FP8:
        return "fp8"
    return setup.precision.compute_dtype.value


def peak_flop_per_s(gpu: GpuSpec, dtype: str) -> float | None:
    """Dense peak of the GPU's matmuls in ``dtype`` (FLOP/s), or None when the GPU lacks that dtype."""
    tflops = {
        "bf16": gpu.bf16_dense_tflops if gpu.supports_bf16 else None,
        "fp16": gpu.fp16_dense_tflops,
        "fp8": gpu.fp8_dense_tflops,
        "fp32": gpu.fp32_tflops,
    }.get(dtype)
    return tflops * TFLOPS if tflops else None


def gpu_generation(gpu: GpuSpec) -> str:
    """'Hopper (GH100)' -> 'Hopper'; 'CDNA 3 (gfx942)' -> 'CDNA'; 'Ada Lovelace (AD102)' -> 'Ada'."""
    return (gpu.architecture or "").split(" ")[0].split("(")[0]


def default_utilisation(gpu: GpuSpec, method: Method) -> Utilisation:
    """The generation's MFU, times ``QLORA_THROUGHPUT_FACTOR`` for QLoRA (LoRA keeps the MFU on its 4N count)."""
    base = MFU_BY_GENERATION.get(gpu_generation(gpu), FALLBACK_UTILISATION)
    if method is Method.QLORA:
        return Utilisation(base.mfu * QLORA_THROUGHPUT_FACTOR, f"{base.source} x {QLORA_THROUGHPUT_FACTOR} for qlora")
    return base


def job_utilisation(gpu: GpuSpec, method: Method, mfu: float | None = None) -> Utilisation:
    """The utilisation a job runs at: the caller's ``mfu``, else the GPU's calibration profile, else the default.

    A profile (``calibration/profiles/<gpu>.json``, read by ``profiles.profile_data``) may hold
      ``"mfu": 0.37`` (every method) or ``"mfu": {"full": 0.37, "lora": 0.33, "qlora": 0.21}``, or
      ``"step_times": [{"model": ..., "step_seconds": ..., <TrainingSetup options>}, ...]``, measured steps from which
      ``refit_utilisation`` derives the MFU per method (the median of its runs).
    A method the profile does not cover takes the default.
    """
    if mfu is not None:
        value = positive_number(mfu, "MFU")
        if value > 1:
            raise VramcalcError(f"MFU is a fraction of the peak and must be at most 1, got {mfu!r}")
        return Utilisation(value, "given")
    data = profile_data(gpu.name) or {}
    given = data.get("mfu")
    if isinstance(given, (int, float)) and not isinstance(given, bool):
        return Utilisation(float(given), f"calibrated: {gpu.name}.json")
    if isinstance(given, dict) and method.value in given:
        return Utilisation(float(given[method.value]), f"calibrated: {gpu.name}.json")
    if data.get("step_times"):
        refit = refit_utilisation(data["step_times"], gpu)
        if method.value in refit:
            return refit[method.value]
    return default_utilisation(gpu, method)


def refit_utilisation(step_times: list[dict], gpu: GpuSpec) -> dict[str, Utilisation]:
    """MFU per method from measured steps: hardware FLOPs of the step's tokens on one GPU / (seconds · peak).

    Each record names ``model`` and ``step_seconds`` (one optimizer step, all micro-batches) plus any TrainingSetup
    options (batch_size, seq_len, grad_accum, method, ...). Records whose dtype the GPU lacks are skipped.
    """
    by_method: dict[str, list[float]] = {}
    for record in step_times:
        options = {key: value for key, value in record.items() if key not in ("model", "step_seconds")}
        spec = get_model(record["model"])
        resolved = resolve_setup(spec, **options)
        setup = resolved.setup
        peak = peak_flop_per_s(gpu, matmul_dtype(resolved))
        seconds = positive_number(record["step_seconds"], "step_seconds")
        if peak is None:
            continue
        tokens = setup.batch_size * setup.seq_len * setup.grad_accum  # per GPU, dataset tokens
        flops = training_flops(spec, resolved).hardware_flop_per_token * tokens
        by_method.setdefault(setup.method.value, []).append(flops / (seconds * peak))
    return {method: Utilisation(statistics.median(values), f"refit from {len(values)} measured steps: {gpu.name}.json")
            for method, values in by_method.items()}


# -- time ---------------------------------------------------------------------------------------------------------
def training_time(flops: TrainingFlops, tokens: float, epochs: float, num_gpus: int, peak: float, mfu: float,
                  memory_seconds_per_token: float = 0.0) -> TrainingTime:
    """hours = tokens · epochs · (FLOP/token / (peak · MFU) + memory s/token) / (GPUs · 3600)
    (memory-math §9: Llama-3-8B full FT, 1B tokens, s=4096 on one A100 at 40% ≈ 115 GPU-hours)."""
    seconds_per_token_per_gpu = flops.hardware_flop_per_token / (peak * mfu) + memory_seconds_per_token
    tokens_per_s = num_gpus / seconds_per_token_per_gpu
    hours = tokens * epochs / tokens_per_s / SECONDS_PER_HOUR
    return TrainingTime(tokens_per_s, hours, hours * num_gpus)


# -- step time from the work (vramcalc/step_time.py) ----------------------------------------------------------------
# Optimizer states per trainable parameter and their bytes for the optimizer step's HBM traffic
# (``step_time.optimizer_step_bytes``): (number of states, bytes per state or None for the parameter's own dtype).
# torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype; bitsandbytes 8-bit keeps 1 byte each and its
# 32-bit paged AdamW 4 bytes; SGD with momentum one buffer; Adafactor's factored second moment is O(rows + cols).
OPTIMIZER_STATES: dict[Optimizer, tuple[int, float | None]] = {
    Optimizer.ADAMW: (2, None),
    Optimizer.ADAMW_FOREACH: (2, None),
    Optimizer.ADAMW_8BIT: (2, 1.0),
    Optimizer.PAGED_ADAMW: (2, 4.0),
    Optimizer.PAGED_ADAMW_8BIT: (2, 1.0),
    Optimizer.SGD: (0, None),
    Optimizer.SGD_MOMENTUM: (1, None),
    Optimizer.ADAFACTOR: (0, None),
    # torchao's low-bit AdamW: uint8 / packed 4-bit / float8 codes (torchao/optim/subclass_*.py)
    Optimizer.ADAMW_8BIT_TORCHAO: (2, 1.0),
    Optimizer.ADAMW_4BIT_TORCHAO: (2, 0.5),
    Optimizer.ADAMW_FP8_TORCHAO: (2, 1.0),
}


def optimizer_bytes_per_param(resolved: ResolvedSetup) -> float:
    """HBM bytes the optimizer step moves per trainable parameter: 2·param + grad + 2·states·state_bytes
    (``step_time.optimizer_step_bytes``). Trainable parameters are the adapters' dtype for LoRA/QLoRA/prompt tuning
    (peft's fp32 by default), the setup's parameter dtype for full fine-tuning."""
    setup = resolved.setup
    if setup.method is Method.FULL:
        param_bytes = setup.precision.param_dtype.bits / 8
    else:
        param_bytes = 4.0 if setup.adapter_dtype.value == "fp32" else 2.0
    states, state_bytes = OPTIMIZER_STATES.get(setup.optimizer, (2, None))
    return _step.optimizer_step_bytes(1, param_bytes=param_bytes, grad_bytes=param_bytes,
                                      state_bytes=param_bytes if state_bytes is None else state_bytes,
                                      num_states=states)


@functools.lru_cache(maxsize=256)
def decoder_shape(spec: ModelSpec) -> _step.DecoderShape:
    """The model's widths for ``step_time``: active matmul parameters (MoE), MLA's q·k and v head widths, q/k norms."""
    return _step.DecoderShape(spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                              spec.intermediate_size, spec.vocab_size, active_matmul_params=matmul_params(spec),
                              qk_head_dim=spec.qk_head_dim, v_head_dim=spec.v_dim, total_params=spec.params,
                              attention_windows=attention_windows(spec), qk_norm=spec.qk_norm)


def attention_windows(spec: ModelSpec) -> tuple[int | None, ...] | None:
    """Per attention layer its sliding window or None (``ModelSpec.layer_slides``), a hybrid's convolution layers
    left out; None when every layer is full attention."""
    if not any(spec.layer_slides) and not spec.num_conv_layers:
        return None
    return tuple(spec.sliding_window if slides else None
                 for slides, conv in zip(spec.layer_slides, spec.layer_is_conv) if not conv)


@functools.lru_cache(maxsize=256)
def tensor_parallel_shape(spec: ModelSpec, tp: int) -> _step.DecoderShape:
    """``decoder_shape`` of one tensor-parallel rank's slice (``spec`` is ``rank_spec``'s already): the lm_head's
    ceil(V/T) columns in its matmul parameters, and the embedding's and lm_head's ceil(V/T) rows in the stored
    parameters the optimizer steps (``terms.tensor_parallel.vocab_sharded``). tp 1: ``decoder_shape``."""
    shape = decoder_shape(spec)
    if tp == 1:
        return shape
    from dataclasses import replace

    vocab, h = spec.vocab_size, spec.hidden_size
    columns = _tp.vocab_rows(vocab, tp)
    vocab_matrices = spec.inventory.numel(ParamKind.EMBEDDING, ParamKind.LM_HEAD)
    stored = spec.params - vocab_matrices + vocab_matrices // vocab * columns
    return replace(shape, lm_head_columns=columns, active_matmul_params=shape.matmul_params - (vocab - columns) * h,
                   total_params=stored)


@functools.lru_cache(maxsize=256)
def expert_parallel_shape(spec: ModelSpec, ep: int) -> _step.DecoderShape:
    """``decoder_shape`` of one expert-parallel rank (``--ep E``): its experts multiply T·K/E of the group's T·K
    (token, expert) pairs (uniform routing, ``terms.expert_parallel``), so the routed experts' K/n share of the
    matmul parameters per token is cut to 1/E; the optimizer steps n/E experts. Attention, router, shared experts
    and lm_head compute every token of the shared batch on every rank. ep 1: ``decoder_shape``."""
    shape = decoder_shape(spec)
    if ep == 1:
        return shape
    from dataclasses import replace

    routed = spec.inventory.numel(ParamKind.EXPERTS)
    active_routed = routed * spec.experts_per_token // spec.num_experts
    return replace(shape, active_matmul_params=shape.matmul_params - active_routed + active_routed // ep,
                   total_params=spec.params - routed + routed // ep)


def _loss_word(setup) -> str:
    """The step-time model's word for the loss's traffic (``step_time.LOSS_BYTES_PER_LOGIT``): ``model-dtype`` under
    autocast casts the shifted copy to fp32 and moves ``hf-shifted``'s bytes."""
    if setup.loss is Loss.MODEL_DTYPE and setup.precision.autocast:
        return Loss.HF_SHIFTED.value
    return setup.loss.value


@functools.lru_cache(maxsize=4096)
def step_for(spec: ModelSpec, resolved: ResolvedSetup, gpu: GpuSpec, paged_bytes: int = 0,
             profile: RuntimeProfile | None = None) -> _step.StepTime | None:
    """One optimizer step of this setup on one GPU of ``gpu`` from its work (``vramcalc.step_time``), or None where
    the model has no mechanism or no rate: an --offload setup (the optimizer runs on the host CPU), a matmul dtype
    without an achievable rate for the GPU (fp32, a GPU missing from data/achievable_rates.csv), or a job over
    several GPUs whose link the catalogue lacks. The caller then falls back to the per-generation MFU. An
    ``interconnect`` the GPU does not have (nvlink on a PCIe card) raises VramcalcError.

    The setup maps onto ``step_time.StepSetup`` (docs/time-and-cost-wiring.md): tokens = micro-batch x padded
    sequence x grad_accum on each data-parallel rank; the base trains only under full fine-tuning; LoRA's adapter
    parameters and adapted linears; grad_ckpt none | full | selective (selective recomputes the non-matmul ops only) | selective-op (and half the matmuls);
    compile or Liger kernels fuse the elementwise ops; the loss; QLoRA's 4-bit (nf4, fp4) or 8-bit (int8) base
    dequantized per pass; fp8 linears; the optimizer's state bytes; the data-parallel degree and sharding on the
    ring's bandwidth (``link_plan``: the GPU's links or ``--interconnect``), with each engine's overlap
    (``step_time.DATA_PARALLEL_OVERLAP_BY_SHARDING``); activation offload as overlapped PCIe copies; a paged
    optimizer's evicted states in and out over PCIe each step (``paged_bytes`` x 2 / pcie). optimizer_in_backward
    moves the same bytes (no change in work). Packing removes padding, and unpacked batches pad to their longest
    sequence, which depends on the dataset's lengths: the step counts every token of batch x seq_len in both cases
    (padding_fraction 0).

    ``--tp T``: ``spec`` and ``resolved`` are one rank's (``terms.tensor_parallel.rank_view``, as ``estimate`` passes
    them): a/T heads, k/T key/value heads, an MLP of I/T, so the layers' matmuls and attention are the rank's 1/T;
    the lm_head computes its ceil(V/T) columns (``tensor_parallel_shape``) while the norms, residual adds, the
    gathered [b, s, V] logits and the loss are whole on every rank; tokens are the group's (each rank computes every
    token of its data-parallel rank). The group's collectives (``terms.tensor_parallel.tensor_parallel_traffic``, the
    byte count ``details`` reports) run on the TP group's ring (``link_plan`` over T GPUs: the node link inside a node)
    with no overlap (``step_time.TENSOR_PARALLEL_OVERLAP``).
    """
    parts = step_work_for(spec, resolved, gpu, paged_bytes, profile)
    return None if parts is None else _step.step_time(*parts)


def step_work_for(spec: ModelSpec, resolved: ResolvedSetup, gpu: GpuSpec, paged_bytes: int = 0,
                  profile: RuntimeProfile | None = None) -> tuple[_step.StepWork, _step.StepRates] | None:
    """The work and the rates ``step_for`` times (``step_time.step_time(work, rates)``), or None where it has no
    step: its kernel counts, FLOPs and bytes, for comparisons that check them one by one. The host's time per
    launched kernel is ``profile``'s (``RuntimeProfile.host_seconds_per_kernel``); None: the GPU's calibration
    profile, or the default (``profiles.runtime_profile``), as ``estimate`` uses."""
    if profile is None:
        profile = runtime_profile(gpu)
    setup = resolved.setup
    links = checked_link_plan(gpu, setup)
    tp = _tp.tp_degree(resolved)
    tp_links = checked_link_plan(gpu, setup, tp) if tp > 1 else None
    if tp > 1 and tp_links is None:
        return None
    ep = _ep.ep_degree(resolved)  # --ep: the group's all-to-alls on its E GPUs' links (expert_parallel_shape)
    ep_links = checked_link_plan(gpu, setup, ep) if ep > 1 else None
    if ep > 1 and ep_links is None:
        return None
    cp = _cp.cp_degree(resolved)  # --cp: ``resolved`` is a rank's s/C view (``_cp.rank_view``); the ring spans cp x tp
    cp_links = checked_link_plan(gpu, setup, cp * tp) if cp > 1 else None
    if cp > 1 and cp_links is None:
        return None
    if setup.offload is not Offload.NONE:
        return None
    dtype = matmul_dtype(resolved)
    base_dtype = "bf16" if dtype == "fp8" else dtype
    rates = _step.rates_index()
    mm = _step.achievable_rate(gpu.name, "matmul", base_dtype, rates)
    attn = _step.achievable_rate(gpu.name, "attention", base_dtype, rates)
    fp8 = _step.achievable_rate(gpu.name, "matmul", "fp8", rates) if dtype == "fp8" else None
    peak = peak_flop_per_s(gpu, base_dtype)
    if mm is None or attn is None or peak is None or (dtype == "fp8" and fp8 is None) or not gpu.bandwidth_gb_s:
        return None
    dp = setup.num_gpus if setup.sharding is not Sharding.NONE else 1
    if dp > 1 and links is None:
        return None
    link_gb_s = links.ring_gb_s if dp > 1 else 0.0
    shape = tensor_parallel_shape(spec, tp)
    lora = setup.method.uses_lora
    paged_s = 2 * paged_bytes / (gpu.pcie_gb_s * GB_PER_S) if paged_bytes and gpu.pcie_gb_s else 0.0
    ep_s = 0.0
    if ep > 1:  # AllToAllEP: the experts wait for the dispatch, the next op for the combine: no overlap
        shape = expert_parallel_shape(spec, _ep.slot_share(resolved))  # over FSDP ranks: its own batch's T·K pairs
        ep_s = _step.comm_seconds(_ep.expert_parallel_traffic(spec, resolved, _dtypes(
            setup.method, setup.precision, setup.adapter_dtype).c).total_bytes, ep_links.ring_gb_s)
    work_setup = _step.StepSetup(
        tokens=setup.batch_size * setup.padded_seq_len * cp * setup.grad_accum, seq_len=setup.padded_seq_len * cp,
        cp=cp, cp_comm_bytes=float(_cp.context_parallel_traffic(spec, _cp.whole_job(resolved), _dtypes(
            setup.method, setup.precision, setup.adapter_dtype).c).total_bytes) if cp > 1 else 0.0,
        train_base=setup.method is Method.FULL, adapter_params=0 if setup.method is Method.FULL else
        adapter_params(spec, resolved), grad_ckpt=setup.grad_ckpt.recompute.value,
        fused_elementwise=bool(setup.compile) or setup.kernels is Kernels.LIGER, loss=_loss_word(setup),
        quant_bits=setup.quant.bits if setup.method is Method.QLORA else 0,
        fp8_linears=setup.precision is Precision.FP8, optimizer_bytes_per_param=optimizer_bytes_per_param(resolved),
        dp=dp, sharding=setup.sharding.value, serial_extra_s=paged_s + ep_s, micro_batches=setup.grad_accum,
        adapted_linears=len(resolved.lora_modules) * spec.num_layers if lora else 0,
        attention_kernel=resolved.attn_used.value,
        activation_offload=bool(setup.activation_offload), pcie_gb_s=float(gpu.pcie_gb_s or 0.0),
        lora_linears=lora_linears(spec, resolved) if lora else (), lora_rank=setup.lora_rank if lora else 0,
        lora_dropout=lora and setup.lora_dropout > 0, adapter_bytes=4.0 if setup.adapter_dtype.value == "fp32" else 2.0,
        tp_comm_bytes=float(_tp.tensor_parallel_traffic(spec, resolved, _dtypes(
            setup.method, setup.precision, setup.adapter_dtype).c).total_bytes) if tp > 1 else 0.0)
    if setup.device_map.value == "auto":  # one GPU computes at a time; the hidden state crosses each boundary
        from dataclasses import replace

        from .terms import device_map as _dm

        try:
            _, link_gb_s = ring_link(gpu, 2)  # neighbouring GPUs of one box
        except VramcalcError:
            return None
        work_setup = replace(work_setup, serial_extra_s=work_setup.serial_extra_s + _step.pipeline_transfer_seconds(
            work_setup.tokens, spec.hidden_size, _dm.pipeline_boundaries(_dm.placement(
                spec, setup.precision, _dm.method_quant(setup.method, setup.quant), setup.num_gpus)), link_gb_s,
            recompute_forwards=_step.RECOMPUTE_BY_MODE[setup.grad_ckpt.recompute.value][0]))
    work = _step.step_work(shape, work_setup, matmul_tflops=mm.tflops, fp8_matmul_tflops=fp8.tflops if fp8 else None,
                           dp_link_gb_s=link_gb_s, tp_link_gb_s=tp_links.ring_gb_s if tp_links else 0.0,
                           cp_link_gb_s=cp_links.ring_gb_s if cp_links else 0.0)
    bandwidth_gb_s = _step.achievable_bandwidth_gb_s(gpu.name, gpu.bandwidth_gb_s, rates, gpu.memory_type)
    return work, _step.StepRates(mm.tflops, attn.tflops, bandwidth_gb_s, peak / TFLOPS,
                                 host_s_per_kernel=profile.host_seconds_per_kernel,
                                 attention_backward_tflops=_step.attention_backward_tflops(attn))


def step_details(spec: ModelSpec, resolved: ResolvedSetup, gpu: GpuSpec, paged_bytes: int = 0) -> dict:
    """The ``details`` an estimate on a named GPU carries: step_seconds, tokens_per_second (dataset tokens, all GPUs
    of the job), tokens_per_second_per_gpu, mfu (model FLOPs / datasheet dense peak) and step_breakdown_s; empty
    when ``step_for`` has no step for the setup."""
    step = step_for(spec, resolved, gpu, paged_bytes)
    if step is None:
        return {}
    setup = resolved.setup
    ranks = setup.num_gpus if setup.sharding is not Sharding.NONE else 1  # --tp: the data-parallel ranks (rank_view)
    tp = _tp.tp_degree(resolved) * _ep.slot_share(resolved)  # one --ep group also shares its tokens (not over FSDP)
    per_gpu = step.tokens_per_s * setup.seq_len / setup.padded_seq_len  # dataset tokens (prompt tuning's are extra)
    idle = setup.num_gpus if setup.device_map.value == "auto" else 1  # a naive pipeline: one GPU busy at a time
    # --tp: each rank of a group computes all of the group's tokens, so per_gpu is the group's and a GPU's is 1/tp
    out = {"step_seconds": step.step_s, "tokens_per_second": per_gpu * ranks,
           "tokens_per_second_per_gpu": per_gpu / idle / tp, "mfu": step.mfu / idle,
           "step_breakdown_s": step.breakdown_s()}
    if tp > 1:  # the group's collectives, all on the critical path (part of exposed_communication)
        out["tp_communication_seconds_per_step"] = step.tensor_parallel_comm_s
        out["tp_interconnect"] = checked_link_plan(gpu, setup, tp).to_dict()
    if _ep.ep_degree(resolved) > 1:  # the group's all-to-alls and gathers, on the critical path
        ep = _ep.ep_degree(resolved)
        out["ep_communication_seconds_per_step"] = _step.comm_seconds(_ep.expert_parallel_traffic(
            spec, resolved, _dtypes(setup.method, setup.precision, setup.adapter_dtype).c).total_bytes,
            checked_link_plan(gpu, setup, ep).ring_gb_s)
        out["ep_interconnect"] = checked_link_plan(gpu, setup, ep).to_dict()
    cp = _cp.cp_degree(resolved)
    if cp > 1:  # the ring's transfers and what the attention kernels leave exposed of them
        cp_links = checked_link_plan(gpu, setup, cp * tp)
        cp_s = _step.comm_seconds(_cp.context_parallel_traffic(spec, _cp.whole_job(resolved), _dtypes(
            setup.method, setup.precision, setup.adapter_dtype).c).total_bytes, cp_links.ring_gb_s)
        out["cp_communication_seconds_per_step"] = cp_s
        out["cp_exposed_communication_seconds_per_step"] = max(0.0, cp_s - step.attention_s)
        out["cp_interconnect"] = cp_links.to_dict()
    links = checked_link_plan(gpu, setup)
    if ranks > 1 and links is not None:  # the links the ring ran on and the share of the step left exposed
        out["interconnect"] = links.to_dict()
        out["exposed_communication_fraction"] = step.exposed_comm_s / step.step_s
    return out


def step_or_profile_utilisation(spec: ModelSpec, resolved: ResolvedSetup, gpu: GpuSpec, mfu: float | None = None,
                                paged_bytes: int = 0) -> tuple[float | None, Utilisation]:
    """Seconds per dataset token on one GPU from the step-time model, or None, and the utilisation that applies.

    Precedence: an explicit ``mfu`` (the user's override); then a calibration profile for the GPU
    (``job_utilisation``); then the step-time model; then the per-generation default."""
    setup = resolved.setup
    data = profile_data(gpu.name) or {}
    calibrated = "mfu" in data or bool(data.get("step_times"))
    if mfu is not None or calibrated:
        return None, job_utilisation(gpu, setup.method, mfu)
    step = step_for(spec, resolved, gpu, paged_bytes)
    if step is None:
        return None, job_utilisation(gpu, setup.method)
    # a --tp or --ep group computes on its shared tokens (step_details' per-GPU share); a --cp rank's step counts
    # its own s/C positions already
    per_gpu = step.tokens_per_s * setup.seq_len / setup.padded_seq_len / (_tp.tp_degree(resolved) *
                                                                         _ep.slot_share(resolved))
    return 1.0 / per_gpu, Utilisation(step.mfu, "step-time model (vramcalc/step_time.py, data/achievable_rates.csv)")


# -- communication time --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CommunicationTime:
    """One rank's traffic per optimizer step (``terms.distributed.Communication``) and its time on the slowest link
    of the ring."""

    traffic: Communication
    link: str  # the link that limits the ring: "nvlink", "pcie", "infiniband", or "none" without communication
    link_gb_s: float | None  # its bandwidth per GPU and direction (GB/s = 1e9 B/s); None without communication

    @property
    def total_bytes(self) -> int:
        return self.traffic.total_bytes

    @property
    def all_reduce_bytes(self) -> int:
        return self.traffic.all_reduce_bytes

    @property
    def reduce_scatter_bytes(self) -> int:
        return self.traffic.reduce_scatter_bytes

    @property
    def all_gather_bytes(self) -> int:
        return self.traffic.all_gather_bytes

    @property
    def seconds(self) -> float:
        """bytes / (GB/s · 1e9 · NCCL's bus efficiency): the step-time model's own rule (``step_time.comm_seconds``),
        so the displayed time and the time inside ``step_seconds`` are one figure; latency and overlap with compute
        are ignored here: the communication a step must hide."""
        if self.link_gb_s is None:
            return 0.0
        return _step.comm_seconds(self.total_bytes, self.link_gb_s)


# -- the interconnect: data/gpu_links.csv and the --interconnect choice ------------------------------------------
@dataclass(frozen=True)
class LinkFacts:
    """One row of data/gpu_links.csv: a GPU's links and its typical node, each with its source. The bandwidths
    themselves are the catalogue's (data/gpus.csv ``nvlink_bidir_gb_s``, ``pcie_gb_s``, ``infiniband_gb_s``)."""

    gpu: str
    nvlink_generation: str  # "2".."5", "infinity-fabric" (AMD), "" without an NVLink switch
    nvlink_source: str
    pcie_generation: int
    pcie_source: str
    node_gpus: int  # GPUs in the GPU's typical node (HGX/DGX board, cloud instance, PCIe server)
    nics_per_node: int  # scale-out NICs per node: one per GPU on HGX/DGX, else one (assumption, see node_source)
    node_source: str


@functools.lru_cache(maxsize=1)
def link_facts_table() -> dict[str, LinkFacts]:
    """data/gpu_links.csv by GPU name (read once)."""
    with open(data_dir() / "gpu_links.csv", newline="", encoding="utf-8") as handle:
        return {r["gpu"]: LinkFacts(r["gpu"], r["nvlink_generation"], r["nvlink_source"], int(r["pcie_generation"]),
                                    r["pcie_source"], int(r["node_gpus"]), int(r["nics_per_node"]), r["node_source"])
                for r in csv.DictReader(handle)}


def link_facts(gpu: GpuSpec) -> LinkFacts | None:
    """The GPU's link facts, or None for a GPU data/gpu_links.csv does not list (a profile's or a user's GPU)."""
    return link_facts_table().get(gpu.name)


# Networks between nodes, GB/s per NIC and direction: InfiniBand NDR 400 Gb/s = 50 GB/s (S52 in
# data/gpus_sources.md: HDR 200 / NDR 400 / XDR 800 Gb/s; DGX H100's ConnectX-7, S56) where the catalogue gives the
# GPU's reference node no figure of its own (``infiniband_gb_s``: A100's 200 Gb/s HDR); Ethernet 100 GbE = 12.5 GB/s
# per port, the commodity cluster's link (NCCL's maintainer: "24GB/s is the peak performance per 200G NIC (12 GB/s
# for 100G NICs)", NVIDIA/nccl-tests#119). RoCE at 400 GbE performs like InfiniBand NDR: choose infiniband for it.
NETWORK_GB_S_PER_NIC = {Interconnect.INFINIBAND: 50.0, Interconnect.ETHERNET: 12.5}


@dataclass(frozen=True)
class LinkPlan:
    """The links a job's data-parallel ring runs on: the node link (``nvlink`` or ``pcie``, GB/s per GPU and
    direction) inside nodes of ``gpus_per_node`` GPUs, and the network between nodes (``infiniband`` or
    ``ethernet``, GB/s per NIC, ``nics_per_node`` NICs), used once ``ranks`` exceeds a node; ``origin`` says where
    the choice came from. The ring's pace is ``step_time.ring_bus_gb_s``: the slowest link in the ring."""

    node_link: str
    node_link_gb_s: float
    gpus_per_node: int
    network: str
    nic_gb_s: float
    nics_per_node: int
    ranks: int
    origin: str

    @property
    def spans_nodes(self) -> bool:
        return self.ranks > self.gpus_per_node

    @property
    def ring_gb_s(self) -> float:
        """The ring's bus bandwidth per GPU and direction (before NCCL's efficiency)."""
        return _step.ring_bus_gb_s(self.node_link_gb_s, self.ranks, min(self.ranks, self.gpus_per_node),
                                   self.nic_gb_s, self.nics_per_node)

    @property
    def limiting_link(self) -> str:
        """The link that sets the ring's pace: the node link, or the network when its NICs are slower."""
        if self.spans_nodes and self.ring_gb_s < self.node_link_gb_s:
            return self.network
        return self.node_link

    @property
    def word(self) -> str:
        """'nvlink', 'pcie', or 'nvlink+infiniband' etc. once the job spans nodes (plan rows, CSV)."""
        return f"{self.node_link}+{self.network}" if self.spans_nodes else self.node_link

    def to_dict(self) -> dict:
        out = {"node_link": self.node_link, "node_link_gb_s": self.node_link_gb_s,
               "gpus_per_node": self.gpus_per_node, "nodes": -(-self.ranks // self.gpus_per_node)}
        if self.spans_nodes:
            out.update(network=self.network, network_gb_s_per_nic=self.nic_gb_s, nics_per_node=self.nics_per_node)
        out.update(ring_link=self.limiting_link, ring_gb_s=self.ring_gb_s, origin=self.origin)
        return out


def link_plan(gpu: GpuSpec, ranks: int, interconnect: Interconnect | str | None = None) -> LinkPlan:
    """The links a ring over ``ranks`` GPUs of this model runs on. ``interconnect`` None: the GPU's own node link
    (NVLink, half its bidirectional catalogue figure, where the GPU has an NVLink switch; else its PCIe x16 link)
    and InfiniBand between nodes; ``nvlink`` / ``pcie`` choose the node link, ``infiniband`` / ``ethernet`` the
    network (the other keeps its default). A VramcalcError for a link the GPU does not have (nvlink without NVLink)
    or a GPU without a PCIe figure."""
    choice = None if interconnect is None else Interconnect.parse(interconnect, "interconnect")
    facts = link_facts(gpu)
    gpus_per_node = facts.node_gpus if facts else GPUS_PER_NODE
    nics = facts.nics_per_node if facts else 1
    if choice is Interconnect.NVLINK and not gpu.nvlink_bidir_gb_s:
        pcie = f" (its cards talk over PCIe Gen{facts.pcie_generation})" if facts else ""
        raise VramcalcError(f"--interconnect nvlink: {gpu.name} has no NVLink switch{pcie}; use pcie")
    if choice is Interconnect.PCIE or not gpu.nvlink_bidir_gb_s:
        if not gpu.pcie_gb_s:
            raise VramcalcError(f"the catalogue has no interconnect bandwidth for {gpu.name}")
        node_link, node_gb_s = "pcie", float(gpu.pcie_gb_s)
    else:
        node_link, node_gb_s = "nvlink", gpu.nvlink_bidir_gb_s / 2
    network = choice if choice is not None and choice.between_nodes else Interconnect.INFINIBAND
    nic_gb_s = NETWORK_GB_S_PER_NIC[network]
    if network is Interconnect.INFINIBAND and gpu.infiniband_gb_s:
        nic_gb_s = float(gpu.infiniband_gb_s)  # the reference node's own NIC (A100: 200 Gb/s HDR)
    if choice is None:
        what = f"NVLink {facts.nvlink_generation}" if facts and node_link == "nvlink" else (
            f"no NVLink switch: PCIe Gen{facts.pcie_generation}" if facts else node_link)
        origin = f"default: {gpu.name} has {what} (data/gpu_links.csv)"
        if ranks > gpus_per_node:
            origin += f"; infiniband between nodes of {gpus_per_node}"
    elif choice.between_nodes:
        origin = f"user (between nodes); inside a node the default {node_link}"
        if ranks <= gpus_per_node:
            origin += f" (the network is unused: {ranks} GPUs fit one node of {gpus_per_node})"
    else:
        origin = "user" + (f"; infiniband between nodes of {gpus_per_node}" if ranks > gpus_per_node else "")
    return LinkPlan(node_link, node_gb_s, gpus_per_node, network.value, nic_gb_s, nics, max(int(ranks), 1), origin)


def checked_link_plan(gpu: GpuSpec, setup, ranks: int | None = None) -> LinkPlan | None:
    """``link_plan`` for a setup over ``ranks`` GPUs (None: ``setup.num_gpus``): a link the user chose that the GPU
    lacks raises (bad input); a GPU the catalogue gives no link figure gives None (no step-time model over several
    GPUs)."""
    ranks = setup.num_gpus if ranks is None else ranks
    if setup.interconnect is Interconnect.NVLINK and not gpu.nvlink_bidir_gb_s:
        link_plan(gpu, ranks, setup.interconnect)  # raises the one-line error
    try:
        return link_plan(gpu, ranks, setup.interconnect)
    except VramcalcError:
        return None


def interconnect_input(setup, gpu: GpuSpec) -> tuple[str, str]:
    """(value, origin) of ``interconnect`` in an estimate's ``inputs`` on a named GPU: the user's word, else the
    node link the GPU defaults to (a word --interconnect takes, so the inputs round-trip to the same time)."""
    plan = link_plan(gpu, setup.num_gpus, setup.interconnect)
    value = setup.interconnect.value if setup.interconnect is not None else plan.node_link
    return value, plan.origin


def ring_link(gpu: GpuSpec, n_ranks: int, network_gb_s: float | None = None,
              interconnect: Interconnect | str | None = None) -> tuple[str, float]:
    """The link that limits a ring over ``n_ranks`` GPUs of this model and the ring's GB/s per GPU and direction
    (``link_plan``): the node link inside a node; across nodes the slower of it and the node's NICs together
    (``step_time.ring_bus_gb_s``). ``network_gb_s`` replaces the NIC's figure."""
    plan = link_plan(gpu, n_ranks, interconnect)
    if network_gb_s is not None:
        plan = LinkPlan(plan.node_link, plan.node_link_gb_s, plan.gpus_per_node, plan.network, float(network_gb_s),
                        plan.nics_per_node, plan.ranks, plan.origin)
    return plan.limiting_link, plan.ring_gb_s


def communication_per_step(spec: ModelSpec, resolved: ResolvedSetup, gpu: GpuSpec,
                           network_gb_s: float | None = None) -> CommunicationTime:
    """The step's traffic (``communication_bytes_per_step``) on the slowest link of the ring over the job's GPUs."""
    traffic = communication_bytes_per_step(spec, resolved)
    if resolved.setup.sharding is Sharding.NONE or resolved.setup.num_gpus == 1:
        return CommunicationTime(traffic, "none", None)
    link, bandwidth = ring_link(gpu, resolved.setup.num_gpus, network_gb_s, resolved.setup.interconnect)
    return CommunicationTime(traffic, link, bandwidth)


# -- money --------------------------------------------------------------------------------------------------------
def rent_cost_usd(usd_per_gpu_hour: float | None, num_gpus: int, hours: float) -> float | None:
    """Cloud $/GPU-hour × GPUs × hours; None when the catalogue has no price."""
    if usd_per_gpu_hour is None:
        return None
    return usd_per_gpu_hour * num_gpus * hours


def buy_cost_usd(list_price_usd: float | None, num_gpus: int) -> float | None:
    """List price × GPUs (the GPUs only: no server, network, power or cooling); None without a list price."""
    if list_price_usd is None:
        return None
    return list_price_usd * num_gpus


def amortised_buy_cost_usd(list_price_usd: float | None, num_gpus: int, hours: float,
                           amortisation_years: float) -> float | None:
    """The job's straight-line share of the purchase: price × GPUs × hours / (years · 8760 h)."""
    years = positive_number(amortisation_years, "amortisation horizon (years)")
    capex = buy_cost_usd(list_price_usd, num_gpus)
    if capex is None:
        return None
    return capex * hours / (years * HOURS_PER_YEAR)


def energy_kwh(tdp_w: float | None, num_gpus: int, hours: float) -> float | None:
    """GPU board power at TDP × GPUs × hours (an upper bound for the GPUs; hosts and cooling not counted)."""
    if tdp_w is None:
        return None
    return tdp_w * num_gpus * hours / W_PER_KW


def energy_cost_usd(kwh: float | None, usd_per_kwh: float) -> float | None:
    price = positive_number(usd_per_kwh, "electricity price ($/kWh)")
    return None if kwh is None else kwh * price


# -- price tables: data/cloud_prices.csv, data/gpu_list_prices.csv (sources in data/prices_sources.md) -------------
@dataclass(frozen=True)
class CloudRate:
    """One $/GPU-hour rate of data/cloud_prices.csv with its provider, region, date and source."""

    provider: str
    instance: str
    gpu: str
    pricing_model: str
    usd_per_gpu_hour: float
    region: str
    price_date: str
    source: str

    @property
    def kind(self) -> str:
        """on-demand | spot | reserved: marketplace rates count as on-demand; committed use, contracts and prepaid
        capacity blocks as reserved."""
        model = self.pricing_model.lower()
        if model.startswith("spot"):
            return "spot"
        if model.startswith(("reserved", "1-year", "3-year", "capacity-block", "committed")):
            return "reserved"
        return "on-demand"


@dataclass(frozen=True)
class ListPrice:
    """One row of data/gpu_list_prices.csv: a GPU unit, a server's cost per GPU, a network port or the PUE."""

    item: str
    gpu: str
    kind: str  # gpu_unit | server_per_gpu | server_all_in_per_gpu | network_per_gpu_port | pue
    value: float
    basis: str
    price_date: str
    source: str


@functools.lru_cache(maxsize=1)
def cloud_rates() -> tuple[CloudRate, ...]:
    """Every row of data/cloud_prices.csv (read once)."""
    with open(data_dir() / "cloud_prices.csv", newline="", encoding="utf-8") as handle:
        return tuple(CloudRate(r["provider"], r["instance"], r["gpu"], r["pricing_model"], float(r["usd_per_gpu_hour"]),
                               r["region"], r["price_date"], r["source"])
                     for r in csv.DictReader(handle) if r["usd_per_gpu_hour"].strip())


def cheapest_rates(gpu_name: str) -> dict[str, CloudRate]:
    """The cheapest rate of each kind (on-demand, spot, reserved) for a GPU; kinds without a row are absent."""
    best: dict[str, CloudRate] = {}
    for rate in cloud_rates():
        if rate.gpu == gpu_name and (rate.kind not in best or rate.usd_per_gpu_hour < best[rate.kind].usd_per_gpu_hour):
            best[rate.kind] = rate
    return best


@functools.lru_cache(maxsize=1)
def list_prices() -> tuple[ListPrice, ...]:
    """Every row of data/gpu_list_prices.csv (read once)."""
    with open(data_dir() / "gpu_list_prices.csv", newline="", encoding="utf-8") as handle:
        return tuple(ListPrice(r["item"], r["gpu"], r["kind"], float(r["value"]), r["basis"], r["price_date"],
                               r["source"]) for r in csv.DictReader(handle))


def _list_row(kind: str, gpu_name: str = "", basis: str | None = None) -> ListPrice | None:
    for row in list_prices():
        if row.kind == kind and row.gpu == gpu_name and (basis is None or row.basis == basis):
            return row
    return None


def gpu_list_price(gpu: GpuSpec) -> ListPrice | None:
    """The GPU's unit price: data/gpu_list_prices.csv, else the catalogue's list_price_usd (with its basis)."""
    row = _list_row("gpu_unit", gpu.name)
    if row is not None:
        return row
    if gpu.list_price_usd is None:
        return None
    return ListPrice(gpu.display_name, gpu.name, "gpu_unit", float(gpu.list_price_usd), gpu.list_price_basis or "",
                     "", "data/gpus.csv list_price_usd")


def server_cost_per_gpu(gpu: GpuSpec) -> ListPrice | None:
    """The non-GPU share of a server per GPU (chassis, CPUs, RAM, NICs, storage), for GPUs sold in 8-GPU NVLink
    baseboards (HGX/OAM class: the catalogue gives them an NVLink bandwidth): the derived Thinkmate 8x H100 row
    ($317,000 / 8 minus the GPU). Workstation and PCIe cards go into hosts of other shapes: None (not priced)."""
    if not gpu.nvlink_bidir_gb_s:
        return None
    return _list_row("server_per_gpu", "h100-sxm", "derived")


def network_port_price() -> ListPrice | None:
    """One 400 Gb/s InfiniBand switch port per GPU (data/gpu_list_prices.csv)."""
    return _list_row("network_per_gpu_port")


def pue() -> ListPrice | None:
    """The data-centre power usage effectiveness (facility / IT power) with its source."""
    return _list_row("pue")


def buy_total_usd(gpu: GpuSpec, num_gpus: int) -> float | None:
    """(GPU + server per GPU) x GPUs + one network port per GPU once the job spans nodes (GPUS_PER_NODE); None
    without a GPU price. Where no server cost applies (workstation cards) the GPUs alone are counted."""
    unit = gpu_list_price(gpu)
    if unit is None:
        return None
    server = server_cost_per_gpu(gpu)
    port = network_port_price()
    total = (unit.value + (server.value if server else 0.0)) * num_gpus
    if num_gpus > GPUS_PER_NODE and port is not None:
        total += port.value * num_gpus
    return total


# -- hosted fine-tuning services ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostedPrice:
    """One published per-token training price of a hosted fine-tuning service (``data/hosted_finetuning.csv``)."""

    provider: str
    offering: str
    model_access: str  # open-weight (bring a size bracket) | closed (the provider's own model)
    min_params_b: float | None
    max_params_b: float | None
    method: str  # lora | full | "" when the provider does not say
    usd_per_million_tokens: float
    price_date: str
    source: str

    def applies_to(self, params_b: float, method: Method) -> bool:
        """An open-weight bracket holding the model (bounds inclusive, at the 0.1B resolution they are published
        in) for the same kind of training (LoRA prices for LoRA and QLoRA)."""
        if self.model_access != "open-weight":
            return False
        size = round(params_b, 1)
        if self.min_params_b is not None and size < self.min_params_b:
            return False
        if self.max_params_b is not None and size > self.max_params_b:
            return False
        wanted = "full" if method is Method.FULL else "lora" if method.uses_lora else None
        return self.method == wanted


def hosted_prices() -> list[HostedPrice]:
    """Every row of ``data/hosted_finetuning.csv``, in file order."""
    with open(data_dir() / "hosted_finetuning.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    def bound(cell: str) -> float | None:
        return float(cell) if cell.strip() else None

    return [HostedPrice(row["provider"], row["offering"], row["model_access"], bound(row["min_params_b"]),
                        bound(row["max_params_b"]), row["method"], float(row["usd_per_million_tokens"]),
                        row["price_date"], row["source"]) for row in rows]


def hosted_cost_usd(price: HostedPrice, tokens: float, epochs: float) -> float:
    """Per-token price × every trained token (hosted services bill tokens × epochs)."""
    return price.usd_per_million_tokens * tokens * epochs / TOKENS_PER_MILLION


__all__ = [
    "DEFAULT_USD_PER_KWH", "DEFAULT_AMORTISATION_YEARS", "MFU_BY_GENERATION", "TrainingFlops",
    "TrainingTime", "Utilisation", "HostedPrice", "matmul_params", "training_flops", "peak_flop_per_s",
    "job_utilisation", "training_time", "rent_cost_usd", "buy_cost_usd", "amortised_buy_cost_usd", "energy_kwh",
    "energy_cost_usd", "hosted_prices", "hosted_cost_usd", "positive_number", "step_for", "step_work_for",
    "step_details", "step_or_profile_utilisation", "CloudRate", "ListPrice", "cloud_rates", "cheapest_rates",
    "list_prices", "gpu_list_price", "server_cost_per_gpu", "network_port_price", "pue", "buy_total_usd",
]
