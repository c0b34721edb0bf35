"""``run_trace``: the engine of every trace. It builds the model, runs the training step under the allocation
tracker on fake CPU tensors and returns the peak by term. ``runner.trace`` dispatches to it, to a stack's own code
(``stacks/``) or to a task's trainer (``tasks.py``), which all run it."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass

from ..model import ModelSpec
from ..options import Phase, Sharding, TpPlan
from ..progress import Progress
from ..training_setup import ResolvedSetup

TRACE_STEPS = 2  # optimizer state appears in the first step; its effect on forward/backward in the second


@dataclass(frozen=True)
class TraceResult:
    terms: dict  # Term -> bytes at the peak (tensor terms only)
    phase: Phase
    step: int
    paged_bytes: int  # bitsandbytes paged optimizer state, outside torch's allocator
    step_peaks: dict  # step -> peak live bytes
    phase_peaks: dict  # Phase -> peak live bytes
    seconds: float
    peak_rss_bytes: int


def run_trace(spec: ModelSpec, resolved: ResolvedSetup, *, fake: bool = True, steps: int = TRACE_STEPS,
              progress: bool | None = None, round_to: int | None = None, tracer_class=None,
              builder=None, events=None, warmup: int = 0) -> TraceResult:
    """Build the model, run ``steps`` training steps under the tracker, and return the peak by term.

    ``fake=False`` runs on real CPU tensors (tiny models only): the tracker's self-check and the harness' CPU mode.
    ``tracer_class``: a ``StepTracer`` subclass that prepares the model and computes the loss as a stack does (TRL).
    ``builder``: what builds the model instead of ``build.build_model`` (a VLM: ``tracing/vision.py``).
    ``events``: an ``alloc_events.AllocationEvents`` that records the device allocations and frees of the build and
    of every step, for ``caching_allocator.replay``. ``warmup``: steps run before the ``steps``; after them the
    calibration harness' ``gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()`` is
    marked in ``events`` (``calibrate/probes.py::measure_cuda``). The tracker's peak covers all of them.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .build import build_model
    from .cuda_emulation import cuda_kernel_emulation
    from .qlora import quant_state_tensors
    from .step import StepTracer
    from .tracker import AllocationTracker

    started = time.perf_counter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    tracker = AllocationTracker(events=events) if round_to is None else AllocationTracker(round_to=round_to,
                                                                                         events=events)
    total_steps = warmup + steps
    micro_steps = total_steps * resolved.setup.grad_accum
    # progress: the build, each decoder layer's forward and backward of every micro-batch, each optimizer step
    bar = Progress(1 + micro_steps * 2 * spec.num_layers + total_steps, f"trace {spec.name}", "layer passes",
                   enabled=progress, leave=False)
    bar.set_note("building the model")
    tracer = None
    distributed = resolved.setup.num_gpus > 1 and resolved.setup.sharding is not Sharding.NONE
    if distributed:
        from . import distributed as data_parallel

        data_parallel.check_traceable(resolved)
        tracker.track_resizes = True
    context_parallel = getattr(resolved.setup, "cp", 1) > 1  # dp_shard x cp rings (tracing/context_parallel.py)
    if context_parallel:
        from .context_parallel import check_traceable as check_ring, device_meshes, ring_tracer

        check_ring(spec, resolved)
        tracer_class = ring_tracer(tracer_class or StepTracer)
    tensor_parallel = getattr(resolved.setup, "tp", 1) > 1  # one tensor-parallel group (tracing/tensor_parallel.py)
    if tensor_parallel:
        from . import distributed as data_parallel
        from .tensor_parallel import check_traceable

        check_traceable(spec, resolved)
        if resolved.setup.tp_plan is TpPlan.TORCHTITAN:  # loss parallel, the whole sequence's positions
            from .tensor_parallel import sequence_parallel_tracer

            tracer_class = sequence_parallel_tracer(tracer_class or StepTracer)
    expert_parallel = getattr(resolved.setup, "ep", 1) > 1  # transformers' expert plan (tracing/expert_parallel.py)
    if expert_parallel:
        from . import distributed as data_parallel
        from .expert_parallel import check_traceable as check_ep_traceable

        check_ep_traceable(spec, resolved)
    try:
        with (data_parallel.process_group(resolved.setup.num_gpus) if distributed or tensor_parallel or expert_parallel
              else contextlib.nullcontext()):
            build_mode = fake_mode if events is None else _RecordedBuild(fake_mode, events)
            model = (builder or build_model)(spec, resolved, build_mode)
            bar.update(1, note=f"step 1 of {total_steps}")
            with fake_mode if fake_mode is not None else contextlib.nullcontext():
                engine = None
                fsdp_mesh, cp_mesh = device_meshes(resolved.setup) if context_parallel else (None, None)
                if distributed and resolved.setup.sharding is Sharding.FSDP and expert_parallel:
                    engine = data_parallel.sharded_at_load(model)  # transformers' FSDP2 (tracing/expert_parallel.py)
                elif distributed and resolved.setup.sharding is Sharding.FSDP:
                    # the sharded parameters are the weights
                    engine = data_parallel.wrap(model, resolved, tracker, fsdp_mesh)
                tracker.register_weights(list(model.parameters()) + list(model.buffers()) + quant_state_tensors(model))
                # on a real process group (gloo), collectives release their tensors on this thread
                collectives = (data_parallel.main_thread_collectives if distributed or tensor_parallel
                               or expert_parallel else contextlib.nullcontext)
                if distributed and engine is None:
                    with torch.device("cpu"), collectives(), tracker:
                        engine = data_parallel.wrap(model, resolved, tracker)  # DDP's buckets, allocated here
                tracer = (tracer_class or _default_tracer(resolved))(model, spec, resolved, tracker)
                if engine is not None:
                    tracer.forward_module, tracer.accumulation = engine.forward_module, engine.accumulation
                if cp_mesh is not None:
                    tracer.cp_mesh = cp_mesh  # the ring runs over the cp dimension only
                attribution = engine.attribution(tracker) if engine is not None else contextlib.nullcontext()
                with torch.device("cpu"), collectives(), tracker, cuda_kernel_emulation(sdpa=fake), attribution:
                    tracer.count_layers(lambda: bar.update(1))
                    tracer.run(total_steps, progress=_after_each_step(bar, events, warmup))
        terms = tracker.peak_terms()
        return TraceResult(
            terms=terms,
            phase=tracker.peak.phase,
            step=tracker.peak.step,
            paged_bytes=tracker.paged_bytes,
            step_peaks=dict(tracker.step_peaks),
            phase_peaks=dict(tracker.phase_peaks),
            seconds=time.perf_counter() - started,
            peak_rss_bytes=_peak_rss_bytes(),
        )
    finally:
        bar.close()
        if tracer is not None:
            tracer.remove_hooks()
        reset_bnb_overrides()


def _default_tracer(resolved: ResolvedSetup):
    """The Trainer step of the setup's task: an encoder's sequence classifier (``--task classify``: ``encoder.py``)
    or the causal LM's (``step.StepTracer``)."""
    if resolved.setup.task.value == "classify":
        from .encoder import ClassifyStepTracer

        return ClassifyStepTracer
    from .step import StepTracer

    return StepTracer


class _RecordedBuild:
    """The build's fake mode with the event recorder above it: the model is built before the tracker is entered,
    and its allocations come first in the replayed sequence."""

    def __init__(self, fake_mode, events):
        self.fake_mode = fake_mode
        self.events = events
        self._stack = None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        if self.fake_mode is not None:
            self._stack.enter_context(self.fake_mode)
        self._stack.enter_context(self.events)
        return self

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        return stack.__exit__(*exc)


def _after_each_step(bar, events, warmup: int):
    """The progress callback of each optimizer step; after the ``warmup``-th, the harness' empty_cache and peak
    reset are marked in ``events`` (a ``gc.collect()`` first, as the harness does, so cyclic garbage dies before)."""
    finished = 0

    def after(note):
        nonlocal finished
        bar.update(1, note=note)
        finished += 1
        if events is not None and finished == warmup:
            import gc

            from .caching_allocator import EMPTY_CACHE, RESET_PEAK

            gc.collect()
            events.mark(EMPTY_CACHE)
            events.mark(RESET_PEAK)

    return after


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_bnb_overrides() -> None:
    """bitsandbytes keeps module overrides in a process-wide singleton: leave nothing behind."""
    module = sys.modules.get("bitsandbytes.optim.optimizer")
    if module is not None:
        module.GlobalOptimManager._instance = None
