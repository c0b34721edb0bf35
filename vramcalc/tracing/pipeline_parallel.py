"""One pipeline rank (``--pp``), traced on torch.distributed.pipelining itself: the rank's stages as torchtitan
builds them, the schedule torch runs, FSDP2 per stage, on fake CPU tensors.

The rank joins a fake process group of ``--num-gpus`` ranks (``tracing/distributed.py``) as the first rank of its
pipeline position in a (pp, dp) mesh; the pipeline's sends and receives complete at once and move nothing, so the
rank runs exactly the allocations and frees of its own schedule, the other ranks being absent. Two things the fake
group cannot carry are given instead (and change no allocation of the step):
- the stage's input and output metadata (torch's ``PipelineStage(input_args=..., output_args=...)``; torchtitan
  lets the stages infer it at the first step by sending it through the group);
- torch 2.13's warm-up vote, a one-element tensor passed along the stages to agree on that static metadata
  (``_PipelineSchedule._warmup_p2p``), is replaced by its outcome, static (``_static_warmup``).
And one thing NCCL does that the fake group does not: a send's work holds its tensor until it is waited
(``_nccl_send_stash``), which keeps sent outputs and gradients alive where a schedule waits late.

A stage is a module over the Hugging Face model's own pieces (``StageModule``): the embedding on stage 0, the
decoder layers of its range, the rotary embedding, and the final norm and lm_head on the last stage, as
torchtitan's ``pipeline_llama_manual_split`` keeps its modules. The model is built with the rank's layers only (the
others' tensors are never made). Loss: torchtitan@9dec370's ``F.cross_entropy(pred.flatten(0, 1).float(),
labels.flatten(0, 1))``. ``--compile``: each decoder layer through ``compiled.compile_layer`` (torchtitan's
``apply_compile``, after the checkpoint, before ``fully_shard``); ``--precision fp8``: ``build_model``'s torchao
Float8Linear. FSDP2: ``fully_shard`` on every layer and on the stage, ``reshard_after_forward=False``,
``MixedPrecisionPolicy(param_dtype=16-bit, reduce_dtype=fp32)`` (``apply_fsdp`` under PP), over trainable
parameters in fp32 under an autocast word (fp8 included): torchtitan builds its model in fp32 and leaves the 16 bits
to that policy. No autocast.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import VramcalcError
from ..model import ModelSpec
from ..options import Phase, Sharding
from ..training_setup import ResolvedSetup
from .tracker import AllocationTracker


def check_traceable(spec: ModelSpec, resolved: ResolvedSetup) -> None:
    setup = resolved.setup
    if setup.tp > 1 or setup.cp > 1:
        raise VramcalcError("--pp with --tp or --cp is estimated, not traced: the pipeline trace runs one rank's "
                            "stages with FSDP2 or alone")


class StageModule(nn.Module):
    """One pipeline stage over the model's own modules: ``embed`` (stage 0), ``layers``, and ``norm``, ``head``
    (the last stage); the stage computes its own rotary tables from its positions, as every torchtitan stage does
    from its ``freqs_cis``."""

    def __init__(self, embed, layers, rotary, norm, head):
        super().__init__()
        self.embed, self.layers, self.rotary, self.norm, self.head = embed, nn.ModuleList(layers), rotary, norm, head

    def forward(self, x):
        hidden = self.embed(x) if self.embed is not None else x
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        position_embeddings = self.rotary(hidden, positions)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=positions,
                           position_embeddings=position_embeddings)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        if self.head is not None:
            hidden = self.head(self.norm(hidden))
        return hidden


def loss_fn(pred, labels):
    """torchtitan@9dec370 train.py:131-134."""
    return torch.nn.functional.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1))


@contextlib.contextmanager
def _static_warmup():
    """torch 2.13 ``_PipelineSchedule._warmup_p2p`` replaced by its outcome on a group whose stages all give their
    metadata: ``InferenceMode.STATIC`` (schedules.py:341-380)."""
    from torch.distributed.pipelining import schedules, stage

    original = schedules._PipelineSchedule._warmup_p2p

    def static(self, stages, has_backward, p2p_done):
        for one in stages:
            one._inference_mode = stage.InferenceMode.STATIC

    schedules._PipelineSchedule._warmup_p2p = static
    try:
        yield
    finally:
        schedules._PipelineSchedule._warmup_p2p = original


class _StashedWork:
    """A send's work that keeps its tensors until waited, as NCCL's does (``ProcessGroupNCCL`` stashes an async
    op's inputs, ``stashed_for_allocator_safety_``, until ``wait()``); the fake group's works hold nothing."""

    def __init__(self, work, tensors):
        self._work, self._tensors = work, tensors

    def wait(self, *args, **kwargs):
        out = self._work.wait(*args, **kwargs)
        self._tensors = None
        return out

    def __getattr__(self, name):
        return getattr(self._work, name)


@contextlib.contextmanager
def _nccl_send_stash():
    """torch's ``schedules._batch_p2p`` with each send's tensor held by its work until waited (``_StashedWork``)."""
    from torch.distributed.pipelining import schedules

    original = schedules._batch_p2p

    def batch_p2p(p2p_ops, desc=None):
        works = original(p2p_ops, desc)
        sends = [op.tensor for op in p2p_ops if op.op is dist.isend]
        return [_StashedWork(work, sends if i == 0 else None) for i, work in enumerate(works)]

    schedules._batch_p2p = batch_p2p
    try:
        yield
    finally:
        schedules._batch_p2p = original


@dataclass(frozen=True)
class RankTrace:
    rank: int
    terms: dict  # Term -> bytes at the rank's peak
    phase: Phase
    seconds: float

    @property
    def tensor_bytes(self) -> int:
        return sum(self.terms.values())


def _schedule_class(schedule):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    return {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved-1f1b": ScheduleInterleaved1F1B}[schedule.value]


def trace_rank(spec: ModelSpec, resolved: ResolvedSetup, rank: int, steps: int = 2, actions: list | None = None
               ) -> RankTrace:
    """The peak of pipeline rank ``rank`` over ``steps`` training steps (module docstring). ``actions``: a list the
    schedule's forward and backward calls are appended to, as (``F`` or ``B``, stage, microbatch), every step's."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ..pipeline_step import plan_of, stage_spec
    from .build import build_model
    from .cuda_emulation import cuda_kernel_emulation
    from .distributed import upcast_trainable
    from .step import checkpoint_mode, make_optimizer, selective_op_contexts, selective_policy

    check_traceable(spec, resolved)
    setup = resolved.setup
    plan = plan_of(spec, resolved)
    me = plan.ranks[rank]
    dp = setup.num_gpus // setup.pp
    started = time.perf_counter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = AllocationTracker()
    fsdp = setup.sharding is Sharding.FSDP
    tracker.track_resizes = fsdp
    dist.init_process_group("fake", store=FakeStore(), rank=rank * dp, world_size=setup.num_gpus)
    try:
        with unset_fake_temporarily():
            mesh = init_device_mesh("cpu", (setup.pp, dp), mesh_dim_names=("pp", "dp"))
        model = build_model(stage_spec(spec, me.layers), resolved, fake_mode)
        inner = model.model
        layers = list(inner.layers)
        ckpt = checkpoint_mode(setup)
        if ckpt.caches_ops:  # as ``StepTracer._install_knobs``
            from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

            context_fn = (functools.partial(create_selective_checkpoint_contexts, selective_policy)
                          if ckpt.value == "selective" else selective_op_contexts)
            for layer in layers:
                if getattr(layer, "_gradient_checkpointing_func", None) is not None:
                    layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False,
                                                                           context_fn=context_fn)
        if setup.compile:  # torchtitan's apply_compile: each TransformerBlock, after its checkpoint wrapper
            from .compiled import compile_layer

            graphs: dict = {}
            for layer in layers:
                compile_layer(layer, graphs)
        modules, start = [], 0
        last = plan.last_stage
        for q, n in zip(me.stages, me.stage_layers):
            modules.append(StageModule(inner.embed_tokens if q == 0 else None, layers[start:start + n],
                                       inner.rotary_emb, inner.norm if q == last else None,
                                       model.lm_head if q == last else None))
            start += n
        del model, inner, layers
        with fake_mode:
            if fsdp:
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

                if setup.precision.autocast:  # torchtitan's fp32 model (the 16-bit words' weights as built here)
                    upcast_trainable(p for module in modules for p in module.parameters())

                half = None if setup.precision.value == "fp32" else (
                    torch.float16 if "fp16" in setup.precision.value else torch.bfloat16)
                policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
                for module in modules:
                    for layer in module.layers:
                        fully_shard(layer, mesh=mesh["dp"], mp_policy=policy, reshard_after_forward=False)
                    fully_shard(module, mesh=mesh["dp"], mp_policy=policy, reshard_after_forward=False)
            params = [p for module in modules for p in module.parameters()]
            tracker.register_weights(params + [b for module in modules for b in module.buffers()])
            compute = next(p for p in params if p.is_floating_point()).dtype if not fsdp else (
                policy.param_dtype or torch.float32)
            mb, s, h, V = plan.microbatch_size, setup.padded_seq_len, spec.hidden_size, spec.vocab_size
            stages = []
            for module, q in zip(modules, me.stages):
                shape_in = torch.empty(mb, s, dtype=torch.long) if q == 0 else torch.empty(
                    mb, s, h, dtype=compute, requires_grad=True)
                shape_out = torch.empty(mb, s, V if q == last else h, dtype=compute, requires_grad=True)
                stages.append(PipelineStage(module, q, len(plan.stage_layers), torch.device("cpu"),
                                            group=mesh["pp"].get_group(), input_args=(shape_in,),
                                            output_args=(shape_out,)))
            for one in stages:
                _mark_phases(one, tracker, actions)
            multi = plan.schedule.stages_per_rank > 1
            schedule = _schedule_class(plan.schedule)(stages if multi else stages[0],
                                                      n_microbatches=plan.microbatches, loss_fn=loss_fn)
            optimizer = make_optimizer(nn.ModuleList(modules), setup.optimizer)
            b = setup.batch_size
            with torch.device("cpu"), tracker, cuda_kernel_emulation(sdpa=True), _static_warmup(), \
                    _nccl_send_stash():
                for step in range(steps):
                    tracker.step = step
                    tracker.phase = Phase.FORWARD
                    args = (torch.zeros(b, s, dtype=torch.long),) if me.first else ()
                    target = torch.zeros(b, s, dtype=torch.long) if me.last else None
                    schedule.step(*args, target=target)
                    tracker.phase = Phase.OPTIMIZER_STEP
                    tracker.mark_gradients(params)
                    tracker.in_optimizer = True
                    optimizer.step()
                    tracker.in_optimizer = False
                    tracker.mark_optimizer_states(optimizer)
                    optimizer.zero_grad(set_to_none=True)
        return RankTrace(rank, tracker.peak_terms(), tracker.peak.phase, time.perf_counter() - started)
    finally:
        dist.destroy_process_group()


def _mark_phases(stage, tracker: AllocationTracker, actions: list | None = None) -> None:
    """The tracker's phase from the schedule's actions: a microbatch's forward (its saved tensors activations once
    it ends) or backward; each call appended to ``actions`` when given."""
    forward, backward = stage.forward_one_chunk, stage.backward_one_chunk

    def forward_one_chunk(chunk, *args, **kwargs):
        tracker.phase = Phase.FORWARD
        if actions is not None:
            actions.append(("F", stage.stage_index, chunk))
        try:
            return forward(chunk, *args, **kwargs)
        finally:
            tracker.end_forward()

    def backward_one_chunk(chunk, *args, **kwargs):
        tracker.phase = Phase.BACKWARD
        if actions is not None:
            actions.append(("B", stage.stage_index, chunk))
        return backward(chunk, *args, **kwargs)

    stage.forward_one_chunk, stage.backward_one_chunk = forward_one_chunk, backward_one_chunk


def trace_pipeline(spec: ModelSpec, resolved: ResolvedSetup, *, gpu=None, ranks=None):
    """``trace`` of a --pp job: every rank traced (or ``ranks``), the largest reported; each rank's peak in
    ``details["pp_ranks"]``."""
    from ..pipeline_step import pipeline_breakdown

    traced = [trace_rank(spec, resolved, r) for r in (range(resolved.setup.pp) if ranks is None else ranks)]
    largest = max(traced, key=lambda t: t.tensor_bytes)
    details = {"trace_seconds": round(sum(t.seconds for t in traced), 3), "pp_peak_rank": largest.rank,
               "pp_ranks": [{"rank": t.rank, "phase": t.phase.value, "peak_tensor_bytes": t.tensor_bytes,
                             **{term.value: value for term, value in t.terms.items()}} for t in traced]}
    from ..catalogue import get_gpu

    device = get_gpu(gpu) if gpu is not None else None
    return pipeline_breakdown(spec, resolved, device, largest.terms, largest.phase, "trace", details)
