"""What the torchtune and litgpt traces share: the optimizers their recipes build, the tracker's phase hooks on a
plain decoder (a list of blocks and an output head), the recompute marker for torch's checkpoint wrapper, and the
``TraceResult`` they return.

The tracker (``tracing/tracker.py``) attributes bytes to terms from four facts the driver reports: the phase, whether
the output head's region is running (``in_logits``), whether a checkpointed block is recomputing (``in_recompute``) and
whether an optimizer is stepping (``in_optimizer``). The HF driver (``tracing/step.py``) reports them for a
transformers model; these hooks report them for any decoder whose blocks are ``nn.Module`` calls taking the hidden
states first.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass

import torch

from ...errors import VramcalcError
from ...model import ModelSpec
from ...options import Optimizer, Phase, Precision, Term
from ...training_setup import ResolvedSetup
from ..bnb_optim import PAGED_MIN_NUMEL
from ..engine import TraceResult, _peak_rss_bytes
from ..tracker import AllocationTracker

TRACE_STEPS = 1  # traced steps after the optimizer's warm start (warm_start); the HF trace runs two cold steps

TORCH_DTYPE = {Precision.BF16: torch.bfloat16, Precision.BF16_TRUE: torch.bfloat16, Precision.FP16: torch.float16,
               Precision.FP32: torch.float32}


def model_dtype(resolved: ResolvedSetup, stack: str,
                allowed=(Precision.BF16_TRUE, Precision.BF16, Precision.FP32)) -> torch.dtype:
    """The one dtype these recipes build the whole model in (torchtune ``dtype: bf16``; litgpt ``bf16-true``), with
    no autocast: ``bf16`` is taken as ``bf16-true`` (the two differ only for fp32 tensors these recipes never make)."""
    precision = resolved.setup.precision
    if precision not in allowed:
        words = ", ".join(p.value for p in allowed)
        raise VramcalcError(f"the {stack} trace runs precision {words} (the stack's own 'true' dtypes), "
                            f"not {precision.value}")
    return TORCH_DTYPE[precision]


LLAMA_FAMILIES = ("llama", "mistral")  # the families both stacks' Llama builders reproduce


def check_llama_style(spec, stack: str, builders: str) -> None:
    """Refuse a model the stack's Llama builders cannot build (experts, qkv bias, q/k norms, other families)."""
    if spec.family not in LLAMA_FAMILIES or spec.num_experts or spec.qkv_bias or spec.qk_norm:
        raise VramcalcError(f"vramcalc's {stack} trace builds Llama-style decoders only ({builders}); "
                            f"{spec.name} is {spec.family}: use `vramcalc estimate` for it")


def check_single_device(resolved: ResolvedSetup, stack: str) -> None:
    setup = resolved.setup
    if setup.num_gpus > 1:
        raise VramcalcError(f"the {stack} trace runs the single-device recipe; num_gpus={setup.num_gpus} is "
                            "estimate-only for this stack")


def make_optimizer(params, optimizer: Optimizer, tracker: AllocationTracker, *, stack: str, lr: float,
                   weight_decay: float = 0.0, adamw_fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer a recipe instantiates over ``params`` (the recipes pass ``model.parameters()``: frozen ones too;
    torch and bitsandbytes skip parameters without a gradient).

    ``adamw``: ``torch.optim.AdamW(fused=adamw_fused)``; ``adamw-foreach``: foreach=True, the implementation torch
    picks by default for CUDA tensors (on CPU it would pick the for-loop one, whose scratch differs).
    bitsandbytes optimizers are built with real CPU tensors (their code maps use ``.tolist()``); state buffers of a
    paged optimizer for tensors of at least 1e5 elements go to the tracker's paged pool (``cudaMallocManaged`` on a GPU:
    outside torch's allocator), as ``tracing/bnb_optim.py`` does for the HF trace.
    """
    params = list(params)
    if optimizer is Optimizer.ADAMW:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=adamw_fused or None,
                                 foreach=None if adamw_fused else True)
    if optimizer is Optimizer.ADAMW_FOREACH:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if optimizer is Optimizer.SGD:
        return torch.optim.SGD(params, lr=lr, foreach=True)
    if optimizer is Optimizer.SGD_MOMENTUM:
        return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True)
    if optimizer in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW, Optimizer.PAGED_ADAMW_8BIT):
        import bitsandbytes as bnb
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        cls = {Optimizer.ADAMW_8BIT: bnb.optim.AdamW8bit, Optimizer.PAGED_ADAMW: bnb.optim.PagedAdamW,
               Optimizer.PAGED_ADAMW_8BIT: bnb.optim.PagedAdamW8bit}[optimizer]
        with unset_fake_temporarily():
            instance = cls(params, lr=lr)
        if optimizer.is_paged:
            get_state_buffer = instance.get_state_buffer

            def paged_state_buffer(p, *args, **kwargs):
                context = tracker.paged() if p.numel() >= PAGED_MIN_NUMEL else contextlib.nullcontext()
                with context, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return get_state_buffer(p, *args, **kwargs)

            instance.get_state_buffer = paged_state_buffer
        return instance
    if optimizer.is_torchao:  # the recipe's ``optimizer._component_=torchao.optim.AdamW8bit``: class defaults
        from ..torchao_optim import make_torchao_optimizer

        return make_torchao_optimizer(params, optimizer, tracker, lr=lr, weight_decay=weight_decay,
                                      trainer_built=False)
    raise VramcalcError(f"the {stack} trace has no recipe for optimizer {optimizer.value}")


@contextlib.contextmanager
def cuda_kernels(bnb: bool = False):
    """SDPA and dropout as a CUDA GPU runs them (``tracing/cuda_emulation.py``: flash attention's saved tensors, the
    fused dropout's bool mask); with ``bnb`` also bitsandbytes' CUDA ``gemm_4bit`` path above 1536 tokens.

    Lighter than ``cuda_emulation.cuda_kernel_emulation``: no dispatch mode unless bitsandbytes is in the model (a
    Python mode costs every op of a 70B trace), and no transformers import (these stacks build no transformers
    model)."""
    from .. import cuda_emulation

    functional = torch.nn.functional
    original_sdpa, original_dropout = functional.scaled_dot_product_attention, functional.dropout
    functional.scaled_dot_product_attention = cuda_emulation.cuda_sdpa
    functional.dropout = cuda_emulation.cuda_dropout
    try:
        with cuda_emulation._CudaKernels() if bnb else contextlib.nullcontext():
            yield
    finally:
        functional.scaled_dot_product_attention = original_sdpa
        functional.dropout = original_dropout


def warm_start(tracker: AllocationTracker, optimizers) -> None:
    """Create the optimizer state as the first step would, before the traced step: each optimizer steps once on zero
    gradients of its parameters (state buffers are made lazily at the first ``step()`` of a parameter with a
    gradient; torch's and bitsandbytes' AdamW alike), then the gradients are dropped.

    The first step of a cold start differs from the traced step only by having no optimizer state during its
    forward and backward, so its peak is never above the second step's; this warm start replaces that first step
    and halves the trace time of a 70B model (``tests/test_trace_stacks.py`` checks that both give the same peak).
    ``optimizers`` is a list of (optimizer, its parameters); one optimizer per parameter (optimizer in backward)
    keeps one gradient alive at a time, as in backward.
    """
    tracker.phase = Phase.OPTIMIZER_STEP
    tracker.step = 0
    for optimizer, params in optimizers:
        params = [p for p in params if p.requires_grad]
        if not params:
            continue
        for p in params:
            p.grad = torch.zeros_like(p)
        tracker.mark_gradients(params)
        optimizer_step(tracker, optimizer)
        optimizer.zero_grad(set_to_none=True)


def optimizer_step(tracker: AllocationTracker, optimizer: torch.optim.Optimizer) -> None:
    """One ``optimizer.step()`` under the optimizer flag, then its state tensors are optimizer states."""
    phase = tracker.phase
    tracker.phase = Phase.OPTIMIZER_STEP
    tracker.in_optimizer = True
    try:
        optimizer.step()
    finally:
        tracker.in_optimizer = False
    tracker.mark_optimizer_states(optimizer)
    tracker.phase = phase


@dataclass(frozen=True)
class LoadPeak:
    """The peak of the ``load`` phase (building and quantizing the model), by term."""

    total_bytes: int
    terms: dict


def close_load_phase(tracker: AllocationTracker) -> LoadPeak:
    """End the load phase: keep its peak by term, and start the step's peak afresh (the weights stay live)."""
    from ..tracker import PeakSnapshot

    terms = tracker.peak_terms()
    load = LoadPeak(sum(terms.values()), terms)
    tracker.peak = PeakSnapshot()
    tracker._peak_records = None
    tracker._peak_pending = False
    tracker.phase = Phase.FORWARD
    return load


@dataclass(frozen=True)
class StackTrace:
    """A stack's trace: ``result`` holds the peak over every phase, load included (what ``MemoryBreakdown`` reports);
    ``step_terms``/``step_phase`` the peak of the training step alone (the load phase left out)."""

    result: TraceResult
    step_terms: dict
    step_phase: Phase
    not_traced: tuple[str, ...] = ()


def result(tracker: AllocationTracker, started: float, load: LoadPeak | None = None,
           not_traced: tuple[str, ...] = ()) -> StackTrace:
    """The larger of the load peak and the step's peak, and the step's own peak."""
    training_terms = tracker.peak_terms()
    terms, phase, step = training_terms, tracker.peak.phase, tracker.peak.step
    phase_peaks = dict(tracker.phase_peaks)
    if load is not None:
        phase_peaks[Phase.LOAD] = load.total_bytes
        if load.total_bytes > sum(training_terms.values()):
            terms, phase, step = load.terms, Phase.LOAD, 0
    traced = TraceResult(
        terms=terms,
        phase=phase,
        step=step,
        paged_bytes=tracker.paged_bytes,
        step_peaks=dict(tracker.step_peaks),
        phase_peaks=phase_peaks,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=_peak_rss_bytes(),
    )
    return StackTrace(traced, training_terms, tracker.peak.phase, tuple(not_traced))


def breakdown(spec: ModelSpec, resolved: ResolvedSetup, stack_trace: StackTrace, stack: str, gpu=None):
    """The traced terms as the same ``MemoryBreakdown`` the HF trace and the estimate return. ``details`` adds the
    peak of each phase, the step's own peak by term (``trace_step_terms_bytes``) and what was not traced."""
    from ...estimator import assemble_measured

    traced = stack_trace.result
    training_terms, training_phase = stack_trace.step_terms, stack_trace.step_phase
    notes = stack_trace.not_traced
    details = {"trace_seconds": round(traced.seconds, 3), "trace_peak_rss_bytes": traced.peak_rss_bytes,
               "trace_stack": stack,
               "trace_phase_peaks_bytes": {phase.value: n for phase, n in traced.phase_peaks.items()},
               "trace_step_phase": training_phase.value,
               "trace_step_terms_bytes": {term.value: n for term, n in training_terms.items()}}
    if notes:
        details["trace_not_traced"] = list(notes)
    return assemble_measured(spec, resolved, traced.terms, traced.phase, source=f"trace ({stack})", gpu=gpu,
                             paged_bytes=traced.paged_bytes, details=details)
