"""The step of a model split by ``--device-map auto`` (``terms/device_map.py``), one GPU at a time.

accelerate's hooks run the layers in order, each on its own GPU, so forward and backward visit the GPUs in turn and
only one computes at a time (a naive pipeline, no micro-batch interleaving). Each GPU's moments are the
single-device moments (``estimator._moments``) restricted to what lives there:

- weights, gradients and optimizer states of the tensors placed there (``device_map.gpu_tensors``), each from the
  same term functions as on one GPU;
- the saved activations of its layers (the first layer's extra saved tensors with layer 0), the rotary tables where
  ``rotary_emb`` is, the final norm's where ``norm`` is and lm_head's input where ``lm_head`` is;
- the logits, the loss and lm_head's backward where ``lm_head`` is (GPU 0 when it is tied to the embedding);
- its layers' backward, run ends as on one GPU, with the gradients of its later layers beside;
- the embedding's backward where ``embed_tokens`` is, and its own optimizer step;
- the copies accelerate's hooks make of the rotary tables for each layer on another GPU
  (``device_map.transfer_copies_bytes``), and, under checkpointing, a GPU's first layer's checkpointed input kept
  on the previous GPU (the hook's copy is made inside the checkpointed forward).
The reported peak is the largest GPU's; every GPU's peak is in ``details["device_map_gpus"]``.
"""

from __future__ import annotations

import functools
from dataclasses import replace

from .model import ModelSpec
from .options import Method, Phase, Term
from .terms import activations, adapters, logits, parameters, quantized, states, temporaries
from .terms import device_map as dm
from .step_moment import Moment, layer_setup
from .training_setup import ResolvedSetup
from .units import maximum


def _placement(spec: ModelSpec, resolved: ResolvedSetup) -> dm.Placement:
    setup = resolved.setup
    return dm.placement(spec, setup.precision, dm.method_quant(setup.method, setup.quant), setup.num_gpus)


@functools.lru_cache(maxsize=1024)
def gpu_peaks(spec: ModelSpec, resolved: ResolvedSetup) -> tuple[dm.GpuPeak, ...]:
    """Every GPU's largest moment (see the module docstring)."""
    setup = resolved.setup
    where = _placement(spec, resolved)
    b, s = setup.batch_size, setup.padded_seq_len
    tokens = b * s
    tensors = parameters.stored_tensors(spec, resolved)
    full = states.model_states(spec, tensors, setup.method, setup.optimizer, setup.grad_accum)
    layer = layer_setup(resolved, spec.family)
    dt, ckpt = layer.dtypes, setup.grad_ckpt
    masks = activations.layer_masks(spec, activations.attention_masked(spec, s, resolved.attn_used, False, b))
    masked_any = any(masks)
    kept = [activations.layer_kept(spec, layer, ckpt, spec.is_moe_layer(i), masks[i]).bytes(b, s)
            for i in range(spec.num_layers)]
    recompute = [activations.layer_recomputed(spec, layer, ckpt, spec.is_moe_layer(i), masks[i]).bytes(b, s)
                 for i in range(spec.num_layers)]
    attention_left = [activations.attention_left(spec, layer, ckpt, spec.is_moe_layer(i), masks[i]).bytes(b, s)
                      for i in range(spec.num_layers)]
    shared_saved = activations.shared_saved(spec, dt, layer.attn_used, ckpt, masked_any, layer.layers)
    shared = shared_saved.bytes(b, s)
    head_all = activations.head_saved(spec, layer).bytes(b, s)
    norm_only = activations.head_saved(spec, replace(layer, method=Method.LORA)).bytes(b, s)
    extras = quantized.step_extras(spec, setup, layer, masked_any, b, s, adapters.head_input_shared(layer))
    whole = activations.model_saved(spec, layer, ckpt, masked_any).bytes(b, s) + extras.held
    first_extra = whole - shared - head_all - sum(kept)  # layer 0's extra saved tensors, QLoRA's held extras
    rope_per_position = shared_saved.per_position if not spec.traits.rope_copies_per_layer else 0
    checkpoint_input = activations.residual_bytes(spec, layer) * spec.hidden_size * tokens if ckpt else 0
    lg = logits.logits_bytes(spec, setup.loss, dt, tokens, full.head_gradient, sequences=b, compiled=False,
                             whole_head=setup.method is Method.FULL, fp32_logits=layer.layers.fp32_unembed,
                             keeps_outputs=setup.loop_keeps_outputs)
    copies = temporaries.weight_copy_bytes(spec, dt, setup.method, ckpt, tensors, 1,
                                           activations.first_layer_gradless_linears(spec, layer, masked_any))
    dequant = temporaries.dequantized_weight_bytes(spec, setup.method, setup.double_quant, dt, tokens, setup=setup)
    hidden_grad = temporaries.hidden_grad_bytes(spec, dt, tokens)
    norm_backward = temporaries.norm_backward_bytes(spec, tokens)
    mlp_transient = temporaries.mlp_backward_bytes(spec, dt.c, dt.r, b, s) + dequant
    attention_transient = temporaries.attention_backward_bytes(spec, dt.c, layer.attn_used, b, s) + dequant
    embedding_backward = temporaries.embedding_backward_bytes(spec, setup.method, dt, tokens)
    grads_per_layer = full.layer_gradients
    out = []
    for gpu in range(setup.num_gpus):
        mine = where.layers_on(gpu)
        on = dm.gpu_tensors(spec, tensors, where, gpu)
        # (lm_head's first gradient is the whole model's, taken where lm_head is: ``head_grad``)
        rank = states.model_states(spec, on, Method.LORA, setup.optimizer, setup.grad_accum) if on else None
        W = rank.weights if rank else 0
        O = rank.optimizer_states if rank else 0
        G_all = rank.gradients if rank else 0
        G_acc = rank.accumulated_gradients if rank else 0
        step = rank.optimizer_step if rank else 0
        is_head, is_norm, is_embed = gpu == where.head, gpu == where.norm, gpu == where.embed
        head_grad = full.head_gradient if is_head else 0
        elsewhere = sum(1 for i in mine if where.rotary != gpu)
        transfer = dm.transfer_copies_bytes(rope_per_position, s, elsewhere, bool(ckpt))
        # under checkpointing a GPU's first layer checkpoints the input it received on the previous GPU
        moved_in = checkpoint_input if mine and mine[0] > 0 and where.layers[mine[0] - 1] != gpu else 0
        moved_out = sum(checkpoint_input for i in range(spec.num_layers - 1)
                        if where.layers[i] == gpu and where.layers[i + 1] != gpu)
        per_layer = {i: kept[i] + (first_extra if i == 0 else 0) + (transfer // len(mine) if elsewhere else 0)
                     for i in mine}
        A_layers = sum(per_layer.values()) - moved_in + moved_out
        A_shared = shared if gpu == where.rotary else 0
        A_head = (norm_only if is_norm else 0) + (head_all - norm_only if is_head else 0)
        A = A_layers + A_shared + A_head
        moments = [Moment(Phase.FORWARD, W, G_acc, O, A, lg.forward_peak if is_head else 0,
                          copies.forward if is_head else 0)]
        if is_head:
            moments += [
                Moment(Phase.BACKWARD_START, W, G_acc, O, A, lg.backward_peak, copies.backward_start),
                Moment(Phase.BACKWARD, W, maximum(G_acc, head_grad), O, A, lg.head_backward,
                       copies.backward_start + hidden_grad),
            ]
        if is_norm:
            moments.append(Moment(Phase.BACKWARD, W, maximum(G_acc, head_grad), O, A,
                                  (lg.forward_hidden_grad + lg.held) if is_head else 0, hidden_grad + norm_backward))
        left, G_here = A_layers + A_shared, head_grad
        for i in reversed(mine):
            g_layer = grads_per_layer[spec.is_moe_layer(i)]
            moments.append(Moment(Phase.BACKWARD, W, maximum(G_acc, G_here), O, left + recompute[i], 0,
                                  mlp_transient))
            moments.append(Moment(Phase.BACKWARD, W, maximum(G_acc, G_here + g_layer), O,
                                  left - per_layer[i] + attention_left[i], 0, attention_transient))
            left -= per_layer[i]
            G_here += g_layer
        if is_embed:
            moments.append(Moment(Phase.BACKWARD_END, W, G_all, O, 0, 0, embedding_backward))
        moments.append(Moment(Phase.OPTIMIZER_STEP, W, G_all, O, 0, 0, step))
        peak = max(moments, key=lambda m: m.tensor_bytes)
        terms = ((Term.WEIGHTS, peak.weights), (Term.GRADIENTS, peak.gradients),
                 (Term.OPTIMIZER_STATES, peak.optimizer_states), (Term.ACTIVATIONS, peak.activations),
                 (Term.LOGITS, peak.logits), (Term.TEMPORARIES, peak.temporaries))
        out.append(dm.GpuPeak(gpu, mine, peak.phase.value, terms, transfer if peak.activations else 0))
    return tuple(out)


def device_map_details(spec: ModelSpec, resolved: ResolvedSetup) -> dict:
    """Where each part sits and every GPU's peak (``details["device_map_gpus"]``)."""
    where = _placement(spec, resolved)
    return {
        # accelerate's balanced share (total/n + 1.25 x the largest module) can leave the last GPUs without a layer
        "device_map_empty_gpus": [g for g in range(resolved.setup.num_gpus) if g not in where.gpus_used()],
        "device_map_placement": {"embed_tokens": where.embed, "norm": where.norm, "rotary_emb": where.rotary,
                                 "lm_head": where.head,
                                 "layers": [list(peak.layers) for peak in gpu_peaks(spec, resolved)]},
        "device_map_gpus": [{"gpu": peak.gpu, "layers": len(peak.layers), "phase": peak.phase,
                             "peak_tensor_bytes": peak.tensor_bytes, "transfer_bytes": peak.transfer_bytes,
                             **{term.value: value for term, value in peak.terms}}
                            for peak in gpu_peaks(spec, resolved)],
    }
