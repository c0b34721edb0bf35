"""Trace one setup whose training steps each use their own sequence length, recording allocation events and the
event index at each step boundary. Pickles {events, bounds, lengths, meta} to the output file.

usage: python varlen_trace.py OUT.pkl MODEL LENGTHS(comma) key=value ...   (options as vramcalc.estimate kwargs)
"""

from __future__ import annotations

import gc
import json
import pickle
import sys
import time

import _paths  # noqa: F401  (puts the repository root on sys.path)


def parse_options(words):
    opts = {}
    for w in words:
        k, v = w.split("=", 1)
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            pass
        opts[k] = v
    return opts


def trace_varlen(model: str, lengths: list[int], gpu: str = "a100-80gb", **options):
    import torch

    from vramcalc.catalogue import get_gpu, get_model
    from vramcalc.profiles import runtime_profile
    from vramcalc.terms.runtime import workspace_bytes
    from vramcalc.training_setup import resolve_setup
    from vramcalc.tracing.alloc_events import AllocationEvents
    from vramcalc.tracing.caching_allocator import ALLOC
    from vramcalc.tracing.engine import run_trace
    from vramcalc.tracing.reserved import CONTEXT_TENSOR_BYTES
    from vramcalc.tracing.step import StepTracer

    spec = get_model(model)
    resolved = resolve_setup(spec, **options)
    device = get_gpu(gpu)
    ws = workspace_bytes(runtime_profile(device), device)
    events = AllocationEvents(workspace_bytes=ws)
    events.events.append((ALLOC, events.new_key(), CONTEXT_TENSOR_BYTES))
    bounds = []  # (event index at step start, event index at step end)

    class VarLenTracer(StepTracer):
        """The traced step (``StepTracer.step``), each optimizer step at its own sequence length."""

        def _run(self, steps, progress, position_ids):
            assert position_ids is None
            for step, T in enumerate(lengths):
                input_ids = torch.zeros(self.setup.batch_size, T, dtype=torch.long)
                start = len(events.events)
                self.step(step, input_ids)
                gc.collect()
                bounds.append((start, len(events.events)))
                print(f"step {step} T={T} events={len(events.events)}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    result = run_trace(spec, resolved, steps=len(lengths), warmup=0, events=events, progress=False,
                       tracer_class=VarLenTracer)
    return {
        "events": list(events.events),
        "ops": dict(events.ops),
        "bounds": bounds,
        "lengths": list(lengths),
        "meta": {"model": model, "options": options, "gpu": gpu, "workspace_bytes": ws,
                 "seconds": time.perf_counter() - started, "step_peaks": result.step_peaks},
    }


if __name__ == "__main__":
    out, model, lengths = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
    opts = parse_options(sys.argv[4:])
    data = trace_varlen(model, lengths, **opts)
    with open(out, "wb") as f:
        pickle.dump(data, f)
    print(f"wrote {out}: {len(data['events'])} events, {data['meta']['seconds']:.1f}s", file=sys.stderr)
