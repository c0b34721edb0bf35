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
from .model import ModelSpec
from .options import Method, Phase, Term
from .profiles import runtime_profile
from .terms import activations, distributed, logits, optimizer, parameters, runtime, temporaries
from .terms.gradients import gradient_bytes, layer_gradient_bytes
from .terms.weights import weight_bytes
from .training_setup import ResolvedSetup, resolve_setup


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
    terms[Term.RUNTIME_OVERHEAD] = runtime.runtime_overhead_bytes(profile, device, setup.num_gpus, paged_bytes)
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
        **details,
    }
    return MemoryBreakdown(spec.name, terms, phase, inputs, source, device, resolved.warnings, details)


def step_moments(spec: ModelSpec, resolved: ResolvedSetup, batch_size=None, seq_len=None) -> list[Moment]:
    """Every moment of the step at which the peak can fall (see the module docstring).

    ``batch_size`` and ``seq_len`` override the setup's and may be numpy arrays of one shape: every byte count is
    then an array over those batch shapes (``sweep`` evaluates many setups at once this way).
    """
    setup = resolved.setup
    b = setup.batch_size if batch_size is None else batch_size
    s = setup.padded_seq_len if seq_len is None else seq_len + (setup.padded_seq_len - setup.seq_len)
    T = b * s
    tensors = parameters.stored_tensors(spec, resolved)
    W = weight_bytes(tensors)
    G = gradient_bytes(tensors)
    O = optimizer.optimizer_state_bytes(tensors, setup.optimizer).device_bytes
    W, G, O = distributed.shard_model_states(resolved, W, G, O)
    G_acc = G if setup.grad_accum > 1 else 0
    A = activations.model_saved(spec, resolved).bytes(b, s)
    head_grad = distributed.per_gpu_gradients(resolved, _head_gradient_bytes(spec, resolved, tensors))
    L = logits.logits_bytes(spec, resolved, T, head_grad)
    copies = temporaries.weight_copy_bytes(spec, resolved, tensors)
    dequant = temporaries.dequantized_weight_bytes(spec, resolved, T)
    hidden_grad = spec.hidden_size * T * activations.dtypes(spec, resolved).c
    moments = [
        Moment(Phase.FORWARD, W, G_acc, O, A, L.forward_peak, copies.forward),
        Moment(Phase.BACKWARD_START, W, G_acc, O, A, L.backward_peak, copies.backward_start),
        Moment(Phase.BACKWARD, W, max(G_acc, head_grad), O, A, L.head_backward, copies.backward_start + hidden_grad),
        # the final norm's backward: its input gradient (fused: the loss's grad_input) and fp32 transients
        Moment(Phase.BACKWARD, W, max(G_acc, head_grad), O, A, L.forward_hidden_grad,
               copies.backward_start + (0 if L.forward_hidden_grad else hidden_grad)
               + temporaries.norm_backward_bytes(spec, T)),
    ]
    moments += _layer_backward_moments(spec, resolved, tensors, W, O, G_acc, head_grad, dequant, b, s)
    moments.append(Moment(Phase.BACKWARD_END, W, G, O, 0, 0, _embedding_backward_bytes(spec, resolved, T)))
    moments.append(Moment(Phase.OPTIMIZER_STEP, W, G, O, 0, 0,
                          optimizer.optimizer_step_temporary_bytes(tensors, setup.optimizer)))
    return moments


def _layer_backward_moments(spec, resolved, tensors, W, O, G_acc, head_grad, dequant, b, s) -> list[Moment]:
    """The start of the first and of the last layer of each run of same-kind layers, in backward order.

    At the start of a layer's backward: the gradients of the layers after it (and lm_head's) exist, the kept
    tensors of the layers up to it remain, plus this layer's backward transients and, under checkpointing, its
    recomputed activations. Both sums are linear along a run, so its ends bound it.
    """
    setup = resolved.setup
    transient = temporaries.layer_backward_bytes(spec, resolved, b, s) + dequant
    shared = activations.shared_saved(spec, resolved).bytes(b, s)
    remaining = activations.model_saved(spec, resolved).bytes(b, s) - shared - activations.head_saved(spec, resolved).bytes(b, s)
    kept = {moe: activations.layer_kept(spec, resolved, moe).bytes(b, s) for moe in (False, True)}
    grads = {moe: distributed.per_gpu_gradients(resolved, layer_gradient_bytes(spec, tensors, moe)) for moe in (False, True)}
    recompute = {moe: activations.layer_saved(spec, resolved, moe).bytes(b, s) if setup.grad_ckpt else 0
                 for moe in (False, True)}
    moments = []
    G = head_grad
    L = spec.num_layers
    for index in range(L - 1, -1, -1):
        moe = spec.is_moe_layer(index)
        run_start = index == L - 1 or spec.is_moe_layer(index + 1) != moe
        run_end = index == 0 or spec.is_moe_layer(index - 1) != moe
        if run_start or run_end:
            moments.append(Moment(Phase.BACKWARD, W, max(G_acc, G), O, shared + remaining + recompute[moe], 0, transient))
        remaining -= kept[moe]
        G += grads[moe]
    return moments


def _head_gradient_bytes(spec: ModelSpec, resolved: ResolvedSetup, tensors) -> int:
    """lm_head's weight gradient (the embedding's when tied), produced at the start of backward in full fine-tuning."""
    if resolved.setup.method is not Method.FULL:
        return 0
    kind = "embedding" if spec.tie_word_embeddings else "lm_head"
    head = next(t for t in tensors if t.kind == kind)
    return head.numel * head.bits // 8


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
