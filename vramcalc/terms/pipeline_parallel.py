"""Pipeline parallelism (``--pp P``): how torchtitan splits the layers into stages, which stages a rank runs, the
order torch.distributed.pipelining's schedule runs their microbatches in, and what each rank holds for it.

The split (torchtitan@9dec370, the commit of its published 405B runs): ``pipeline_llama_manual_split``
(parallelisms/pipeline_llama.py:52-125) deep-copies the model per stage and keeps layers [start, stop); the first
stage alone keeps ``tok_embeddings``, the last alone ``norm`` and ``output`` (and the loss runs there, on its
output). ``generate_split_points`` (pipelining_utils.py:20-55) cuts L layers into S = P x stages-per-rank stages: the
first gets floor(L/S), each middle stage floor(L/S) plus one while L mod S lasts, the last the rest
(``split_layers``). Single-stage schedules put one stage on each rank; a looped schedule two, rank r running
stages r and r + P (``stage_ids_this_rank``, style "loop", :118-134). The microbatches: M =
``pipeline_parallel_microbatches`` or P (pipeline_llama.py:67-69), each b/M of the local batch b.

The schedules (torch 2.13 ``distributed/pipelining/schedules.py``; the same orders as torch 2.6, the release of the
published runs' nightly): ``ScheduleGPipe`` every forward then every backward (:872-990); ``Schedule1F1B`` min(M, S - i)
forwards on stage i, then one backward and one forward in turn, then the remaining backwards (:995-1180);
``ScheduleInterleaved1F1B`` (:2891-3005) w = min((v-1)·R + 2·(P-1-r), v·M) forwards on rank r (v stages per rank,
R = M / max(1, M // P) microbatches per round, the stage advancing every R operations), then a forward and a
backward in turn (forward first), then the backwards (``_get_warmup_ops`` :2872-2888, ``_get_1f1b_rank_ops``
:2735-2870). A rank holds a microbatch's saved activations on a stage from that forward to its backward:
``rank_actions`` writes the order, ``in_flight`` the most it holds at once (stage i of 1F1B: min(M, S - i)).

What a rank holds beyond one GPU's step on its layers (torch 2.13 ``stage.py``):
  recv buffers      a stage that is not the first allocates one input buffer per microbatch at its first step and
                    keeps them (``_setup_forward_recv_info``, :2245-2275): M x [b/M, s, h] in the sender's dtype;
                    the first decoder layer's checkpointed input is that buffer itself (not counted twice)
  grad buffers      a stage that is not the last, one output-gradient buffer per microbatch (``_create_grad_recv_info``,
                    :2288-2318): M x [b/M, s, h]
  stage outputs     ``fwd_cache`` keeps each microbatch's output until its backward (:908-915): [b/M, s, h] a held
                    microbatch on a stage that is not the last (the next layer that saves it is on the next stage)
  last stage        ``output_chunks`` keeps every microbatch's logits until the next step (:905-907, cleared by
                    ``clear_runtime_states`` when ``step`` starts, :604-622), and ``step`` returns them merged with
                    ``torch.cat`` (``_merge_outputs``, :612-620; torchtitan@9dec370 calls ``step(target=labels,
                    losses=losses)`` with torch's default ``return_outputs=True``): M x [b/M, s, V] in c, the whole
                    local batch's logits, twice over at the merge
Data parallelism per stage (torchtitan ``apply_fsdp``, parallelize_llama.py@9dec370:309-339): FSDP2 on every block
and the root with ``reshard_after_forward=False`` under PP, MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32) (config_manager.py:379-397: fp32 the only reduce dtype); the schedule runs every microbatch's
backward with ``set_reshard_after_backward(False)`` and ``set_requires_gradient_sync(False)`` (stage.py:843-848) and
reduces once after the last (``perform_reduce_grad``, :1164-1195). So every unit of the rank stays gathered from
its first forward to the end of the backward, and its gradients accumulate unsharded in fp32
(``FSDPParam.to_accumulated_grad_if_needed``, ``accumulate_unsharded_grad_if_needed``, _fsdp_param.py): 4 bytes a
parameter from a unit's first backward to the reduce-scatter, beside each backward's own 16-bit gradients.
Without FSDP torchtitan runs the stage in its stored dtype (mixed precision is FSDP's policy; no autocast).

Departures from torch 2.6 (the published runs'): it kept every stage's outputs in ``output_chunks``, not only the
last's (M x [b/M, s, h] more on the other stages), and each stage's input gradients on its recv buffers until the
next step (``stage_backward`` leaves ``.grad`` set; 2.13 sets it to None once sent, _backward.py:440-449): M x [b/M,
s, h] more on a stage that is not the first. Whether torch 2.6's NCCL kept a send's tensor until ``wait()`` as
2.13's does (``sends_held``) is not checked. Not counted: the microbatch views of the batch and the scalar losses.
"""

from __future__ import annotations

import dataclasses
import functools

from ..options import PipelineSchedule

FORWARD, BACKWARD = "F", "B"


def split_layers(num_layers: int, stages: int) -> tuple[int, ...]:
    """Layers per stage, torchtitan@9dec370 ``generate_split_points``: split points after floor(L/S) layers, then
    every floor(L/S) + 1 while the L mod S extra layers last, then floor(L/S); the last stage takes what is left.
    Llama-3.1-405B (126 layers) on 8 stages: 15, 16, 16, 16, 16, 16, 16, 15; on 16: 7, 8 x 14, 7."""
    base, extra = divmod(num_layers, stages)
    points, current = [], 0
    for i in range(stages - 1):
        if i == 0:
            current += base
        elif extra > 0:
            current += base + 1
            extra -= 1
        else:
            current += base
        points.append(current)
    bounds = [0, *points, num_layers]
    return tuple(hi - lo for lo, hi in zip(bounds, bounds[1:]))


def stage_ids(rank: int, pp: int, stages_per_rank: int) -> tuple[int, ...]:
    """The stages rank r runs, torchtitan's "loop" style: r, r + P, ..."""
    return tuple(rank + k * pp for k in range(stages_per_rank))


def rank_actions(schedule: PipelineSchedule, pp: int, rank: int, microbatches: int) -> tuple[tuple[str, int, int], ...]:
    """The rank's compute actions in the order its schedule runs them: (``F`` or ``B``, stage, microbatch)."""
    M = microbatches
    if schedule is PipelineSchedule.GPIPE:
        return tuple((FORWARD, rank, m) for m in range(M)) + tuple((BACKWARD, rank, m) for m in range(M))
    if schedule is PipelineSchedule.ONE_F_ONE_B:
        warmup = min(M, pp - rank)
        out = [(FORWARD, rank, m) for m in range(warmup)]
        forward, backward = warmup, 0
        while True:  # "1B1F": the backward first (schedules.py:1094-1151)
            out.append((BACKWARD, rank, backward))
            backward += 1
            if forward == M:
                break
            out.append((FORWARD, rank, forward))
            forward += 1
        out += [(BACKWARD, rank, m) for m in range(backward, M)]
        return tuple(out)
    v = schedule.stages_per_rank
    rounds = max(1, M // pp)
    per_round = M // rounds
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - rank), M * v)
    total = M * v

    def forward_stage(step: int) -> int:
        return ((step // per_round) % v) * pp + rank

    def backward_stage(step: int) -> int:
        return (v - 1 - ((step - warmup) // per_round) % v) * pp + rank

    next_forward: dict[int, int] = {}
    next_backward: dict[int, int] = {}
    out = []

    def add(kind: str, stage: int, counter: dict) -> None:
        mb = counter.get(stage, 0)
        counter[stage] = mb + 1
        out.append((kind, stage, mb))

    for op in range(warmup + (total - warmup) + warmup):
        if op < warmup:
            add(FORWARD, forward_stage(op), next_forward)
        elif op < total:  # forward then backward (``_get_1f1b_rank_ops``)
            add(FORWARD, forward_stage(op), next_forward)
            add(BACKWARD, backward_stage(op), next_backward)
        else:
            add(BACKWARD, backward_stage(op), next_backward)
    return tuple(out)


def in_flight(actions: tuple[tuple[str, int, int], ...]) -> int:
    """The most (stage, microbatch) chunks whose forward has run and whose backward has not finished, counting the
    one a backward is working on."""
    held = peak = 0
    for kind, _, _ in actions:
        if kind == FORWARD:
            held += 1
            peak = max(peak, held)
        else:
            held -= 1
    return peak


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """One pipeline rank: its stages (ascending), their layers, whether it holds the embedding (stage 0) and the
    head (the last stage), its schedule's actions and the most chunks it holds at once."""

    rank: int
    stages: tuple[int, ...]
    stage_layers: tuple[int, ...]
    first: bool
    last: bool
    actions: tuple[tuple[str, int, int], ...]
    in_flight: int

    @property
    def layers(self) -> int:
        return sum(self.stage_layers)


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    pp: int
    schedule: PipelineSchedule
    microbatches: int
    microbatch_size: int
    stage_layers: tuple[int, ...]  # every stage's, in order
    ranks: tuple[RankPlan, ...]

    def layers_of(self, stage: int) -> int:
        return self.stage_layers[stage]

    @property
    def last_stage(self) -> int:
        return len(self.stage_layers) - 1


@functools.lru_cache(maxsize=256)
def pipeline_plan(num_layers: int, pp: int, schedule: PipelineSchedule, microbatches: int,
                  batch_size: int) -> PipelinePlan:
    """Every rank's stages, layers and actions (``parallel_degrees.check_pipeline_degree`` has checked the degrees)."""
    v = schedule.stages_per_rank
    layers = split_layers(num_layers, pp * v)
    ranks = []
    for rank in range(pp):
        stages = stage_ids(rank, pp, v)
        actions = rank_actions(schedule, pp, rank, microbatches)
        ranks.append(RankPlan(rank, stages, tuple(layers[q] for q in stages), 0 in stages,
                              len(layers) - 1 in stages, actions, in_flight(actions)))
    return PipelinePlan(pp, schedule, microbatches, batch_size // microbatches, layers, tuple(ranks))


def p2p_buffer_bytes(first: bool, last: bool, microbatches: int, tokens, hidden_size: int, element_bytes: int):
    """A stage's persistent send/recv buffers (module docstring): M input buffers unless it is the first, M
    output-gradient buffers unless it is the last, each [b/M, s, h] (``tokens`` = b/M · s) in the hidden states'
    dtype. Allocated at the first step, kept for the run."""
    one = tokens * hidden_size * element_bytes
    return ((0 if first else microbatches) + (0 if last else microbatches)) * one


def outputs_held_bytes(forwards, tokens, vocab_size: int, compute_bytes: int):
    """The last stage's ``output_chunks``: the logits of every microbatch forwarded so far in this step,
    [b/M, s, V] in the compute dtype each."""
    return forwards * tokens * vocab_size * compute_bytes


def sends_held(schedule: PipelineSchedule, held: int, sends_grad: bool, sends_output: bool) -> int:
    """[b/M, s, h] tensors a rank's sends keep alive once one more backward has run (``held`` before it). NCCL holds
    an async send's tensors until its work is waited (torch 2.13 ``ProcessGroupNCCL``: the work stashes its inputs,
    ``stashed_for_allocator_safety_``, released by ``wait()``); the schedules wait (schedules.py):
      1f1b              each send at once, but ``bwd_sends`` keeps the last input gradient bound until the next
                        backward's replaces it (:1116, :1167): one, through the next forward and backward
      gpipe             every backward send at the end of the backward (``bwd_sends_to_wait``, :932-955): one more
                        input gradient per backward
      interleaved-1f1b  every send at the end of the step (``send_ops``, :2440, :2654-2655): each input gradient
                        and, once its backward has popped it from ``fwd_cache``, each output
    A stage sends its input's gradient unless it is the first (``sends_grad``), its output unless the last."""
    if schedule is PipelineSchedule.ONE_F_ONE_B:
        return 1 if sends_grad else held
    if schedule is PipelineSchedule.GPIPE:
        return held + (1 if sends_grad else 0)
    return held + (1 if sends_grad else 0) + (1 if sends_output else 0)


def sends_held_at_reduce(schedule: PipelineSchedule, held: int) -> int:
    """Of ``sends_held`` after the last backward, what is still alive at FSDP's reduce (``perform_reduce_grad``):
    gpipe has waited its sends, but its ``ops`` keeps the last one bound; 1f1b its ``bwd_sends``; interleaved waits
    after the reduce (it is an action of the schedule, before ``send_ops`` are waited)."""
    if schedule is PipelineSchedule.INTERLEAVED_1F1B:
        return held
    return min(held, 1)

