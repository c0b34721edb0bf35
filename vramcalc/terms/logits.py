"""logits: lm_head's output and the loss's buffers, often the largest term. T tokens, V vocabulary, c compute bytes.

``hf`` (transformers v5 ``loss/loss_utils.py::ForCausalLMLoss``): lm_head writes [T, V] in c; ``logits.float()``
  copies it to fp32 (no copy when already fp32); ``cross_entropy`` = log_softmax (saves its fp32 output) + nll_loss.
  Forward peak (c + 4 + 4)·T·V; accelerate's ``convert_outputs_to_fp32`` then copies the 16-bit logits to fp32 while
  they and the saved log_softmax live, again (c + 4 + 4)·T·V. After forward only the saved 4·T·V remains (Trainer
  drops ``outputs``). Backward peak 12·T·V: the saved log_softmax, nll_loss's [T, V] gradient and log_softmax's
  gradient. Gemma-2's final soft-cap (``logits / cap -> tanh -> * cap``) keeps the tanh output (c·T·V) and adds a
  [T, V] step in forward. Then lm_head's backward holds the c·T·V logits gradient beside its weight gradient.
``hf-shifted`` (transformers 4.46-4.49 ``loss/loss_utils.py::ForCausalLMLoss``, read in the 4.46.0 and 4.48.0 wheels):
  ``logits.float()`` then ``shift_logits = logits[..., :-1, :].contiguous()``, a second fp32 [T, V] copy, before the
  cross-entropy; 4.50.0 pads the labels instead and shifts no logits. With T' = b·(s - 1) shifted rows: forward peak
  (c + 4)·T·V + 8·T'·V (the model's c logits, their fp32 copy, the shifted copy and the log_softmax); saved 4·T'·V;
  backward 12·T'·V (slice's backward, 4·T'·V + 4·T·V, stays below it); the copies die with the loss function.
``hf-fp32-logits`` (transformers 4.31-4.45, read in the 4.31.0, 4.36.2, 4.40.2, 4.44.2 and 4.45.2 wheels'
  ``modeling_llama.py``: ``logits = self.lm_head(hidden_states)``, soft-capped in Gemma-2, then ``logits =
  logits.float()``, then ``shift_logits = logits[..., :-1, :].contiguous()`` for a plain ``CrossEntropyLoss``): the
  16-bit logits die at the cast (nothing saves them), the model returns the fp32 ones, which accelerate's
  ``convert_outputs_to_fp32`` leaves as they are. Forward peak max((c + 4)·T, 4·T + 4·(T' + copy))·V (the cast; the
  fp32 logits, the shifted copy, which a single sequence's slice needs none of, and the log_softmax); saved
  4·T'·V; backward 12·T'·V as ``hf-shifted``.
``chunked`` (torchtune ``CEWithChunkedOutputLoss``, 8 chunks of C = T/8 tokens): the saved log_softmax still adds up to
  4·T·V, but the c and fp32 copies, and in backward the two [C, V] gradients, exist one chunk at a time. When lm_head
  trains, each chunk's backward makes a full [V, h] weight gradient and autograd's input buffer sums them out of
  place (``torch/csrc/autograd/input_buffer.cpp``): three [V, h] gradients at once, two chunks in. An fp32 head under
  16-bit autocast is multiplied as autocast's one cached c copy (``cached_cast`` keeps a leaf that requires grad), so
  the chunks' gradients are c·V·h and are summed in the input buffer of the cast's ``ToCopyBackward``, which turns the
  sum into the fp32 .grad only after the last chunk: max(3·c, c + 4)·V·h, not 3·4·V·h (traced: olmo-2-0425-1b full
  mixed-bf16, ``tracing/losses.py::chunked_cross_entropy``). The logits' gradient of a chunk is released when its
  mm's backward returns, before the sum; lm_head's input gradients of the two chunks wait in the split's input
  buffer (2·c·C·h). lm_head has no backward of its own after the loss's: it ran inside each chunk.
``torchtune`` (torchtune 0.6 recipes, ``lora_finetune_single_device.py:639-661``): the model's ``chunked_output``
  returns the 8 chunks of c logits as a list (``modules/transformer.py``) that ``_loss_step`` holds until the loss is
  computed (``del logits`` after ``self._loss_fn``); ``CEWithChunkedOutputLoss`` upcasts one chunk at a time and its
  log_softmax saves fp32. Forward peak: ``chunked``'s saved tensors + all c·T·V chunk logits + one fp32 chunk (the c
  chunk's own share is already in the list); backward as ``chunked`` (the list is gone) until lm_head's backward:
  lm_head ran on every chunk before the loss, so every chunk's loss backward (later in forward, so first in
  autograd's order) runs before any lm_head backward, leaving the n chunks' c·C·V gradients (c·T·V) buffered; when
  lm_head trains, its weight gradients are then summed out of place from the second chunk on: 3 [V, h] gradients
  beside the n - 2 chunk gradients not yet consumed (traced, ``tracing/stacks/torchtune.py``).
``litgpt`` (litgpt 0.5 ``finetune/lora.py:355-359``, ``utils.py::chunked_cross_entropy``): lm_head runs on chunks of
  128 positions (C = 128·b tokens); Fabric's precision plugin converts the outputs to the default dtype, fp32
  (``lightning/fabric/wrappers.py`` ``convert_output``), and ``fit`` keeps that list in ``logits`` through
  ``fabric.backward``. Each chunk's ``cross_entropy`` saves its fp32 log_softmax. Forward peak 8·T·V (the fp32 list
  and the saved log_softmax; the conversion itself holds (c + 4)·T·V); backward start 8·T·V + 8·C·V (one chunk's two
  fp32 gradients). ``fit`` rebinds ``logits`` only when the next micro-batch's model call returns, so the fp32 list
  stays through the decoder layers' backward, ``optimizer.step()`` and that next forward too (``held``; the next
  forward's own output at the rebinding is ``output``, (c + 4)·T·V). The loss's and the casts' backward (made
  after every lm_head chunk in forward, so first in autograd's order) all run before lm_head's: its backward sees the
  fp32 list and every chunk's c gradient, (4 + c)·T·V.
  Full fine-tuning (``whole_head``; litgpt ``finetune/full.py:282-285`` calls ``model(input_ids)`` without
  ``lm_head_chunk_size``): one [b, s, V] logits tensor, converted to fp32 (4·T·V, held through backward) and sliced
  ``logits[..., :-1, :]``; ``chunked_cross_entropy`` (``utils.py:334-345``) reshapes it to [-1, V], which copies when
  b > 1 (the slice is not viewable: 4·T·V more until the loss's forward ends), splits it into 128-row chunks and saves
  each chunk's fp32 log_softmax. Forward peak 8·T·V, 12·T·V when b > 1. In backward the split's gradient is the
  ``cat`` of every chunk's fp32 gradient, made while they are all buffered: 12·T·V (held, buffered, cat); lm_head's
  backward holds the fp32 logits and the c·T·V gradient of Fabric's cast.
``torchtune-2024`` (torchtune's recipes of April to July 2024, e.g. ``lora_finetune_single_device.py@0217d44c2:
  460-469``; ``modules/transformer.py`` returns ``self.output(h).float()``): the recipe rebinds ``logits`` to
  ``logits[..., :-1, :].contiguous()``, an fp32 copy of T' = b·(s - 1) rows (the model's fp32 output then dies),
  transposes it and calls a plain ``CrossEntropyLoss``, whose log_softmax saves its fp32 output. Nothing deletes
  ``logits`` before ``loss.backward()``, so the copy (``held``, 4·T'·V) lives through backward, the optimizer step and
  the next forward until the next model call returns (``del logits`` came with torchtune #1046, 2024-06-04, in
  lora_finetune_distributed and #1235, 2024-07-28, elsewhere: "free logits otherwise it peaks backward memory").
  Forward peak max((c + 4)·T, 4·T + 4·T')·V (the model's cast; its output beside the copy); backward start
  16·T'·V (the copy, the saved log_softmax, nll_loss's gradient and log_softmax's); lm_head's backward sees the copy
  and the cast's c gradient, 4·T'·V + c·T·V; the next model call ends with its own (c + 4)·T·V beside the copy.
``hf-loop`` (transformers' examples/pytorch/language-modeling/run_clm_no_trainer.py and the other ``*_no_trainer``
  scripts: ``outputs = model(**batch); loss = outputs.loss; accelerator.backward(loss)``, then ``optimizer.step()``):
  ``hf``'s loss, but the loop keeps ``outputs`` bound until the next ``model(**batch)`` returns, so its logits
  (``held``) stay through backward, the optimizer step and the next forward. Under mixed precision accelerate's
  wrapped forward returns them converted to fp32 (``convert_outputs_to_fp32``: 4·T·V; the c logits die with the
  conversion); otherwise they are lm_head's own c·T·V. Every ``hf`` moment gains ``held``; the next model call ends
  with its own loss's forward peak (``output``) beside it. Without gradient checkpointing the model also runs with
  its config's ``use_cache`` (True for most models), so ``outputs.past_key_values`` keeps every layer's keys and
  values (transformers' ``DynamicCache``, 2·b·s·k·d·c bytes a layer: ``activations.kv_cache``): an activation
  term of the estimator, each layer's copies staying after its attention's backward frees its own, then all L
  layers' through the optimizer step and the next forward (``estimator._kv_cache_bytes``); under checkpointing
  transformers turns the cache off (``GradientCheckpointingLayer``, ``modeling_layers.py``).
``unsloth-2024`` (Unsloth 2024.1 to 2024.11.7, read in the 2024.8, 2024.9, 2024.10.7 and 2024.11.6 wheels and at the
  repository's 2024-01 and July-2024 commits; ``unsloth/models/llama.py:959-986`` and ``kernels/cross_entropy_loss.py:
  262-347`` @October-2024 c05e87f18d, the same lines in the 2024.10.7 wheel): ``CausalLM_fast_forward`` runs lm_head on
  every token, ``logits = self.lm_head(hidden_states.to(lm_head.dtype))``, c bytes (``logits.to(config.torch_dtype)``
  is no copy, or a same-size one whose source dies at once where the checkpoint's config names the other 16-bit
  dtype: transformers 4.44 leaves ``config.torch_dtype`` as the checkpoint says; a float32 config, not modelled,
  would save 4·T·V with the same forward peak), and hands the whole [T, V]
  tensor, unshifted, to ``fast_cross_entropy_loss`` with ``shift_labels = torch.hstack((labels[..., 1:], -100
  column))`` (int64 [b, s]). Nothing upcasts it: the Triton kernel casts each row to fp32 in registers.
  ``Fast_CrossEntropyLoss.forward`` allocates ``losses`` [T] fp32 and ``logsumexp`` [T] fp32 ([T, n] for V > 65536,
  n = ceil(V / 65536) chunks, then ``torch.logsumexp(dim=1)`` to [T]) and saves ``(logits, logsumexp, labels)``; its
  backward's kernel stores ``dloss * y`` into ``logits_ptr`` and returns ``logits``: the gradient is the logits'
  own storage, no new [T, V] tensor. Gemma-2's final soft-cap and Cohere's logit scale are applied inside both kernels
  (``DO_SOFTCAPPING``, ``DO_LOGIT_SCALING``): no [T, V] copy for them. The model returns the same logits; under
  autocast accelerate's ``convert_outputs_to_fp32`` copies them to fp32 (4·T·V) while they stay saved, dropped with
  ``outputs``. Forward peak (c + 4)·T·V under autocast (c·T·V otherwise); saved c·T·V + 4·T + labels; backward
  start the same (the kernel allocates nothing); lm_head's backward reads the gradient from that storage (c·T·V),
  which dies when it returns. The backward requests no [rows, V] block, so nothing strands beside it; under varying
  lengths a longer step's fp32 copy fits in no cached block: K(T) = 4·T·V (``ladder_bytes``).
  From 2024.11.8 ``CausalLM_fast_forward`` calls cut-cross-entropy's ``fused_linear_cross_entropy`` instead where
  ``HAS_CUT_CROSS_ENTROPY`` (``unsloth_zoo/loss_utils.py``: torch >= 2.4 and ``cut_cross_entropy`` importable;
  ``llama.py:983-1003`` of the 2024.11.8 wheel): ``fused``.
Compiled (``compile``, with ``hf`` or ``torchtune``; torchtune's ``training.compile_loss`` compiles its loss): AOTAutograd with inductor's decompositions
  (``torch._inductor.decomposition.select_decomp_table``) and the min-cut partitioner keep the cross-entropy's 16-bit
  input and two fp32 values per row (its amax and log-sum-exp), not the fp32 log_softmax: checked by running
  ``functorch.compile.aot_function(lambda x, y: cross_entropy(x.float(), y), partition_fn=
  min_cut_rematerialization_partition, decompositions=select_decomp_table())`` on a bf16 [T, V] input, whose forward
  graph returns ``primals_1`` (the bf16 logits), ``amax`` and ``log`` ([T, 1] fp32) for backward. The fused kernels
  write no fp32 [T, V] copy. Saved c·T·V + 8·T + labels; forward adds accelerate's fp32 copy of the outputs (hf under
  autocast); backward adds the c logits gradient (hf: c·T·V; torchtune: one chunk's c·C·V).
Loss parallel (``hf`` under ``--tp-plan torchtitan``: torchtitan 9dec370 ``train.py`` runs the loss inside
  ``loss_parallel()``, its output layer's logits ``Shard(-1)``): each rank's [T, V'] slice, V' = ceil(V/T) (the
  model's ``vocab_size`` here is the rank's, ``tensor_parallel.rank_spec``), through DTensor's handlers (torch
  ``distributed/tensor/parallel/loss.py``, the same in torch 2.6 and 2.13): ``_log_softmax`` decomposes
  ``torch._decomp``'s log_softmax with all-reduces (``shifted = x - max``, ``exp(shifted)`` summed, ``result =
  shifted - log(sumexp)``), so beside the c logits and their fp32 copy it holds two fp32 [T, V'] at once, shifted
  with exp(shifted) and then with the result: forward peak (c + 4 + 8)·T·V'; it saves the fp32 result, 4·T·V'.
  Backward runs ``_nll_loss_and_log_softmax_backward`` (the nll_loss backward handler; log_softmax's handler does no
  work): ``grad_input = zeros_like(x)``, then ``(grad_input + exp(x)) * grad_output``: the saved result, the zeros,
  exp(x) and the sum at once, 16·T·V'; then the fp32 gradient and lm_head's c copy of it.
``fused`` (Liger ``LigerFusedLinearCrossEntropyFunction``): no [T, V] tensor. Forward allocates ``grad_input`` [T, h]
  and ``loss_1d`` [T] fp32, and one chunk of next_pow2(ceil(T / ceil(V / h))) tokens of logits at a time; the
  lm_head weight gradient, when it trains, is allocated in forward too (it is counted as a gradient).
Labels: transformers pads and shifts them to an int64 [T] tensor kept for nll_loss (8·T).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..facts import (CHUNKED_LOSS_CHUNKS, LITGPT_LM_HEAD_CHUNK_POSITIONS, UNSLOTH_CE_MAX_FUSED_SIZE,
                     fused_chunk_tokens)
from ..model import ModelSpec
from ..options import Loss
from ..units import DType, maximum, minimum, select
from .activations import Dtypes

_F32 = DType.FP32.bytes  # bytes of an fp32 element
LABEL_BYTES = DType.INT64.bytes  # int64 labels


@dataclass(frozen=True)
class LogitsBytes:
    forward_peak: int  # inside the loss, in forward
    saved: int  # kept from the end of forward into backward
    backward_peak: int  # at the start of backward
    head_backward: int  # while lm_head's backward runs: the gradient of its output
    forward_hidden_grad: int = 0  # fused: grad_input, alive from forward to backward (part of ``saved``)
    held: int = 0  # kept by the training loop after the loss's backward: through the layers' backward and the step
    output: int = 0  # the model call's own output at its end, before the loss (the moment the loop rebinds ``held``)
    request: object = None  # the last [rows, V] gradient the backward requests, where not ``backward_request``'s rule
    # whether the backward's [rows, V] gradients outgrow every block the loss's forward freed, so those stay cached
    # beside them (``runtime.stranded_head_bytes``); False where they fit (``_model_dtype_loss_bytes``)
    head_strands: object = True
    # the forward's peak inside the model's own forward, where its final hidden states are still bound
    # (``activations.loss_hidden_bytes``): below ``forward_peak`` where accelerate's fp32 copy of the returned logits
    # peaks after the call; None: the same moment
    forward_inside: object = None

    @property
    def forward_in_model(self):
        """``forward_inside``, or ``forward_peak`` where the forward's peak is inside the model's call."""
        return self.forward_peak if self.forward_inside is None else self.forward_inside

    @property
    def backward_request(self):
        """X of ``runtime.step_reserved_bytes``: the last [rows, V] gradient the loss's backward requests. Unless
        given (``request``), half of what its backward peak adds to the saved tensors: nll_loss's gradient and
        log_softmax's, of one size (0 for a loss whose backward makes none, ``fused``)."""
        if self.request is not None:
            return self.request
        return (self.backward_peak - self.saved) // 2


def logits_bytes(model: ModelSpec, loss: Loss, dt: Dtypes, tokens, head_grad_bytes: int = 0,
                 sequences=1, compiled: bool = False, whole_head: bool = False,
                 fp32_logits: bool = False, head_cast_grad_bytes: int = 0, keeps_outputs: bool = False,
                 loss_parallel: bool = False) -> LogitsBytes:
    """The logits' and the loss's bytes at each moment, for ``tokens`` T (an int or a numpy array) and the model's V,
    h and final soft-cap; ``dt.c`` the compute bytes; ``dt.autocast`` (every precision but fp32) adds accelerate's
    fp32 copy of the outputs; ``head_grad_bytes`` lm_head's weight gradient when it trains (0 otherwise);
    ``sequences`` the micro-batch (litgpt chunks lm_head by positions, so a chunk holds 128 of each); ``whole_head``
    litgpt's full fine-tuning, whose lm_head is not chunked; ``fp32_logits`` a model that returns fp32 logits itself
    (torchtune's unembed), which a compiled ``hf`` loss then saves; ``head_cast_grad_bytes`` the c gradient of
    autocast's copy of an fp32 trained head (``temporaries.head_grad_cast_bytes``), which ``chunked`` sums;
    ``keeps_outputs`` a loop that keeps the model call's ``outputs`` (``--loop-keeps-outputs``; ``hf-loop`` is ``hf``
    with it); ``loss_parallel`` the ``hf`` loss on a rank's vocabulary slice under DTensor's loss parallelism
    (``--tp-plan torchtitan``, ``model`` the rank's). Formulas and sources per loss: the module docstring."""
    if loss_parallel:
        return _loss_parallel_bytes(dt.c, dt.autocast, tokens, model.vocab_size, LABEL_BYTES * tokens)
    if loss is Loss.HF_LOOP or (keeps_outputs and loss.in_model):  # plus the logits ``outputs`` keeps (``hf-loop``)
        inner = Loss.HF if loss is Loss.HF_LOOP else loss
        base = logits_bytes(model, inner, dt, tokens, head_grad_bytes, sequences, compiled, whole_head, fp32_logits)
        # the returned logits: accelerate's fp32 conversion under autocast, else lm_head's own or the model's fp32
        returned = _F32 if dt.autocast or inner is Loss.HF_FP32_LOGITS else dt.c
        held = returned * tokens * model.vocab_size
        return LogitsBytes(base.forward_peak, base.saved + held, base.backward_peak + held, base.head_backward + held,
                           held=held, output=base.forward_peak, request=base.request, head_strands=base.head_strands,
                           forward_inside=base.forward_inside)
    V = model.vocab_size
    c = dt.c
    upcast = 0 if c == _F32 else _F32
    softcap = model.traits.logit_softcap
    accelerate_copy = dt.autocast  # convert_outputs_to_fp32 runs under every autocast precision
    labels = LABEL_BYTES * tokens
    if loss is Loss.UNSLOTH_2024:  # its own Triton kernel, ``@torch._disable_dynamo``: never compiled
        return unsloth_2024_loss_bytes(c, dt.autocast, tokens, V)
    if compiled and loss.in_model and fp32_logits and c != _F32:
        # torchtune: ``self.output(h).float()`` runs eagerly, the compiled cross-entropy saves its fp32 input; backward
        # makes its fp32 gradient, then the cast's backward the c one for lm_head
        saved = _F32 * tokens * V + 2 * _F32 * tokens + labels
        forward = maximum(saved, (c + _F32) * tokens * V + labels)
        return LogitsBytes(forward, saved, saved + _F32 * tokens * V, c * tokens * V + labels)
    if compiled and (loss.in_model or loss is Loss.TORCHTUNE) and not softcap:
        return _compiled_logits_bytes(loss, c, accelerate_copy, tokens, V, labels, head_grad_bytes)
    if loss is Loss.HF_SHIFTED:  # T' = b·(s - 1) shifted rows beside the model's T
        shifted = tokens - sequences
        copied = select(sequences > 1, shifted, 0)  # ``.contiguous()`` copies the slice only for a batch of 2 or more
        model_out = (2 * c if softcap else c) * tokens * V
        saved = _F32 * shifted * V + (c * tokens * V if softcap else 0) + labels
        inside = model_out + upcast * tokens * V + _F32 * (shifted + copied) * V + labels
        forward = maximum(inside, model_out + _F32 * shifted * V + (_F32 * tokens * V if accelerate_copy else 0)
                          + labels)
        return LogitsBytes(forward, saved, saved + 2 * _F32 * shifted * V, c * tokens * V + labels,
                           forward_inside=inside)
    if loss is Loss.HF_FP32_LOGITS:  # the model's fp32 logits; T' = b·(s - 1) shifted rows
        shifted = tokens - sequences
        copied = select(sequences > 1, shifted, 0)  # ``.contiguous()`` copies the slice only for a batch of 2 or more
        capped = c * tokens * V if softcap else 0  # Gemma-2's tanh output, saved by its backward
        saved = _F32 * shifted * V + capped + labels
        forward = maximum((c + upcast) * tokens * V, _F32 * (tokens + copied + shifted) * V) + capped + labels
        return LogitsBytes(forward, saved, saved + 2 * _F32 * shifted * V, c * tokens * V + labels)
    if loss is Loss.MODEL_DTYPE or (loss is Loss.HF and not model.traits.loss_upcasts):
        return _model_dtype_loss_bytes(c, dt.autocast, tokens, sequences, V, labels, softcap)
    if loss is Loss.HF:
        saved = (_F32 + (c if softcap else 0)) * tokens * V + labels
        chain = (2 * c if softcap else c) + upcast + _F32
        after = (2 * c if softcap else c) + _F32 + (_F32 if accelerate_copy else 0)
        forward = max(chain, after) * tokens * V + labels
        backward = (3 * _F32 + (c if softcap else 0)) * tokens * V + labels
        return LogitsBytes(forward, saved, backward, c * tokens * V + labels,
                           forward_inside=chain * tokens * V + labels)
    if loss in (Loss.CHUNKED, Loss.TORCHTUNE):
        chunk = -(-tokens // CHUNKED_LOSS_CHUNKS)
        saved = (_F32 + (c if softcap else 0)) * tokens * V + labels
        forward = saved + ((2 * c if softcap else c) + upcast) * chunk * V
        if loss is Loss.TORCHTUNE:  # the recipe's list of every chunk's c logits, alive through the loss
            forward = saved + c * tokens * V + upcast * chunk * V
        backward = saved + 2 * _F32 * chunk * V
        if loss is Loss.TORCHTUNE:
            if head_grad_bytes:
                backward = maximum(backward, 3 * head_grad_bytes + (CHUNKED_LOSS_CHUNKS - 2) * c * chunk * V + labels)
            return LogitsBytes(forward, saved, backward, c * tokens * V + labels)
        if head_grad_bytes:  # two chunks in: the rest's log_softmax, the head's gradients, two chunks' input grads
            remaining = _F32 * tokens * V * (CHUNKED_LOSS_CHUNKS - 2) // CHUNKED_LOSS_CHUNKS + labels
            summed = head_cast_grad_bytes or head_grad_bytes  # the chunks' gradients, as the input buffer sums them
            backward = maximum(backward, remaining + maximum(3 * summed, summed + head_grad_bytes)
                               + 2 * c * chunk * model.hidden_size)
        # lm_head ran inside each chunk: once the loss's backward is done, so is lm_head's (the labels are left)
        return LogitsBytes(forward, saved, backward, labels)
    if loss is Loss.TORCHTUNE_2024:
        shifted = tokens - sequences  # b·(s - 1) rows after ``logits[..., :-1, :]``
        held = _F32 * shifted * V  # the recipe's shifted fp32 copy, bound to ``logits`` until the next model call ends
        saved = held + _F32 * shifted * V + labels
        output = (c + upcast) * tokens * V + labels  # lm_head's c logits and the model's ``.float()`` of them
        forward = maximum(output, _F32 * tokens * V + held + labels)  # the model's fp32 output beside its copy
        return LogitsBytes(forward, saved, held + 3 * _F32 * shifted * V + labels, held + c * tokens * V + labels,
                           held=held, output=output)
    if loss is Loss.LITGPT:
        held = _F32 * tokens * V  # the fp32 logits list fit() keeps through backward
        saved = held + _F32 * tokens * V + labels
        output = (c + _F32) * tokens * V + labels  # the model's c logits and Fabric's fp32 copies of them
        if whole_head:
            reshape_copy = select(sequences > 1, _F32 * tokens * V, 0)  # [b, s-1, V] -> [-1, V] copies when b > 1
            forward = maximum(saved + reshape_copy, output)
            return LogitsBytes(forward, saved, held + 2 * _F32 * tokens * V + labels, held + c * tokens * V + labels,
                               held=held, output=output, request=_F32 * tokens * V)
        chunk = minimum(tokens, LITGPT_LM_HEAD_CHUNK_POSITIONS * sequences)
        forward = maximum(saved, output)
        backward = saved + 2 * _F32 * chunk * V
        # every chunk's loss backward and Fabric's casts run before any lm_head backward (made later in forward):
        # lm_head's backward sees the fp32 list and every chunk's c gradient (traced, tracing/stacks/litgpt.py)
        return LogitsBytes(forward, saved, backward, held + c * tokens * V + labels, held=held, output=output)
    chunk = fused_chunk_tokens(tokens, V, model.hidden_size)
    hidden_bytes = max(dt.norm_out, dt.r)
    grad_input = hidden_bytes * tokens * model.hidden_size
    saved = grad_input + _F32 * tokens + labels
    forward = saved + c * chunk * V + hidden_bytes * chunk * model.hidden_size
    return LogitsBytes(forward, saved, saved, saved, forward_hidden_grad=grad_input)



def unsloth_2024_logits_bytes(c: int, tokens, V: int):
    """Unsloth <= 2024.11.7's logits, c·T·V: ``logits = self.lm_head(hidden_states.to(lm_head.dtype))`` on all T
    tokens in the compute dtype (``unsloth/models/llama.py:959`` @October-2024; ``logits.to(torch_dtype)`` at :964
    keeps 2 bytes an element for a 16-bit config), saved whole by ``Fast_CrossEntropyLoss``
    (``ctx.save_for_backward(logits, logsumexp, labels)``, ``kernels/cross_entropy_loss.py:317``) and overwritten
    with their own gradient by ``_cross_entropy_backward`` (``tl.store(logits_ptr + col_offsets, dloss * y)``, :256;
    ``return logits``, :347): alive from lm_head's forward to the end of lm_head's backward, the loss's only [T, V]
    tensor."""
    return c * tokens * V


def unsloth_2024_row_bytes(tokens, V: int):
    """``Fast_CrossEntropyLoss``'s per-row fp32 tensors (``kernels/cross_entropy_loss.py:269-312`` @October-2024):
    ``losses`` [T] (4·T, forward only: ``loss.sum() / n_items`` saves nothing of it) and ``logsumexp`` [T] (4·T,
    saved), for V > 65536 first a [T, n] chunked one (n = ceil(V / 65536), :294) that ``torch.logsumexp(dim=1)``
    (:312) reduces beside it. Returns (saved, forward peak beside the logits and labels): (4·T, 4·T + 4·T +
    (4·n·T when n > 1))."""
    chunks = -(-V // UNSLOTH_CE_MAX_FUSED_SIZE)
    saved = _F32 * tokens
    return saved, _F32 * tokens + saved + (_F32 * chunks * tokens if chunks > 1 else 0)


def unsloth_2024_labels_bytes(tokens):
    """``shift_labels = torch.hstack((labels[..., 1:], self.extra_ignored_labels[:labels.shape[0]]))``
    (``unsloth/models/llama.py:979`` @October-2024): a new int64 [b, s] tensor, 8·T, saved by the loss as
    ``labels.view(-1)``."""
    return LABEL_BYTES * tokens


def unsloth_2024_returned_copy_bytes(c: int, autocast: bool, tokens, V: int):
    """accelerate's ``convert_outputs_to_fp32`` on the model's return under mixed precision: ``outputs.logits`` is the
    very tensor the loss saved (``CausalLMOutputWithPast(logits=logits)``, ``unsloth/models/llama.py`` after :986
    @October-2024; Unsloth 2024.x does not unwrap accelerate's forward), copied to fp32 beside it, 4·T·V, until
    Trainer drops ``outputs``; none without autocast or for fp32 logits."""
    return _F32 * tokens * V if autocast and c != _F32 else 0


def unsloth_2024_loss_bytes(c: int, autocast: bool, tokens, V: int) -> LogitsBytes:
    """``--loss unsloth-2024`` (module docstring): the c logits (``unsloth_2024_logits_bytes``), the kernel's row
    tensors (``unsloth_2024_row_bytes``), the shifted labels (``unsloth_2024_labels_bytes``) and accelerate's fp32
    copy of the returned logits (``unsloth_2024_returned_copy_bytes``). Forward inside the model: logits + labels +
    the row tensors; forward peak at the model's return: logits + labels + logsumexp + the fp32 copy; saved = backward
    start = logits + labels + logsumexp (the gradient is written into the logits); lm_head's backward: that storage.
    No [rows, V] request in backward (``request`` 0, nothing strands beside it)."""
    logits = unsloth_2024_logits_bytes(c, tokens, V)
    lse, rows = unsloth_2024_row_bytes(tokens, V)
    labels = unsloth_2024_labels_bytes(tokens)
    saved = logits + lse + labels
    inside = logits + labels + rows
    forward = maximum(inside, saved + unsloth_2024_returned_copy_bytes(c, autocast, tokens, V))
    return LogitsBytes(forward, saved, saved, logits + labels, request=0, head_strands=False, forward_inside=inside)


def ladder_bytes(loss: Loss, c: int, autocast: bool, tokens, V: int, backward_start_logits):
    """K(T), what a step longer than every earlier one (a record) leaves cached
    (``estimator.reserved_growth_per_longer_step``): the [rows, V] blocks the loss's backward starts with
    (``backward_start_logits``, the backward-start moment's logits term), unless a forward block is larger.

    That is ``--loss unsloth-2024`` under autocast: its [T, V] requests are the c logits and accelerate's fp32 copy
    (``unsloth_2024_returned_copy_bytes``); the backward asks for none. A record's c·T_r·V logits fit in the block
    the previous record's fp32 copy freed (4·T_{r-1}·V, best fit, split) unless the length more than doubles, and
    its fp32 copy fits in no cached block: 4·T·V per record. Allocator replay of Llama-3.2-1B QLoRA fp16 at b = 2
    through records T = 512, 1024, 1536, 2048 (docs/evidence/varying_length_reserved/unsloth_2024_replay.jsonl):
    4,726,980,608 B over the 512-only run against 4·T·V summed, 4,728,029,184 (the backward-start rule, c·T·V, would
    give half). Without autocast its logits, logsumexp and labels are what backward starts with: the general K."""
    copy = unsloth_2024_returned_copy_bytes(c, autocast, tokens, V) if loss is Loss.UNSLOTH_2024 else 0
    return copy or backward_start_logits


def _model_dtype_loss_bytes(c: int, autocast: bool, tokens, sequences, V: int, labels,
                            softcap: bool = False) -> LogitsBytes:
    """``model-dtype``, and ``hf`` for a family whose own loss takes lm_head's output as it comes
    (``FamilyTraits.loss_upcasts`` False: Qwen v1's ``CrossEntropyLoss()(lm_logits[..., :-1, :].contiguous().view(-1,
    V), ...)``): the shifted copy of
    T' = b·(s - 1) rows is in c; ``log_softmax`` is on CUDA autocast's fp32 list (torch ``docs/source/amp.rst``, "CUDA
    Ops that can autocast to float32"), so under autocast it casts its input to fp32 and saves an fp32 output, and
    without autocast (bf16-true; DeepSpeed, under which accelerate leaves autocast off: ``native_amp`` is False for
    ``DistributedType.DEEPSPEED``, accelerate 1.16 ``accelerator.py:536-567``) it runs and saves in c. With l the
    log_softmax bytes and k the cast's: forward peak c·T·V + (c + k + l)·T'·V at the log_softmax; after forward the
    model's ``outputs.logits`` (c·T·V) and accelerate's fp32 copy of them under autocast beside the saved l·T'·V;
    backward 3·l·T'·V (the saved output, nll_loss's gradient and log_softmax's). Without autocast those two gradients
    (c·T'·V each) fit the blocks forward freed, the shifted copy's and the logits' (best fit), so nothing strands
    (``head_strands``; allocator replay of Llama-3.2-1B LoRA bf16-true at 2 x 8192: reserved +26.8% with the
    stranded-head rule, docs/allocator-slack.md); under autocast they are fp32 and outgrow the 16-bit blocks. A final
    soft-cap (Gemma-2's
    ``tanh(logits / cap) * cap`` in the model) keeps its tanh output (c·T·V) from forward to backward, and its three
    steps make the model's output in two c·T·V tensors. For a batch of one sequence the shifted slice
    ``[1, s - 1, V]`` of the contiguous logits is contiguous already, so ``.contiguous()`` returns it: no copy."""
    shifted = tokens - sequences  # T' = b·(s - 1) rows
    copied = select(sequences > 1, c, 0)  # the shifted copy's bytes per element (none for one sequence)
    ls = _F32 if autocast else c
    cast = _F32 if autocast and c != _F32 else 0
    capped = c * tokens * V if softcap else 0  # the tanh output, saved by its own backward
    saved = ls * shifted * V + capped + labels
    inside = c * tokens * V + capped + (copied + cast + ls) * shifted * V + labels
    forward = maximum(inside, (c + (_F32 if autocast else 0)) * tokens * V + capped + ls * shifted * V + labels)
    return LogitsBytes(forward, saved, 3 * ls * shifted * V + capped + labels, c * tokens * V + capped + labels,
                       head_strands=autocast, forward_inside=inside)


def _compiled_logits_bytes(loss: Loss, c: int, accelerate_copy: bool, tokens, V: int, labels,
                           head_grad_bytes: int) -> LogitsBytes:
    """The compiled cross-entropy (module docstring): the 16-bit logits and two fp32 values per row are saved."""
    saved = c * tokens * V + 2 * _F32 * tokens + labels
    if loss.in_model:
        forward = saved + (_F32 * tokens * V if accelerate_copy else 0)
        return LogitsBytes(forward, saved, saved + c * tokens * V, c * tokens * V + labels, request=c * tokens * V,
                           forward_inside=saved)
    chunk = -(-tokens // CHUNKED_LOSS_CHUNKS)
    backward = saved + c * chunk * V
    if head_grad_bytes:
        remaining = saved * (CHUNKED_LOSS_CHUNKS - 2) // CHUNKED_LOSS_CHUNKS
        backward = maximum(backward, remaining + 3 * head_grad_bytes + c * chunk * V)
    return LogitsBytes(saved, saved, backward, saved + c * chunk * V, request=c * chunk * V)


def _loss_parallel_bytes(c: int, accelerate_copy: bool, tokens, V: int, labels) -> LogitsBytes:
    """``hf`` under loss parallelism on a rank's [T, V'] logits (module docstring): forward (c + 4 + 8)·T·V' inside
    the loss (c + 8 with fp32 logits, whose ``.float()`` is the tensor itself), the fp32 log_softmax saved, backward
    16·T·V', lm_head's backward with the c gradient; the last [T, V'] request of the backward is an fp32 one."""
    upcast = 0 if c == _F32 else _F32
    saved = _F32 * tokens * V + labels
    inside = (c + upcast + 2 * _F32) * tokens * V + labels
    after = (c + _F32 + (_F32 if accelerate_copy else 0)) * tokens * V + labels
    forward = maximum(inside, after)
    return LogitsBytes(forward, saved, 4 * _F32 * tokens * V + labels, c * tokens * V + labels,
                       request=_F32 * tokens * V, forward_inside=inside)
