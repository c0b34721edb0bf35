"""``trace()``: the exact allocation trace of a real Hugging Face training step, at full size, on fake CPU tensors."""

from __future__ import annotations

import importlib

from ..catalogue import get_model
from ..errors import VramcalcError
from ..options import LoadPath, Loss, Sharding, Stack
from ..stacks import preset
from ..training_setup import resolve_setup
from .engine import TRACE_STEPS, TraceResult, run_trace  # noqa: F401  (the engine, re-exported for callers)


def _stack_tracer(stack: Stack):
    """The function that traces ``stack`` with its own code, or None for the stacks the HF step covers (hf; axolotl
    and LLaMA-Factory, whose memory-relevant settings are the knobs the HF trace runs). Unsloth needs Triton kernels
    on a GPU: the trace refuses it."""
    if stack is Stack.UNSLOTH:
        raise VramcalcError(f"--stack unsloth is estimate only: {preset(stack).estimate_only}; use vramcalc estimate")
    name = STACK_TRACE_MODULES.get(stack)
    if name is None:
        return None
    try:
        module = importlib.import_module(f".stacks.{name}", __package__)
    except ImportError as err:
        raise ImportError(f"tracing --stack {stack.value} runs {stack.value}'s own code ({err.name} is missing): "
                          "pip install 'vramcalc[stacks]'") from None
    return getattr(module, f"trace_{name}")


STACK_TRACE_MODULES = {Stack.TORCHTUNE: "torchtune", Stack.LITGPT: "litgpt", Stack.TRL: "trl"}
# losses that are one stack's own training loop: traced only with that stack's code
OWN_RECIPE_LOSSES = {Loss.TORCHTUNE: "torchtune", Loss.TORCHTUNE_2024: "torchtune", Loss.LITGPT: "litgpt",
                     Loss.TRL: "trl"}


def trace(model, *, gpu=None, progress: bool | None = None, revision: str | None = None, reserved: bool = False,
          **options):
    """Same signature and return type as ``estimate``; the tensor terms come from the traced step.

    ``reserved=True`` also replays the step's allocations through the caching allocator (``reserved.py``: the
    build, 1 warm-up step, ``empty_cache`` and peak reset, 2 measured steps, traced once with an allocation
    recorder: the terms are the peak over those three steps) and adds ``details["reserved_peak_bytes"]``, what ``torch.cuda.max_memory_reserved`` would read, with
    ``reserved_baseline_bytes`` and the replay's settings (``reserved.reserved_trace``). The HF training step on
    one GPU or one DDP or FSDP rank (``_check_reserved``)."""
    from ..estimator import assemble_measured

    from ..hf_config import UnsupportedArchitecture

    try:
        spec = get_model(model, revision)
    except UnsupportedArchitecture as unsupported:  # no formulas: the model transformers builds (generic.py)
        if reserved:
            raise VramcalcError(_reserved_refusal(f"a {unsupported.family!r} model (no formulas: the generic "
                                                  "trace)")) from None
        from .generic import trace_any

        return trace_any(unsupported.config, unsupported.family, unsupported.name, gpu=gpu, progress=progress,
                         **options)
    resolved = resolve_setup(spec, **options)
    if resolved.setup.load is LoadPath.REQUANTIZE:
        raise VramcalcError(_REQUANTIZE_REFUSAL)
    if reserved:
        _check_reserved(resolved)
    if getattr(resolved.setup, "pp", 1) > 1:  # one pipeline rank at a time (tracing/pipeline_parallel.py)
        from .pipeline_parallel import trace_pipeline

        return trace_pipeline(spec, resolved, gpu=gpu)
    builder = tracer_class = None  # (an encoder's classifier: the engine's ClassifyStepTracer)
    if resolved.setup.task.value not in ("sft", "classify"):  # TRL's trainer for the task (tracing/tasks.py)
        from .tasks import trace_task

        return trace_task(spec, resolved, progress=progress, gpu=gpu)
    own_code = _stack_tracer(resolved.setup.stack)
    if own_code is not None:  # the stack's own model and step (torchtune, litgpt, TRL)
        return own_code(spec, resolved, progress=progress, gpu=gpu)
    if resolved.setup.loss in OWN_RECIPE_LOSSES:
        word, stack = resolved.setup.loss.value, OWN_RECIPE_LOSSES[resolved.setup.loss]
        raise VramcalcError(f"--loss {word} is {stack}'s own recipe: trace it with --stack {stack}")
    if spec.vision is not None:  # the whole vision-language model, with its images (tracing/vision.py)
        from .vision import VisionStepTracer, build_vlm

        builder, tracer_class = build_vlm, VisionStepTracer
    replayed = {}
    if reserved:  # one trace, recorded and replayed through the caching allocator (reserved.py)
        from .reserved import reserved_trace

        result, replayed = reserved_trace(spec, resolved, gpu, progress=progress, builder=builder,
                                          tracer_class=tracer_class)
    else:
        result = run_trace(spec, resolved, progress=progress, tracer_class=tracer_class, builder=builder)
    details = {"trace_seconds": round(result.seconds, 3), "trace_peak_rss_bytes": result.peak_rss_bytes, **replayed}
    return assemble_measured(
        spec, resolved, result.terms, result.phase, source="trace", gpu=gpu,
        paged_bytes=result.paged_bytes, details=details,
    )


# torchtune 0.1.x re-quantized the checkpoint on the GPU through its own NF4 copy_ (deleted 2024-08-23, #1294): the
# installed torchtune and torchao do not (tests/test_trace_stacks.py), and the HF trace has no load phase
_REQUANTIZE_REFUSAL = ("--load requantize is torchtune 0.1.x with torchao 0.1, whose load no installed code runs (the "
                       "installed torchtune quantizes where the checkpoint lies); it is estimated, the load's "
                       "allocations replayed through the caching allocator (terms/load_reserved.py): use vramcalc "
                       "estimate, or trace with --load per-layer")


def _reserved_refusal(what: str) -> str:
    return (f"--reserved replays one GPU's caching allocator over the Hugging Face training step (one GPU, or one "
            f"DDP or FSDP rank); {what} is traced without it: leave --reserved out")


def _check_reserved(resolved) -> None:
    """``reserved=True`` covers what ``benchmarks/allocator_replay.md`` checked: the HF step (any method, precision,
    optimizer; vision-language models too) on one GPU; and one rank of DDP or FSDP2 on the fake process group, whose
    side streams the replay keeps apart (``caching_allocator`` rule 3, ``benchmarks/stream_pools.md``). Other tasks,
    stacks with their own code, other engines and model parallelism are refused before anything runs."""
    setup = resolved.setup
    data_parallel = setup.sharding in (Sharding.DDP, Sharding.FSDP)
    model_parallel = max(getattr(setup, "tp", 1), getattr(setup, "cp", 1), getattr(setup, "ep", 1),
                         getattr(setup, "pp", 1)) > 1
    if setup.num_gpus > 1 and (not data_parallel or model_parallel):
        what = "--tp/--cp/--ep/--pp" if model_parallel else f"--sharding {setup.sharding.value}"
        raise VramcalcError(_reserved_refusal(f"{what} on {setup.num_gpus} GPUs"))
    if setup.task.value not in ("sft", "classify"):
        raise VramcalcError(_reserved_refusal(f"--task {setup.task.value}"))
    if setup.stack in STACK_TRACE_MODULES or setup.stack is Stack.UNSLOTH:
        raise VramcalcError(_reserved_refusal(f"--stack {setup.stack.value}"))


__all__ = ["trace", "run_trace", "TraceResult", "Term"]
