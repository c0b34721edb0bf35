"""The step of one pipeline rank (``--pp``), and the estimate of the largest (``terms/pipeline_parallel.py`` has the
split, the schedules and the sources).

A rank's step is its schedule's actions in order (``pipeline_parallel.rank_actions``), each one microbatch's
forward or backward on one of its stages, built from the one-GPU terms of that stage's layers:

- a stage is the model cut to its layers (``stage_spec``: the same layer, L_q of them), the embedding's tensors and
  saved ids on stage 0, the final norm's, lm_head's and the loss on the last; one microbatch is b/M sequences;
- a microbatch held on stage q between its forward and its backward keeps ``_Stage.held``: the stage's saved
  tensors (``activations.model_saved`` of the stage, the head's on the last stage only), its output until its
  backward on a stage that is not the last, the loss's saved tensors on the last (``LogitsBytes.saved``); a stage
  that is not the first receives its input into a persistent buffer, which is the first checkpointed layer's input
  (``p2p_buffer_bytes`` counts it, once), and the gradient its last layer's backward starts from is a persistent
  buffer too, unless it is the last stage;
- a forward's moment: the held microbatches beside this one's saved tensors (and on the last stage the loss's
  forward peak); a backward's: the other held microbatches beside the one-GPU backward of the stage, the loss's and
  lm_head's backward on the last stage, each layer's MLP and attention backward (the first and last layer of the
  stage bound the run: its sums are linear), the embedding's backward on stage 0;
- weights, gradients and optimizer states are the rank's stages' (``rank_states``): without FSDP the stored
  tensors', every stage's gradients from its first backward on; under FSDP the shards (trainable ones in fp32 under
  an autocast word, fp8 included, as the one-stage FSDP rule ``distributed.shards_trainable_in_fp32`` has them:
  torchtitan builds its model in fp32 and FSDP2's ``MixedPrecisionPolicy`` only gathers in 16 bits), every unit
  gathered in the 16-bit param dtype through forward and backward, and fp32 unsharded gradients accumulating from a
  stage's first backward (its 16-bit gradients beside them until each unit's post-backward, and beside their first
  fp32 copy there), reduce-scattered after the last backward;
- the last stage's ``output_chunks`` (every microbatch's logits so far, twice at the merge ``step`` returns), every
  stage's send/recv buffers, and the gradients and outputs the rank's sends still hold (``pp_terms.sends_held``).
No autocast: torchtitan computes in the FSDP param dtype, or the stored one (``compute_view``).
Composed options take the single-stage rank view's per-layer terms unchanged (``stage_view``, then the --tp and --cp
rank views, then ``step_moment.layer_setup``/``saved_plan``): ``--compile`` the compiled block's saved plan
(torchtitan@9dec370 ``apply_compile`` compiles each TransformerBlock, the loss eager; the first block's input a
compiled graph keeps is the recv buffer, as a checkpoint's is), ``--precision fp8`` torchao's casts in each half-layer's
backward (``float8.layer_backward_cast_bytes``), ``--tp-plan torchtitan`` the sequence-parallel shard (the residual
stream, its gradient, the norms and the p2p buffers [b/M, s/T, h]; each block input gradient's reduce-scatter;
loss-parallel logits [b/M, s, V/T]), ``--cp`` the ring's moment (``context_parallel.ring_moment_bytes``, compiled or
eager) on s/C positions. The reported peak
is the largest rank's; every rank's is in ``details["pp_ranks"]``. Checked rank by rank against torch's own
schedules run on a fake process group (``tracing/pipeline_parallel.py``, tests/test_pipeline_parallel.py: 1f1b,
gpipe and interleaved-1f1b, with and without FSDP, none, full and selective checkpointing; --compile and --precision
fp8 too).
"""

from __future__ import annotations

import dataclasses
import functools

from .model import ModelSpec
from .options import Loss, Phase, Precision, Sharding, Term
from .parallel_degrees import pipeline_microbatches
from .setup_inputs import setup_inputs
from .step_moment import Moment, layer_setup, saved_plan
from .terms import activations, distributed, float8, layouts, logits, optimizer, parameters, temporaries
from .terms import pipeline_parallel as pp_terms
from .terms import tensor_parallel
from .terms.context_parallel import ring_kv_heads, ring_moment_bytes
from .terms.gradients import gradient_bytes
from .terms.weights import weight_bytes
from .training_setup import ResolvedSetup
from .units import DType, round_up

_F32 = DType.FP32.bytes
_TRUE = {Precision.MIXED_BF16: Precision.BF16_TRUE, Precision.BF16: Precision.BF16_TRUE,
         Precision.MIXED_FP16: Precision.FP16_TRUE, Precision.FP16: Precision.FP16_TRUE}


def stage_view(resolved: ResolvedSetup) -> ResolvedSetup:
    """The setup every stage group shares: --num-gpus N/P (tensor, context and data parallelism inside one stage),
    one microbatch of b/M sequences, no pipeline (so that the --tp and --cp rank views apply unchanged)."""
    setup = resolved.setup
    microbatches = pipeline_microbatches(setup)
    return dataclasses.replace(resolved, setup=dataclasses.replace(
        setup, pp=1, pp_microbatches=None, num_gpus=setup.num_gpus // setup.pp,
        batch_size=setup.batch_size // microbatches))


def compute_view(resolved: ResolvedSetup) -> ResolvedSetup:
    """The setup a stage computes in: FSDP2's 16-bit param dtype, or the stored dtype without FSDP, and no autocast
    (torchtitan@9dec370 enters none: its mixed precision is ``MixedPrecisionPolicy``); one GPU's engine."""
    setup = resolved.setup
    return dataclasses.replace(resolved, setup=dataclasses.replace(
        setup, precision=_TRUE.get(setup.precision, setup.precision), sharding=Sharding.NONE, num_gpus=1))


@functools.lru_cache(maxsize=1024)
def stage_spec(spec: ModelSpec, layers: int) -> ModelSpec:
    """The model cut to ``layers`` of its (alike) decoder layers."""
    return dataclasses.replace(spec, num_layers=layers, layer_types=spec.layer_types[:layers],
                               params_published=None, active_params_published=None, params_exact=None)


def stage_tensors(spec: ModelSpec, tensors, layers: int, first: bool, last: bool) -> tuple:
    """The stored tensors of a stage (or of a rank's stages: ``layers`` their sum): the decoder layers' tensors for
    ``layers`` layers, the embedding on the first, the final norm and lm_head on the last."""
    out = []
    for t in tensors:
        if t.scope in ("layer", "dense", "moe"):
            out.append(dataclasses.replace(t, count=t.count // spec.num_layers * layers))
        elif t.kind == "embedding":
            if first:
                out.append(t)
        elif last:  # the final norm, lm_head
            out.append(t)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class RankStates:
    """A pipeline rank's model states (bytes)."""

    weights_at_rest: int  # parameters (their shards under FSDP)
    weights_in_step: int  # from the first forward to the end of backward (every FSDP unit gathered)
    optimizer_states: int
    optimizer_step: int
    step_gradients: int  # at the optimizer step (the shards under FSDP)
    stage_gradients: dict  # stage -> gradients it keeps once its first backward is done (fp32 unsharded: FSDP)
    layer_gradients: int  # what one finished layer adds to them in the stage's first backward
    head_gradients: int  # the final norm's and lm_head's (last stage), made at lm_head's backward (no FSDP)
    embedding_gradients: int  # the embedding's (stage 0), made at its backward (no FSDP)
    layer_backward_gradients: int = 0  # FSDP: one layer's 16-bit unsharded gradients, before its post-backward
    root_head_gradients: int = 0  # FSDP: the final norm's and lm_head's 16-bit ones, until the stage's backward ends
    root_embedding_gradients: int = 0  # FSDP: the embedding's 16-bit ones, likewise
    reduce_extra: int = 0  # FSDP's reduce after the last backward: one unit's reduce-scatter input less its params


def rank_states(spec: ModelSpec, resolved: ResolvedSetup, plan: pp_terms.PipelinePlan,
                rank: pp_terms.RankPlan) -> RankStates:
    """Weights, gradients and optimizer states of the rank's stages (module docstring); ``resolved`` is the stage
    view (``stage_view``, after the --tp and --cp rank views), ``spec`` the --tp rank's model."""
    setup = resolved.setup
    tensors = parameters.stored_tensors(spec, resolved)
    last = plan.last_stage
    mine = stage_tensors(spec, tensors, rank.layers, rank.first, rank.last)
    per_stage = {q: stage_tensors(spec, tensors, plan.layers_of(q), q == 0, q == last) for q in rank.stages}
    one_layer = stage_tensors(spec, tensors, 1, False, False)
    head = tuple(t for t in tensors if t.scope == "model" and t.kind != "embedding")
    embedding = tuple(t for t in tensors if t.kind == "embedding")
    if setup.sharding is not Sharding.FSDP:
        return RankStates(weight_bytes(mine), weight_bytes(mine),
                          optimizer.optimizer_state_bytes(mine, setup.optimizer).device_bytes,
                          optimizer.optimizer_step_temporary_bytes(mine, setup.optimizer), gradient_bytes(mine),
                          {q: gradient_bytes(ts) for q, ts in per_stage.items()}, gradient_bytes(one_layer),
                          gradient_bytes(head), gradient_bytes(embedding))
    n = setup.num_gpus  # dp_shard x cp ranks (``stage_view``, the --tp view)
    half = distributed._half_bytes(resolved)

    def gather(t) -> int:  # one tensor's all-gathered copy in the param dtype, padded to ceil(rows/N)·N rows
        return round_up(distributed._padded_numel(t, n) * (half or t.bits // 8)) * t.count

    def unsharded(ts, element_bytes) -> int:  # the unsharded gradients of ``ts`` in ``element_bytes``
        return sum(round_up(t.numel * element_bytes) * t.count for t in ts if t.trainable)

    fp32 = distributed.shards_trainable_in_fp32(resolved)  # torchtitan's model is fp32; FSDP2 gathers in 16 bits
    shards = tuple(distributed.state_shard(t, n, fp32) for t in mine)
    at_rest = weight_bytes(shards)
    unit_params = sum(gather(t) for t in one_layer)
    reduce_input = round_up(sum(distributed._padded_numel(t, n) * t.count for t in one_layer if t.trainable) * _F32)
    return RankStates(
        at_rest, at_rest + sum(gather(t) for t in mine),
        optimizer.optimizer_state_bytes(shards, setup.optimizer).device_bytes,
        optimizer.optimizer_step_temporary_bytes(shards, setup.optimizer),
        gradient_bytes(tuple(t for t in shards if t.trainable)),
        {q: unsharded(ts, _F32) for q, ts in per_stage.items()}, unsharded(one_layer, _F32), 0, 0,
        layer_backward_gradients=unsharded(one_layer, half or _F32),
        root_head_gradients=unsharded(head, half or _F32), root_embedding_gradients=unsharded(embedding, half or _F32),
        reduce_extra=reduce_input - unit_params)


@dataclasses.dataclass(frozen=True)
class _Stage:
    """What one microbatch of one stage saves and makes (bytes)."""

    held: int  # kept from its forward to its backward (the head's and the loss's saved tensors on the last stage)
    layers_saved: int  # of ``held``: what the decoder layers' backward starts from (the head's freed before)
    head_input: int  # lm_head's saved input, freed by its backward (last stage)


class _StepContext:
    """The per-microbatch terms of a rank's stages (module docstring), computed once."""

    def __init__(self, spec: ModelSpec, resolved: ResolvedSetup, plan: pp_terms.PipelinePlan,
                 rank: pp_terms.RankPlan):
        self.spec, self.plan, self.rank = spec, plan, rank
        compute = compute_view(resolved)
        setup = compute.setup
        self.layer = layer = layer_setup(compute, spec.family)
        self.dt = dt = layer.dtypes
        self.ckpt = ckpt = setup.grad_ckpt
        self.b, self.s = b, s = setup.batch_size, setup.padded_seq_len
        self.tokens = tokens = b * s
        self.masked = masked = activations.attention_masked(spec, s, compute.attn_used, False, b)
        h = spec.hidden_size
        # --tp-plan torchtitan: the residual stream between blocks, its gradient, the norms and so what a stage
        # sends and receives are the rank's sequence shard [b/M, s/T, h] (``tensor_parallel.sequence_parallel``;
        # torch's PipelineStage infers its buffers from the local tensors the blocks return)
        self.sp = tensor_parallel.sequence_parallel(setup)
        self.residual_tokens = residual_tokens = tokens // setup.tp if self.sp else tokens
        self.lg = logits.logits_bytes(spec, Loss.HF, dt, tokens, 0, sequences=b, whole_head=True,
                                      loss_parallel=self.sp)
        self.hidden_grad = temporaries.hidden_grad_bytes(spec, dt, residual_tokens)
        self.norm_backward = temporaries.norm_backward_bytes(spec, residual_tokens, layer.kernels)
        self.embedding_backward = temporaries.embedding_backward_bytes(spec, setup.method, dt, tokens,
                                                                       setup.modules_to_save)
        # the single-stage estimate's per-layer backward extras (``estimator._step_moments``): torchao's fp8 casts
        # (--precision fp8), a block input gradient's reduce-scatter (--tp-plan torchtitan), the ring's buffers
        # (--cp, compiled or eager)
        self.casts = float8.layer_backward_cast_bytes(spec, setup.precision, tokens)
        self.block_reduce_scatter = tensor_parallel.backward_reduce_scatter_bytes(
            h, tokens, dt.c, setup.tp) if self.sp else 0
        self.cp = getattr(setup, "cp", 1)
        self.ring = ring_moment_bytes(
            spec, tokens, self.cp, dt.c, compiled=setup.compile,
            o_input_copy_bytes=activations.attention_output_copy(spec, layer, masked).bytes(b, s),
            kv_heads=ring_kv_heads(spec, setup)) if self.cp > 1 else 0
        self.hidden = residual_tokens * h * dt.r  # one [b/M, s, h] (s/T: --tp-plan torchtitan) in r
        self.output = pp_terms.outputs_held_bytes(1, tokens, spec.vocab_size, dt.c)
        self.saved_plans = {}
        self.stages = {}
        last = plan.last_stage
        for q in rank.stages:
            n_q = plan.layers_of(q)
            st = stage_spec(spec, n_q)
            saved = activations.model_saved(st, layer, ckpt, masked)
            if q != last:
                saved += activations.head_saved(st, layer) * -1
            if q != 0:
                saved += activations.embedding_saved(st, layer, bool(ckpt)) * -1
            held = saved.bytes(b, s)
            if q != 0 and (ckpt or layer.compiled):
                # the first layer's checkpointed input, or the input a compiled block's graph keeps for its first
                # norm (``activations`` module docstring, --compile), is the recv buffer (``p2p_buffer_bytes``)
                held -= layouts.residual_bytes(st, layer) * h * residual_tokens
            if q != last:  # the stage's output, in ``fwd_cache`` until its backward
                held += self.hidden
            head = activations.head_saved(st, layer).bytes(b, s) if q == last else 0
            head_input = activations.head_input_saved(st, layer).bytes(b, s) if q == last else 0
            self.stages[q] = _Stage(held + (self.lg.saved if q == last else 0), held - head, head_input)
            self.saved_plans[q] = saved_plan(st, layer, ckpt, masked)

    def buffers(self) -> int:
        """The rank's send/recv buffers, every stage's (``p2p_buffer_bytes``)."""
        return sum(pp_terms.p2p_buffer_bytes(q == 0, q == self.plan.last_stage, self.plan.microbatches,
                                             self.residual_tokens, self.spec.hidden_size, self.dt.r) for q in self.rank.stages)

    def layer_moments(self, q: int, W, O, G_before, G_layer, G_transient, other, logits_held, buffers,
                      converts: bool = False) -> list[Moment]:
        """The backward of stage q's decoder layers for one microbatch: per layer (backward order) the MLP's
        backward with the whole layer saved (recomputed under checkpointing), mul's once down's input is freed,
        then the attention's (the softmax's and the scores' for eager attention), as ``estimator``'s one-GPU layer
        moments; at the stage's last and first layer (its sums are linear along the run). ``G_before``: gradients
        alive when the stage's backward reaches its layers; ``G_layer``: what each finished layer adds to them;
        ``G_transient``: a layer's 16-bit gradients before its post-backward (FSDP), at its attention's backward;
        ``other``: the other held microbatches' bytes; ``converts``: FSDP's post-backward of the stage's first
        backward, ``unsharded_grad.to(fp32)`` (``to_accumulated_grad_if_needed``) beside the 16-bit gradients and
        the layer's input gradient, once the layer's tensors are freed."""
        spec, layer, plan_q, b, s = self.spec, self.layer, self.saved_plans[q], self.b, self.s
        c, r = self.dt.c, self.dt.r
        kind = (False, activations.layer_masks(spec, self.masked)[0], False)
        shared = plan_q.shared.bytes(b, s)
        kept = plan_q.kept[kind].bytes(b, s)
        recompute = plan_q.recompute[kind].bytes(b, s)
        attention_left = plan_q.attention_left[kind].bytes(b, s)
        freed = plan_q.freed[kind]
        c_mlp = freed.mlp_element_bytes or c
        casts = self.casts  # --precision fp8: beside each half-layer's backward transients, as on one GPU
        down = temporaries.down_backward_bytes(spec, c_mlp, r, b, s) + casts
        mlp = temporaries.mlp_backward_bytes(spec, c_mlp, r, b, s) + casts
        attention = temporaries.attention_backward_bytes(spec, c, layer.attn_used, b, s) + casts
        n = self.plan.layers_of(q)
        remaining = self.stages[q].layers_saved - shared
        moments = []
        # the stage's last layer of a stage that is not the last takes its incoming gradient from the grad buffer
        # (in ``buffers``), not a new [T, h] as the one-GPU transients count it
        received = self.hidden if q != self.plan.last_stage else 0
        for done in sorted({0, n - 1}):  # the stage's last layer, then its first
            left = remaining - kept * done
            G = G_before + G_layer * done
            held = other + buffers + shared + left
            incoming = received if done == 0 else 0
            moments.append(Moment(Phase.BACKWARD, W, G, O, held + recompute, logits_held, down - incoming))
            moments.append(Moment(Phase.BACKWARD, W, G, O, held + recompute - freed.mlp.bytes(b, s), logits_held,
                                  mlp - incoming))
            after_mlp = held + attention_left
            if self.block_reduce_scatter:  # the MLP's input gradient reduce-scattered onto the sequence
                moments.append(Moment(Phase.BACKWARD, W, G + G_transient, O, after_mlp, logits_held,
                                      self.block_reduce_scatter + self.hidden_grad))
            if freed.eager_softmax:  # o_proj's and probs @ v's saved tensors freed, then the softmax's
                softmax_out = activations.Saved(per_square=_F32 * spec.num_heads).bytes(b, s)
                at_softmax = after_mlp - freed.attention.bytes(b, s)
                moments.append(Moment(Phase.BACKWARD, W, G + G_transient, O, at_softmax, logits_held,
                                      temporaries.eager_softmax_backward_bytes(spec, c, r, b, s) + casts - incoming))
                moments.append(Moment(Phase.BACKWARD, W, G + G_transient, O, at_softmax - softmax_out, logits_held,
                                      temporaries.eager_scores_backward_bytes(spec, c, r, b, s) + casts - incoming))
            else:
                moments.append(Moment(Phase.BACKWARD, W, G + G_transient, O, after_mlp, logits_held, attention))
            if self.ring:  # --cp: the ring attention's backward buffers (terms/context_parallel.py)
                moments.append(Moment(Phase.BACKWARD, W, G + G_transient, O, after_mlp, logits_held, self.ring))
            if converts:
                moments.append(Moment(Phase.BACKWARD, W, G + G_layer + G_transient, O, held - kept, logits_held,
                                      self.hidden_grad))
        return moments


def rank_moments(spec: ModelSpec, resolved: ResolvedSetup, plan: pp_terms.PipelinePlan,
                 rank: pp_terms.RankPlan) -> list[Moment]:
    """Every moment of one pipeline rank's step at which its peak can fall (module docstring).

    Gradients: without FSDP a stage's first backward makes them (lm_head's and the final norm's at lm_head's
    backward, each layer's as it finishes, the embedding's last) and later backwards accumulate into them in place;
    under FSDP each backward makes 16-bit unsharded ones (a layer's until its post-backward, the root unit's, lm_head
    or the embedding, until the stage's backward ends), kept as fp32 from the stage's first backward on."""
    ctx = _StepContext(spec, resolved, plan, rank)
    states = rank_states(spec, resolved, plan, rank)
    fsdp = resolved.setup.sharding is Sharding.FSDP
    last = plan.last_stage
    buffers = ctx.buffers()
    W, O = states.weights_in_step, states.optimizer_states
    held: dict[int, int] = {q: 0 for q in rank.stages}  # microbatches in flight per stage
    started: set[int] = set()  # stages whose first backward is done
    last_forwards = 0  # microbatches the last stage has run forward (``output_chunks``)
    sent = 0  # [b/M, s, h] tensors the rank's sends still hold (``pp_terms.sends_held``)
    lg = ctx.lg
    moments = []

    def others(excluding: int) -> int:
        """The held microbatches but one of stage ``excluding`` (the one at work), and what the sends hold."""
        chunks = sum(ctx.stages[q].held * (held[q] - (1 if q == excluding else 0)) for q in rank.stages)
        return chunks + sent * ctx.hidden

    for kind, q, _ in rank.actions:
        stage = ctx.stages[q]
        G0 = sum(states.stage_gradients[p] for p in started)
        outputs = ctx.output * last_forwards if rank.last else 0  # ``output_chunks`` so far
        if kind == pp_terms.FORWARD:
            own = stage.held - (lg.saved if q == last else 0)  # the loss's forward peak holds what it saves
            moments.append(Moment(Phase.FORWARD, W, G0, O, others(-1) + buffers + own,
                                  (lg.forward_peak if q == last else 0) + outputs, 0))
            held[q] += 1
            last_forwards += q == last
            continue
        other = others(q)
        first_backward = q not in started
        if fsdp:  # the root unit's 16-bit gradients, until the stage's backward ends
            head = states.root_head_gradients if q == last else 0
            embedding = states.root_embedding_gradients if q == 0 else 0
            layer_transient = states.layer_backward_gradients
        else:  # made once, then accumulated in place
            head = states.head_gradients if q == last and first_backward else 0
            embedding = states.embedding_gradients if q == 0 and first_backward else 0
            layer_transient = 0
        if q == last:  # the loss's backward, lm_head's, the final norm's
            A = other + buffers + stage.held - lg.saved
            moments += [
                Moment(Phase.BACKWARD_START, W, G0, O, A, lg.backward_peak + outputs, 0),
                Moment(Phase.BACKWARD, W, G0 + head, O, A, lg.head_backward + outputs, ctx.hidden_grad),
                Moment(Phase.BACKWARD, W, G0 + head, O, A - stage.head_input,
                       lg.forward_hidden_grad + lg.held + outputs, ctx.hidden_grad + ctx.norm_backward),
            ]
        G_layer = states.layer_gradients if first_backward else 0
        moments += ctx.layer_moments(q, W, O, G0 + head, G_layer, layer_transient, other, outputs, buffers,
                                     converts=fsdp and first_backward)
        G_end = G0 + head + G_layer * plan.layers_of(q) + embedding
        if q == 0:  # the embedding's backward, every layer's gradients made
            moments.append(Moment(Phase.BACKWARD_END, W, G_end, O, other + buffers, outputs, ctx.embedding_backward))
        if fsdp and first_backward and (q == 0 or q == last):  # the root unit's post-backward: its fp32 copy
            root_fp32 = states.stage_gradients[q] - G_layer * plan.layers_of(q)
            moments.append(Moment(Phase.BACKWARD_END, W, G_end + root_fp32, O, other + buffers, outputs, 0))
        held[q] -= 1
        started.add(q)
        sent = pp_terms.sends_held(plan.schedule, sent, q != 0, q != last)
    outputs = ctx.output * last_forwards if rank.last else 0
    G_all = sum(states.stage_gradients[p] for p in started)
    if fsdp:  # the reduce after the last backward: one unit's reduce-scatter input beside every accumulated gradient
        at_reduce = pp_terms.sends_held_at_reduce(plan.schedule, sent) * ctx.hidden
        moments.append(Moment(Phase.BACKWARD_END, W + states.reduce_extra, G_all, O, buffers + at_reduce, outputs, 0))
    at_rest = states.weights_at_rest
    if rank.last:  # ``step`` returns the merged outputs: ``torch.cat`` of every microbatch's logits
        moments.append(Moment(Phase.BACKWARD_END, at_rest, states.step_gradients, O, buffers, 2 * outputs, 0))
    moments.append(Moment(Phase.OPTIMIZER_STEP, at_rest, states.step_gradients, O, buffers, outputs,
                          states.optimizer_step))
    setup = resolved.setup
    if setup.tp > 1 and not ctx.sp:  # transformers' plan: a backward's all-reduce buffers, as ``estimator.step_moments``
        moments = tensor_parallel.with_backward_all_reduce(moments, spec.hidden_size, ctx.tokens, ctx.dt.c)
    return moments


@dataclasses.dataclass(frozen=True)
class RankPeak:
    rank: int
    phase: Phase
    terms: tuple  # (Term, bytes)

    @property
    def tensor_bytes(self) -> int:
        return sum(value for _, value in self.terms)


def _rank_view(spec: ModelSpec, resolved: ResolvedSetup) -> tuple[ModelSpec, ResolvedSetup]:
    from .terms import context_parallel

    stage = stage_view(resolved)
    rank_spec, rank_resolved = tensor_parallel.rank_view(spec, stage)
    return context_parallel.rank_view(rank_spec, rank_resolved)


def plan_of(spec: ModelSpec, resolved: ResolvedSetup) -> pp_terms.PipelinePlan:
    setup = resolved.setup
    return pp_terms.pipeline_plan(spec.num_layers, setup.pp, setup.pp_schedule, pipeline_microbatches(setup),
                                  setup.batch_size)


@functools.lru_cache(maxsize=256)
def rank_peaks(spec: ModelSpec, resolved: ResolvedSetup) -> tuple[RankPeak, ...]:
    """Every pipeline rank's largest moment."""
    plan = plan_of(spec, resolved)
    rank_spec, rank_resolved = _rank_view(spec, resolved)
    out = []
    for rank in plan.ranks:
        peak = max(rank_moments(rank_spec, rank_resolved, plan, rank), key=lambda m: m.tensor_bytes)
        out.append(RankPeak(rank.rank, peak.phase, (
            (Term.WEIGHTS, peak.weights), (Term.GRADIENTS, peak.gradients),
            (Term.OPTIMIZER_STATES, peak.optimizer_states), (Term.ACTIVATIONS, peak.activations),
            (Term.LOGITS, peak.logits), (Term.TEMPORARIES, peak.temporaries))))
    return tuple(out)


def pipeline_details(spec: ModelSpec, resolved: ResolvedSetup) -> dict:
    """``details`` of a --pp estimate: the split, the microbatches, every rank's stages, layers, in-flight
    microbatches and peak."""
    plan = plan_of(spec, resolved)
    peaks = rank_peaks(spec, resolved)
    largest = max(peaks, key=lambda p: p.tensor_bytes)
    return {
        "pp": plan.pp, "pp_schedule": plan.schedule.value, "pp_microbatches": plan.microbatches,
        "pp_microbatch_size": plan.microbatch_size, "pp_stage_layers": list(plan.stage_layers),
        "pp_peak_rank": largest.rank,
        "pp_ranks": [{"rank": r.rank, "stages": list(r.stages), "layers": r.layers,
                      "first": r.first, "last": r.last, "in_flight": r.in_flight,
                      "phase": p.phase.value, "peak_tensor_bytes": p.tensor_bytes,
                      **{term.value: value for term, value in p.terms}}
                     for r, p in zip(plan.ranks, peaks)],
    }


def pipeline_estimate(spec: ModelSpec, resolved: ResolvedSetup, device):
    """The estimate of a --pp job: the largest rank's moment."""
    largest = max(rank_peaks(spec, resolved), key=lambda p: p.tensor_bytes)
    return pipeline_breakdown(spec, resolved, device, dict(largest.terms), largest.phase, "estimate",
                              pipeline_details(spec, resolved))


def pipeline_breakdown(spec: ModelSpec, resolved: ResolvedSetup, device, terms: dict, phase: Phase, source: str,
                       details: dict):
    """A --pp breakdown from its largest rank's tensor terms, with the runtime terms of ``estimator._finish`` (no
    allocator replay of a pipeline step: the slack is the profile's fraction)."""
    from .breakdown import MemoryBreakdown
    from .profiles import runtime_profile
    from .terms import runtime

    terms = {term: int(terms.get(term, 0)) for term in Term if term.is_tensor}
    profile = runtime_profile(device, resolved.setup.cuda_context_mib)
    peak_tensor = sum(terms.values())
    terms[Term.RUNTIME_OVERHEAD] = runtime.runtime_overhead_bytes(profile, device, resolved.setup.num_gpus, 0)
    terms[Term.ALLOCATOR_SLACK] = runtime.allocator_slack_bytes(profile, peak_tensor)
    details = {"params": spec.params, "active_params": spec.active_params, "trainable_params": spec.params,
               "runtime_profile": profile.source, **details}
    inputs = functools.partial(setup_inputs, spec, resolved, device)
    return MemoryBreakdown(spec.name, terms, phase, inputs, source, device, resolved.warnings, details)
