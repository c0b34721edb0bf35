"""``replay_reserved``: the trace's allocation sequence replayed through the caching allocator, following the
calibration harness' protocol, for the ``max_memory_reserved`` a GPU run would read.

The protocol (``calibrate/probes.py::measure_cuda``): the context's first tensor (``torch.zeros(1)``, 4 bytes), the
model build, ``warmup`` steps, ``gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()``,
then ``steps`` measured steps; the peaks are read after them. The trace runs the same build and steps on fake CPU
tensors with an ``AllocationEvents`` recorder (``engine.run_trace(events=..., warmup=...)``) and
``caching_allocator.replay`` turns the sequence into the allocator's peaks.

What the replay cannot know: allocations the CPU trace does not make (CUDA kernels' own workspaces other than the
cuBLAS workspace given as ``workspace_bytes``, CUDA-only kernel choices), the real device's addresses (ties among
free blocks of equal size), and what the harness does outside the traced build (weight initialisation, bitsandbytes'
real 4-bit quantization: ``builder`` may add those).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..model import ModelSpec
from ..training_setup import ResolvedSetup
from .caching_allocator import ALLOC, ReplayResult, replay
from .engine import TraceResult, run_trace

CONTEXT_TENSOR_BYTES = 4  # probes.measure_cuda: torch.zeros(1, device=device) creates the context
# what ``trace(..., reserved=True)`` replays: the harness' defaults (``calibrate/__main__.py``: ``--warmup 1
# --steps 2``), the protocol ``benchmarks/allocator_replay.md`` checked against 12 H200 measurements
REPLAY_WARMUP = 1
REPLAY_STEPS = 2


@dataclass(frozen=True)
class ReservedReplay:
    """A trace's allocation sequence and its replay through the caching allocator."""

    replay: ReplayResult  # the allocator's statistics after the measured steps
    trace: TraceResult  # the tracker's peak by term (over warm-up and measured steps)
    events: int  # allocation, free and marker events replayed
    workspace_bytes: int
    warmup: int
    steps: int
    trace_seconds: float
    replay_seconds: float

    @property
    def reserved_peak_bytes(self) -> int:
        return self.replay.reserved_peak_bytes

    @property
    def allocated_peak_bytes(self) -> int:
        return self.replay.allocated_peak_bytes


def replay_reserved(spec: ModelSpec, resolved: ResolvedSetup, *, warmup: int = 1, steps: int = 2,
                    workspace_bytes: int = 0, progress: bool | None = None, builder=None,
                    tracer_class=None) -> ReservedReplay:
    """Trace ``warmup + steps`` steps recording every device allocation, then replay them as the harness measures:
    the peaks after ``empty_cache`` and the peak reset that follow the warm-up steps.

    ``workspace_bytes``: the cuBLAS workspace, allocated at the first matmul (``alloc_events``); 0 leaves it out.
    ``builder``: builds the model instead of ``build.build_model`` (with the recorder active: it may add events).
    """
    from .alloc_events import AllocationEvents

    if warmup < 0 or steps < 1:
        raise ValueError(f"warmup must be >= 0 and steps >= 1, got warmup={warmup}, steps={steps}")
    events = AllocationEvents(workspace_bytes=workspace_bytes)
    events.events.append((ALLOC, events.new_key(), CONTEXT_TENSOR_BYTES))
    started = time.perf_counter()
    trace = run_trace(spec, resolved, steps=steps, warmup=warmup, events=events, progress=progress, builder=builder,
                      tracer_class=tracer_class)
    trace_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result = replay(list(events.events))
    return ReservedReplay(replay=result, trace=trace, events=len(events.events), workspace_bytes=workspace_bytes,
                          warmup=warmup, steps=steps, trace_seconds=trace_seconds,
                          replay_seconds=time.perf_counter() - started)


def reserved_trace(spec: ModelSpec, resolved: ResolvedSetup, gpu=None, *, progress: bool | None = None,
                   builder=None, tracer_class=None) -> tuple[TraceResult, dict]:
    """What ``trace(..., reserved=True)`` runs: ``replay_reserved`` with the harness' protocol (``REPLAY_WARMUP``
    warm-up step, ``REPLAY_STEPS`` measured steps) and the cuBLAS workspace of ``gpu``'s runtime profile
    (``terms.runtime.workspace_bytes``: the fitted ``workspace_bytes``, else two handles' workspaces from the
    compute capability), one allocation at the first matmul as ``benchmarks/allocator_replay.py`` makes it. Returns
    the recorded trace (its terms are the tracker's peak over all the steps) and the ``details`` it adds:

    ``reserved_peak_bytes``: ``max_memory_reserved`` after the measured steps; ``reserved_baseline_bytes``:
    ``memory_reserved`` right after the warm-up's ``empty_cache`` and peak reset (the harness' baseline);
    ``reserved_allocated_peak_bytes``: the replay's ``max_memory_allocated`` (block sizes, with the workspace and the
    context's first tensor), for ``reserved - allocated``.
    """
    from ..catalogue import get_gpu
    from ..profiles import runtime_profile
    from ..terms.runtime import workspace_bytes

    device = get_gpu(gpu) if gpu is not None else None
    profile = runtime_profile(device)
    out = replay_reserved(spec, resolved, warmup=REPLAY_WARMUP, steps=REPLAY_STEPS,
                          workspace_bytes=workspace_bytes(profile, device), progress=progress, builder=builder,
                          tracer_class=tracer_class)
    return out.trace, {
        "reserved_peak_bytes": out.reserved_peak_bytes,
        "reserved_baseline_bytes": out.replay.reserved_at_reset_bytes,
        "reserved_allocated_peak_bytes": out.allocated_peak_bytes,
        "reserved_segments": out.replay.segments,
        "reserved_workspace_bytes": out.workspace_bytes,
        "reserved_workspace_source": profile.source,
        "reserved_replay_warmup_steps": out.warmup,
        "reserved_replay_measured_steps": out.steps,
        "reserved_replay_seconds": round(out.replay_seconds, 3),
    }
