"""estimate(): assemble the term functions at each moment of a training step and report the largest.

Moments (each a full set of terms; the peak is the largest moment, never the sum of each term's own maximum):
  forward          end of forward, inside the loss: weights, states, saved activations, logits' forward peak
  backward-start   the loss's backward: saved activations and the 12·T·V gradients of the logits
  backward         lm_head's backward (its weight gradient beside the logits gradient), then the decoder layers:
                   gradients grow while saved activations are released, with one layer's backward transients
                   (and, under checkpointing, that layer's recomputed activations)
  backward-end     every gradient, during the embedding's backward
  optimizer-step   every gradient and state, plus the optimizer's scratch
With gradient accumulation the gradients of earlier micro-batches are alive through forward and backward. Optimizer
states exist at every moment: the peak is taken over the second step, after the first created them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .breakdown import MemoryBreakdown
from .catalogue import GpuSpec, get_gpu, get_model
from .errors import VramcalcError
from .model import ModelSpec
from .options import Method, Phase, Sharding, Term
from .profiles import runtime_profile
from .terms import activations, distributed, logits, optimizer, parameters, runtime, temporaries
from .training_setup import ResolvedSetup, resolve_setup
from .units import maximum


@dataclass(frozen=True)
class Moment:
    phase: Phase
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    temporaries: int

    @property
    def tensor_bytes(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.activations + self.logits + self.temporaries


def estimate(model, *, gpu: str | GpuSpec | None = None, **options) -> MemoryBreakdown:
    """Peak device memory of one fine-tuning step, by term. Options are the TrainingSetup fields (see DESIGN.md);
    any left out take the defaults of a current transformers + peft + Trainer user (listed in ``inputs``)."""
    spec = get_model(model)
    resolved = resolve_setup(spec, **options)
    device = get_gpu(gpu) if gpu is not None else None
    moments = step_moments(spec, resolved)
    peak = max(moments, key=lambda moment: moment.tensor_bytes)
    terms = {
        Term.WEIGHTS: peak.weights,
        Term.GRADIENTS: peak.gradients,
        Term.OPTIMIZER_STATES: peak.optimizer_states,
        Term.ACTIVATIONS: peak.activations,
        Term.LOGITS: peak.logits,
        Term.TEMPORARIES: peak.temporaries,
    }
    paged = optimizer.optimizer_state_bytes(parameters.stored_tensors(spec, resolved), resolved.setup.optimizer).paged_bytes
    return _finish(spec, resolved, terms, peak.phase, "estimate", device, paged, {})


def assemble_measured(spec: ModelSpec, resolved: ResolvedSetup, tensor_terms: dict, phase: Phase, *, source: str,
                      gpu=None, paged_bytes: int = 0, details: dict | None = None) -> MemoryBreakdown:
    """A breakdown whose tensor terms were traced or measured; runtime terms come from the same model as estimate's."""
    device = get_gpu(gpu) if gpu is not None else None
    terms = {term: int(tensor_terms.get(term, 0)) for term in Term if term.is_tensor}
    return _finish(spec, resolved, terms, phase, source, device, paged_bytes, details or {})


def peak_tensor_bytes_grid(spec: ModelSpec, resolved: ResolvedSetup, batch_sizes, seq_lens):
    """Peak tensor bytes over arrays of batch sizes and sequence lengths (numpy), and the phase of each peak."""
    import numpy

    b = numpy.asarray(batch_sizes, dtype=numpy.int64)
    s = numpy.asarray(seq_lens, dtype=numpy.int64)
    moments = step_moments(spec, resolved, b, s)
    shape = numpy.broadcast(b, s).shape
    totals = numpy.stack([numpy.broadcast_to(numpy.asarray(m.tensor_bytes, dtype=numpy.int64), shape) for m in moments])
    phases = numpy.array([m.phase.value for m in moments])
    return totals.max(axis=0), phases[totals.argmax(axis=0)]


def _finish(spec, resolved, terms, phase, source, device, paged_bytes, details) -> MemoryBreakdown:
    setup = resolved.setup
    profile = runtime_profile(device)
    peak_tensor = sum(terms.values())
    communicating = setup.num_gpus if setup.sharding is not Sharding.NONE else 1  # NCCL only under an engine
    terms[Term.RUNTIME_OVERHEAD] = runtime.runtime_overhead_bytes(profile, device, communicating, paged_bytes)
    terms[Term.ALLOCATOR_SLACK] = runtime.allocator_slack_bytes(profile, peak_tensor)
    tensors = parameters.stored_tensors(spec, resolved)
    inputs = {"model": spec.name, **setup.to_dict(), "attn_used": resolved.attn_used.value,
              "lora_modules": ",".join(resolved.lora_modules), "defaults": list(resolved.defaulted)}
    details = {
        "params": spec.params,
        "active_params": spec.active_params,
        "trainable_params": sum(t.numel * t.count for t in tensors if t.trainable),
        "paged_optimizer_bytes": paged_bytes,
        "runtime_profile": profile.source,
        **_data_parallel_details(spec, resolved, device),
        **details,
    }
    return MemoryBreakdown(spec.name, terms, phase, inputs, source, device, resolved.warnings, details)


def _data_parallel_details(spec: ModelSpec, resolved: ResolvedSetup, device: GpuSpec | None) -> dict:
    """Host RAM under offload, and the traffic of one step (and its time on the GPU's links when one is named)."""
    if resolved.setup.sharding is Sharding.NONE:
        return {}
    out = {"host_offload_bytes_per_node": distributed.host_offload_bytes_per_node(spec, resolved)}
    if device is not None:
        try:
            traffic = distributed.communication_per_step(spec, resolved, device)
        except VramcalcError:  # no bandwidth for this GPU in the catalogue: bytes only
            traffic = None
        if traffic is not None:
            out.update(communication_bytes_per_step=traffic.total_bytes,
                       communication_seconds_per_step=round(traffic.seconds, 6), communication_link=traffic.link)
    return out


def step_moments(spec: ModelSpec, resolved: ResolvedSetup, batch_size=None, seq_len=None) -> list[Moment]:
    """Every moment of the step at which the peak can fall (see the module docstring), on one GPU or one rank.

    ``batch_size`` and ``seq_len`` override the setup's and may be numpy arrays of one shape: every byte count is
    then an array over those batch shapes (``sweep`` evaluates many setups at once this way).
    Under data parallelism the model states are the rank's (``terms/distributed.py``): DDP's buckets are gradients
    at every moment; FSDP2 and ZeRO-3 add the units gathered around the compute (``_Gathered``).
    """
    setup = resolved.setup
    b = setup.batch_size if batch_size is None else batch_size
    s = setup.padded_seq_len if seq_len is None else seq_len + (setup.padded_seq_len - setup.seq_len)
    T = b * s
    rank = distributed.rank_states(spec, resolved)
    compute = distributed.compute_setup(resolved)  # the setup itself on one GPU and under DDP
    tensors = parameters.stored_tensors(spec, compute)
    W, O, G_acc = rank.weights, rank.optimizer_states, rank.accumulated_gradients
    B = rank.standing_buffers
    Bb = B + rank.backward_buffers
    A = activations.model_saved(spec, compute).bytes(b, s)
    head_grad = rank.head_gradient
    L = logits.logits_bytes(spec, compute, T, head_grad)
    copies = temporaries.weight_copy_bytes(spec, compute, tensors)
    dequant = temporaries.dequantized_weight_bytes(spec, compute, T)
    hidden_grad = spec.hidden_size * T * activations.dtypes(spec, compute).c
    gathered = _Gathered(spec, rank.gathering)
    moments = []
    if rank.gathering is not None:  # the last decoder layer's copy-out and forward, and the tail's copy-out
        A_layers = A - activations.head_saved(spec, compute).bytes(b, s)
        last_moe = spec.is_moe_layer(spec.num_layers - 1)
        A_before_last = A_layers - activations.layer_kept(spec, compute, last_moe).bytes(b, s)
        moments += [
            Moment(Phase.FORWARD, W + gathered.last_layer_copy_out, B + G_acc, O, A_before_last, 0, 0),
            Moment(Phase.FORWARD, W + gathered.last_layer_forward, B + G_acc, O, A_layers, 0, 0),
            Moment(Phase.FORWARD, W + gathered.tail_copy_out, B + G_acc, O, A_layers, 0, 0),
        ]
    moments += [
        Moment(Phase.FORWARD, W + gathered.loss_forward, B + G_acc, O, A, L.forward_peak, copies.forward),
        Moment(Phase.BACKWARD_START, W + gathered.loss_backward, B + G_acc, O, A, L.backward_peak,
               copies.backward_start),
        Moment(Phase.BACKWARD, W + gathered.head_backward, Bb + maximum(G_acc, head_grad), O, A, L.head_backward,
               copies.backward_start + hidden_grad),
        # the final norm's backward: its input gradient (fused: the loss's grad_input) and fp32 transients
        Moment(Phase.BACKWARD, W + gathered.head_backward, Bb + maximum(G_acc, head_grad), O, A,
               L.forward_hidden_grad,
               copies.backward_start + (0 if L.forward_hidden_grad else hidden_grad)
               + temporaries.norm_backward_bytes(spec, T)),
    ]
    moments += _layer_backward_moments(spec, compute, rank, gathered, W, O, Bb, G_acc, dequant, b, s)
    embedding_backward = _embedding_backward_bytes(spec, compute, T)
    if rank.gathering is None:
        moments.append(Moment(Phase.BACKWARD_END, W, Bb + rank.gradients, O, 0, 0, embedding_backward))
    else:
        moments += gathered.embedding_moments(W, O, Bb, G_acc, embedding_backward)
    moments.append(Moment(Phase.OPTIMIZER_STEP, W, B + rank.gradients, O, 0, 0, rank.optimizer_step))
    return moments


class _Gathered:
    """The bytes FSDP2 (or ZeRO-3) units add at each moment on top of the rank's sharded states (``Gathering``).

    Forward gathers each unit and keeps its flat all-gather buffer until the next unit's copy-out has returned
    (``FSDPParamGroup.wait_for_unshard`` holds the previous ``all_gather_state`` in a local until it exits): a
    copy-out holds the previous unit's buffer, its own buffer and its gathered parameters at once. The tail (final
    norm, lm_head) stays gathered into backward, and its buffer (the last layer's when tied) lives until the root's
    forward ends, after the loss. Backward re-gathers each layer while prefetching the one before it, and keeps the
    previous unit's reduce-scatter input until its own. Shard-grad-op keeps every unit gathered until its backward.
    Zero when the engine keeps whole parameters.
    """

    def __init__(self, spec: ModelSpec, gathering):
        self.spec = spec
        self.g = gathering
        if gathering is None:
            self.last_layer_forward = self.loss_forward = self.loss_backward = self.head_backward = 0
            return
        g = gathering
        L = spec.num_layers
        last = g.layer(spec.is_moe_layer(L - 1))
        before_last = g.layer(spec.is_moe_layer(L - 2)).buffer if L > 1 else g.embed.buffer
        self.all_layers = g.dense.params * spec.num_dense_layers + g.moe.params * spec.num_moe_layers
        kept = self.all_layers + g.embed.params if g.keep_gathered else 0
        tied_tail = g.tail.params if g.tied else 0
        self.last_layer_copy_out = (kept or last.params) + before_last + last.buffer + tied_tail
        self.last_layer_forward = (kept or last.params) + last.buffer + tied_tail
        self.tail_copy_out = kept + (0 if g.tied else last.buffer + g.tail.buffer + g.tail.params) + tied_tail
        self.loss_forward = kept + g.tail.params + (last.buffer if g.tied else g.tail.buffer)
        self.loss_backward = kept + g.tail.params
        self.head_backward = kept + g.tail.params + (0 if g.keep_gathered else last.buffer)

    def layer(self, index: int):
        return self.g.layer(self.spec.is_moe_layer(index))

    def weights_during(self, index: int) -> int:
        """Gathered bytes while layer ``index`` runs its backward."""
        g = self.g
        if g.keep_gathered:  # every unit not yet through its backward is still gathered
            before = sum(self.layer(i).params for i in range(index + 1)) if self.spec.is_moe else \
                g.dense.params * (index + 1)
            return before + g.embed.params
        prefetched = self.layer(index - 1).buffer if index > 0 else g.embed.buffer
        return self.layer(index).params + prefetched

    def retained_reduce_buffer(self, index: int) -> int:
        """The reduce-scatter input of the unit reduced just before layer ``index``'s."""
        return self.g.tail.reduce_buffer if index == self.spec.num_layers - 1 else self.layer(index + 1).reduce_buffer

    def embedding_moments(self, W, O, Bb, G_acc, embedding_backward) -> list[Moment]:
        """The embedding's copy-out (its buffer and parameters at once) and its backward, every layer reduced."""
        g, spec = self.g, self.spec
        reduced = g.tail.sharded_grads + g.dense.sharded_grads * spec.num_dense_layers \
            + g.moe.sharded_grads * spec.num_moe_layers
        retained = self.layer(0).reduce_buffer
        copy_out = 0 if g.keep_gathered else g.embed.buffer  # shard-grad-op: still gathered since forward
        return [
            Moment(Phase.BACKWARD_END, W + g.embed.params + copy_out, Bb + G_acc + reduced + retained, O, 0, 0, 0),
            Moment(Phase.BACKWARD_END, W + g.embed.params, Bb + maximum(G_acc, g.embed.grads) + reduced + retained, O,
                   0, 0, embedding_backward),
        ]


def _layer_backward_moments(spec, compute, rank, gathered, W, O, Bb, G_acc, dequant, b, s) -> list[Moment]:
    """The start of the first and of the last layer of each run of same-kind layers, in backward order.

    At the start of a layer's backward: the gradients of the layers after it (and lm_head's) exist, the kept
    tensors of the layers up to it remain, plus this layer's backward transients and, under checkpointing, its
    recomputed activations. Both sums are linear along a run, so its ends bound it. With gathered units (a run's
    first layer follows a unit of another size and its last prefetches one, so the second and second-to-last
    layers are ends too) the end of each such layer's backward counts too: its full unsharded gradients wait there
    for their reduce-scatter beside the gathered units and the previous unit's reduce-scatter input.
    """
    setup = compute.setup
    transient = temporaries.layer_backward_bytes(spec, compute, b, s) + dequant
    mlp_transient = temporaries.mlp_backward_bytes(spec, compute, b, s) + dequant
    attention_transient = temporaries.attention_backward_bytes(spec, compute, b, s) + dequant
    shared = activations.shared_saved(spec, compute).bytes(b, s)
    remaining = activations.model_saved(spec, compute).bytes(b, s) - shared - activations.head_saved(spec, compute).bytes(b, s)
    kept = {moe: activations.layer_kept(spec, compute, moe).bytes(b, s) for moe in (False, True)}
    grads = {moe: rank.layer_gradients[moe] for moe in (False, True)}
    recompute = {moe: activations.layer_saved(spec, compute, moe).bytes(b, s) if setup.grad_ckpt else 0
                 for moe in (False, True)}
    attention = activations.attention_saved(spec, compute).bytes(b, s)
    T = b * s
    hidden_grad = spec.hidden_size * T * activations.dtypes(spec, compute).c
    layer_end = temporaries.norm_backward_bytes(spec, T) + 2 * hidden_grad  # the norm's fp32 backward, two [T, h]
    moments = []
    sharded = rank.gathering is not None
    G = rank.head_gradient if not sharded else rank.gathering.tail.sharded_grads
    L = spec.num_layers
    for index in range(L - 1, -1, -1):
        moe = spec.is_moe_layer(index)
        run_start = index == L - 1 or spec.is_moe_layer(index + 1) != moe
        run_end = index == 0 or spec.is_moe_layer(index - 1) != moe
        # with units, a run's first layer waits on the previous kind's (or the tail's) reduce-scatter input and its
        # last prefetches a unit of another kind (or the embedding): the run is linear from its second layer to its
        # second-to-last, so those bound it too
        second = sharded and not run_start and (index == L - 2 or spec.is_moe_layer(index + 2) != moe)
        penultimate = sharded and not run_end and (index == 1 or spec.is_moe_layer(index - 2) != moe)
        if run_start or run_end or second or penultimate:
            if not sharded:
                # the MLP's backward (it runs first) with the whole layer saved, then attention's, once the MLP's
                # saved tensors are freed and its gradients made
                moments.append(Moment(Phase.BACKWARD, W, Bb + maximum(G_acc, G), O, shared + remaining + recompute[moe],
                                      0, mlp_transient))
                attention_left = attention if setup.grad_ckpt else attention - kept[moe]
                moments.append(Moment(Phase.BACKWARD, W, Bb + maximum(G_acc, G + grads[moe]), O,
                                      shared + remaining + attention_left, 0, attention_transient))
            else:
                unit = gathered.layer(index)
                weights = W + gathered.weights_during(index)
                waiting = Bb + G + gathered.retained_reduce_buffer(index)
                moments.append(Moment(Phase.BACKWARD, weights, waiting + G_acc, O,
                                      shared + remaining + recompute[moe], 0, transient))
                # the MLP's backward ending: the layer's gradients (the MLP's are most of them) wait beside what
                # its attention block still holds (recomputed under checkpointing, beside the checkpoint) and the
                # MLP's last backward transients (MoE: the experts' [T·K, 2·I_m] gradients)
                mlp_done = attention if setup.grad_ckpt else attention - kept[moe]
                moments.append(Moment(Phase.BACKWARD, weights, waiting + maximum(G_acc, unit.grads), O,
                                      shared + remaining + mlp_done, 0, maximum(layer_end, transient)))
        remaining -= kept[moe]
        G += grads[moe]
    return moments


def _embedding_backward_bytes(spec: ModelSpec, resolved: ResolvedSetup, tokens: int) -> int:
    """embedding_dense_backward: the gradient of the embedding output [T, h] in, a [V, h] gradient out; when tied,
    it is added into lm_head's existing gradient, so the new one is a transient."""
    if resolved.setup.method is not Method.FULL:
        return 0
    dt = activations.dtypes(spec, resolved)
    grad_in = dt.r * tokens * spec.hidden_size
    # tied: autograd's input buffer adds the embedding's new gradient to lm_head's, out of place
    new_grads = 2 * dt.r * spec.vocab_size * spec.hidden_size if spec.tie_word_embeddings else 0
    return grad_in + new_grads
