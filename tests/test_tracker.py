"""The allocation tracker checked against an independent measurement: torch.profiler's memory timeline
(``torch.profiler._memory_profiler.MemoryProfile``, built from the profiler's own allocation events), on tiny real
models with real CPU tensors. Both count bytes allocated after the model was built; the tracker without 512-B rounding.
"""

import pytest

from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch
from .tiny_models import TINY

pytestmark = [needs_torch, pytest.mark.trace]


def _peaks(family: str, method: str):
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    from vramcalc.tracing.build import build_model
    from vramcalc.tracing.cuda_emulation import cuda_kernel_emulation
    from vramcalc.tracing.step import StepTracer
    from vramcalc.tracing.tracker import AllocationTracker

    spec = TINY[family]
    resolved = resolve_setup(spec, seq_len=256, method=method)
    torch.manual_seed(0)
    model = build_model(spec, resolved, None)
    for param in model.parameters():
        if param.is_floating_point():
            torch.nn.init.normal_(param.data, std=0.02)
    tracker = AllocationTracker(round_to=1)
    tracker.register_weights(list(model.parameters()) + list(model.buffers()))
    tracer = StepTracer(model, spec, resolved, tracker)
    start = tracker.live_bytes
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        with tracker, cuda_kernel_emulation(sdpa=False):
            tracer.run(2)
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return tracker.peak.total_bytes - start, peak


@pytest.mark.parametrize("family, method", [("llama", "full"), ("llama", "lora"), ("qwen3_moe", "full"),
                                            ("gemma2", "qlora"), ("deepseek_v3", "lora"), ("phi3", "prompt")])
def test_tracker_peak_agrees_with_the_profiler_within_one_percent(family, method):
    tracked, profiled = _peaks(family, method)
    assert abs(tracked - profiled) / profiled < 0.01
