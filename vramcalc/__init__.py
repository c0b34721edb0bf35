"""vramcalc: will this fine-tuning job fit, on what, how long will it take and what will it cost?

    import vramcalc as vc
    b = vc.estimate("llama-3.1-8b", method="lora", seq_len=2048, gpu="h100-sxm")
    b.total_bytes, b.terms(), b.fits("rtx-4090")

``estimate`` needs the standard library only; ``trace`` needs the ``trace`` extra (torch, transformers, peft).
Importing vramcalc imports neither torch, transformers nor pandas.
"""

from __future__ import annotations

from .breakdown import MemoryBreakdown
from .catalogue import GpuSpec, get_gpu, get_model, gpus, models
from .errors import VramcalcError
from .estimator import estimate
from .model import ModelSpec
from .options import Attention, Loss, Method, Optimizer, Phase, Precision, Sharding, Term
from .export import write_csv
from .planning import max_batch_size, plan, sweep
from .training_setup import TrainingSetup
from .version import __version__

__all__ = [
    "estimate", "trace", "plan", "sweep", "max_batch_size", "write_csv", "MemoryBreakdown", "ModelSpec", "GpuSpec", "TrainingSetup", "VramcalcError",
    "get_model", "get_gpu", "models", "gpus", "Method", "Precision", "Optimizer", "Attention", "Loss", "Sharding",
    "Term", "Phase", "infer",
]


def trace(model, **options) -> MemoryBreakdown:
    """Same signature and return type as ``estimate``; the tensor terms come from tracing the real HF training step
    on fake tensors. Needs the ``trace`` extra: ``pip install 'vramcalc[trace]'``.

    ``reserved=True`` also replays the step's allocations through PyTorch's caching allocator (1 warm-up step,
    ``empty_cache``, 2 measured steps: about 1.5 times as long) and adds ``details["reserved_peak_bytes"]``, what
    ``torch.cuda.max_memory_reserved`` would read, and ``details["reserved_baseline_bytes"]``."""
    try:
        from .tracing.runner import trace as _trace

        return _trace(model, **options)
    except ModuleNotFoundError as err:  # one of the extra's packages, imported where the trace first needs it
        if (err.name or "").split(".")[0] not in _TRACE_EXTRA:
            raise
        raise ImportError(f"vramcalc.trace needs the 'trace' extra ({err.name} is missing): pip install 'vramcalc[trace]'") from None


_TRACE_EXTRA = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "torchao")  # pyproject's trace extra


def infer(model, **options) -> MemoryBreakdown:
    """The memory of serving ``model`` (``serving/estimate.py``): KV cache, engine rules (``engine`` hf, vllm or
    sglang), throughput and cost; ``trace=True`` traces transformers' ``generate`` (needs the ``trace`` extra)."""
    from .serving.estimate import infer as _infer

    return _infer(model, **options)
