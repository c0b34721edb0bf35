"""The preference tasks' terms (``--task dpo, ipo, simpo, orpo, cpo``): TRL 1.16 ``DPOTrainer`` on one GPU.

Symbols: b pairs per micro-batch, B = 2·b rows (chosen rows over rejected rows, one forward:
``DataCollatorForPreference``, ``trl/trainer/dpo_trainer.py:146-211``), s tokens per row (prompt P + completion C),
positions B·(s-1) after the shift, N = B·min(C, s-1) scored rows (labels -100 on the prompt, ``:1303``; the fused
head keeps the others, ``trl/trainer/utils.py`` ``_fused_forward``: ``hidden_states[mask]``), h, V, c compute bytes,
r the backbone output's bytes.

The policy's step is vramcalc's TRL step (``terms/trl_loss.py``) on B rows of s tokens with N scored rows and one
more output, ``mean_logits`` (4·N; ``outputs=("log_probs", "entropy", "mean_logits", "is_top1")``, ``:955``).
What the task adds (``_compute_loss``, ``:1285-1612``):

- the batch: ``input_ids``, ``attention_mask``, ``completion_mask`` and ``labels`` [B, s] int64 (``BATCH_TENSORS``),
  alive through the forward and the reference forward;
- after the policy's forward, its outputs stay referenced until the loss returns: ``log_probs``, ``entropy``,
  ``mean_logits`` [B, s-1] fp32 and ``is_top1`` [B, s-1] bool (``masked_scatter`` of each, ``utils.py``):
  13 bytes per position (``OUTPUT_BYTES_PER_POSITION``);
- the reference forward (``copy``/``adapter``), under ``torch.no_grad()`` (``:1324-1338``), while the policy's saved
  activations and fused-head tensors are held: the larger of
  * its fused head (``add_fused_lm_head(ref_model)``, ``outputs=("log_probs",)``, ``:962``): the backbone output
    r·B·s·h, the row copy r·N·h, targets 8N, the mask B·(s-1), seven fp32 statistics 28N, ``log_z`` and the
    log-probs 8N, the [min(N, 4096), 32768] tile in c and the casts of mixed precision (``trl_loss``);
  * its costliest decoder layer without autograd: the forward of ``generate``'s prefill
    (``serving/activations.forward_moments``, the same transformers module code; no cache is kept);
- ``copy``: a second model's weights, stored as the policy's base is (same dtype and quantization:
  ``create_model_from_path`` with the policy's ``dtype`` and ``quantization_config``, ``:916-927``), alive at every
  moment (``reference_weight_bytes``); ``adapter``: none (peft's ``disable_adapter`` on the policy);
  ``precomputed``/``none``: two fp32 [b] tensors in the batch.
- the attention: the collator pads the 2·b rows to the longest and passes ``attention_mask``; chosen and
  rejected completions differ in length, so the mask holds zeros and transformers builds the 4-D mask for sdpa and
  eager (``preference_masked``): the layers save what a masked attention saves (``activations``' masked walk).
  C is the padded completion length, so an estimate for the longest pair bounds the step.
The DPO loss itself works on [b] tensors (a few hundred bytes).
"""

from __future__ import annotations

from ..model import ModelSpec
from ..options import Attention, Method, Phase, RefModel, Task
from ..serving import activations as forward_only
from ..task_setup import teacher_spec
from ..units import maximum
from .trl_loss import TRL_TOKEN_TILE, TRL_VOCAB_TILE

MEAN_LOGITS_BYTES_PER_ROW = 4  # DPOTrainer's extra fused-head output (dpo_trainer.py:955)
IS_TOP1_BYTES = 3  # SFTTrainer's is_top1 (two bool comparisons and their &), which GRPOTrainer does not ask for
OUTPUT_BYTES_PER_POSITION = 3 * 4 + 1  # log_probs, entropy, mean_logits fp32; is_top1 bool ([B, s-1] each)
BATCH_TENSORS = 4  # input_ids, attention_mask, completion_mask (the collator), labels (dpo_trainer.py:1303)
_ADAPTER_KINDS = ("adapter", "prompt")
RESIDUAL_STREAM_TENSORS = 3  # [T, h] tensors of the no-grad layer forward in the residual dtype (reference_layer_bytes)
# the reference's fused head per scored row: targets (8), seven fp32 statistics (28), log_z and log-probs (8)
REFERENCE_HEAD_BYTES_PER_ROW = 8 + 7 * 4 + 2 * 4


def pair_rows(batch_size):
    """B = 2·b: the chosen and the rejected row of each pair in one forward."""
    return 2 * batch_size


def scored_rows(rows, seq_len, completion_len: int):
    """N: scored positions of B rows, ``min(C, s-1)`` per row (the first label is dropped by the shift)."""
    return rows * maximum(seq_len - 1 - maximum(seq_len - 1 - completion_len, 0), 0)


def fused_head_shape(setup, rows, seq_len) -> dict:
    """The keywords of ``trl_loss.trl_logits_bytes`` for the task ({} for SFT)."""
    if setup.task is Task.GRPO:  # outputs=("log_probs", "entropy"): no is_top1 (grpo_trainer.py:1068-1073)
        return {"rows": scored_rows(rows, seq_len, setup.completion_len), "extra_forward_per_row": -IS_TOP1_BYTES}
    if setup.task is Task.KTO:  # outputs=("log_probs", "entropy", "mean_logits"): no is_top1 (kto_trainer.py:967-970)
        return {"rows": scored_rows(rows, seq_len, setup.completion_len),
                "extra_forward_per_row": MEAN_LOGITS_BYTES_PER_ROW - IS_TOP1_BYTES}
    if not setup.task.is_preference:
        return {}
    return {"rows": scored_rows(rows, seq_len, setup.completion_len),
            "extra_forward_per_row": MEAN_LOGITS_BYTES_PER_ROW}


def training_rows(setup, batch_size):
    """Rows of one micro-batch's forward: 2·b for the preference tasks; b·g / grad_accum completions for GRPO
    (``task_setup._grpo``); b otherwise."""
    if setup.task.is_preference:
        return pair_rows(batch_size)
    if setup.task is Task.GRPO:
        return batch_size * setup.num_generations // setup.grad_accum
    return batch_size  # sft; kto: b unpaired rows (their KL rows run in separate no-grad forwards)


def reference_weight_bytes(tensors, ref_model: RefModel, shards: int = 1) -> int:
    """``copy``: the stored bytes of every tensor but the adapter's (the base model, as the policy's is stored).
    ``shards``: under ZeRO-3 or FSDP TRL shards the reference like the policy (``prepare_deepspeed`` /
    ``prepare_fsdp``, ``dpo_trainer.py:984-988``): one rank holds 1/n of it (the units it gathers for its no-grad
    forward are not modelled); DDP and ZeRO-1/2 keep a whole copy per GPU (``accelerator.prepare_model``, :990)."""
    if ref_model is not RefModel.COPY:
        return 0
    return -(-sum(t.bytes_each * t.count for t in tensors if t.kind not in _ADAPTER_KINDS) // shards)


def reference_shards(setup) -> int:
    return setup.num_gpus if setup.sharding.value in ("zero3", "fsdp") else 1


def batch_bytes(rows, seq_len) -> int:
    return BATCH_TENSORS * 8 * rows * seq_len


def policy_output_bytes(rows, seq_len) -> int:
    """The policy's outputs [B, s-1], referenced from its forward to the end of the loss."""
    return OUTPUT_BYTES_PER_POSITION * rows * (seq_len - 1)


def reference_head_bytes(model: ModelSpec, dt, rows, seq_len, scored) -> int:
    """The reference's fused head under no_grad (module docstring), with the casts of mixed precision."""
    h, V, c = model.hidden_size, model.vocab_size, dt.c
    r = max(dt.norm_out, dt.r)
    tile_rows = scored - maximum(scored - TRL_TOKEN_TILE, 0)
    row_cast = c * h * tile_rows if r != c else 0
    col_cast = c * h * min(TRL_VOCAB_TILE, V) if dt.r != c else 0
    return (r * rows * seq_len * h + r * scored * h + rows * (seq_len - 1) + REFERENCE_HEAD_BYTES_PER_ROW * scored
            + c * tile_rows * TRL_VOCAB_TILE + row_cast + col_cast)


def reference_layer_bytes(model: ModelSpec, dt, rows, seq_len, masked: bool = True) -> int:
    """The reference's costliest no-grad decoder layer (``serving/activations.forward_moments`` for a forward of
    B rows of s tokens, nothing cached; ``masked``: the padded batch's 4-D mask, ``preference_masked``)."""
    if hasattr(rows, "shape") or hasattr(seq_len, "shape"):  # a sweep's arrays: one layer model per element
        import numpy

        return numpy.vectorize(lambda b, s: reference_layer_bytes(model, dt, int(b), int(s), masked),
                               otypes=[numpy.int64])(rows, seq_len)
    shape = forward_only.ForwardShape(batch=rows, new_tokens=seq_len, kv_tokens=seq_len, element_bytes=dt.c,
                                      padded=masked)
    # mixed precision (fp32 weights under 16-bit autocast): the residual stream stays fp32, so the embedding output,
    # the layer's input and the normed MLP input (an fp32 norm weight times the fp32 stream) are r, not c, bytes
    residual = RESIDUAL_STREAM_TENSORS * (dt.r - dt.c) * rows * seq_len * model.hidden_size if dt.r > dt.c else 0
    return max(size for size, _ in forward_only.forward_moments(model, shape, seq_len)) + residual


def reference_forward_bytes(model: ModelSpec, dt, setup, rows, seq_len) -> int:
    """The reference forward's own peak (0 without a reference forward)."""
    if setup.ref_model not in (RefModel.COPY, RefModel.ADAPTER):
        return 0
    scored = scored_rows(rows, seq_len, setup.completion_len)
    masked = preference_masked(False, setup.attn) and setup.attn is not Attention.FLASH
    return maximum(reference_head_bytes(model, dt, rows, seq_len, scored),
                   reference_layer_bytes(model, dt, rows, seq_len, masked))


def task_moments(moments: list, model: ModelSpec, setup, tensors, dt, rows, seq_len, logits, moment_type):
    """``preference_moments``, ``kto_moments`` or ``grpo_moments`` for the task."""
    if setup.task is Task.GRPO:
        return grpo_moments(moments, model, setup, tensors, dt, rows, seq_len, moment_type)
    if setup.task is Task.KTO:
        return kto_moments(moments, model, setup, tensors, dt, rows, seq_len, logits, moment_type)
    return preference_moments(moments, model, setup, tensors, dt, rows, seq_len, logits, moment_type)


def preference_moments(moments: list, model: ModelSpec, setup, tensors, dt, rows, seq_len, logits, moment_type):
    """The policy's moments (``estimator._moments`` on B rows) with what the task adds (module docstring): the
    reference's weights at every moment, the batch in the forward moments, and the reference forward's moment at
    the end of the policy's forward (its saved activations ``moments``' forward ``activations``, its fused head's
    saved tensors and outputs)."""
    ref_weights = reference_weight_bytes(tensors, setup.ref_model, reference_shards(setup))
    batch = batch_bytes(rows, seq_len)
    out = []
    for m in moments:
        forward = m.phase is Phase.FORWARD
        out.append(m._replace(weights=m.weights + ref_weights, temporaries=m.temporaries + (batch if forward else 0)))
    reference = reference_forward_bytes(model, dt, setup, rows, seq_len)
    if setup.ref_model in (RefModel.COPY, RefModel.ADAPTER):
        end_of_forward = [m for m in out if m.phase is Phase.FORWARD][-1]  # the loss's forward: every activation
        held = logits.saved + policy_output_bytes(rows, seq_len)
        out.append(moment_type(Phase.REFERENCE_FORWARD, end_of_forward.weights, end_of_forward.gradients,
                               end_of_forward.optimizer_states, end_of_forward.activations, held + reference,
                               end_of_forward.temporaries))
    return out


# KTO (``--task kto``): TRL 1.16 KTOTrainer (``trl/trainer/kto_trainer.py``), b unpaired rows per micro-batch.
KTO_BATCH_TENSORS = 7  # [b, s] int64: input_ids, attention_mask, completion_mask and the KL rows' three
# (``KTODataCollator``, kto_trainer.py:161-203), completion_labels (masked_fill, :1396)
KTO_OUTPUT_BYTES_PER_POSITION = 3 * 4  # log_probs, entropy, mean_logits fp32 [b, s-1] (:967-970; no is_top1)
KTO_POLICY_KL_OUTPUT_BYTES_PER_ROW = 3 * 4  # the policy's no-grad KL forward also asks for entropy (and its
# temporary) and mean_logits beyond the reference head's log-probs (``reference_head_bytes``)


def kto_moments(moments: list, model: ModelSpec, setup, tensors, dt, rows, seq_len, logits, moment_type):
    """KTOTrainer's ``_compute_loss`` (``kto_trainer.py:1370-1445``) on b rows with the KL batch:

    1. the policy's KL forward under ``torch.no_grad`` (``_compute_kl_logps``, :1337-1368) before its own forward:
       weights, the batch, ``KL_labels`` [b, s] int64 (8·b·s) and a no-grad forward of b rows
       (``reference_forward_bytes``' layer or fused head, the head with entropy and mean_logits too);
    2. the policy's forward (``estimator._moments`` on b rows, ``fused_head_shape``) with the batch;
    3. with a reference (``copy``/``adapter``), under no_grad while the policy's saved tensors and outputs
       (log_probs, entropy, mean_logits [b, s-1] fp32) are held: its KL forward (with ``KL_labels`` again) then
       its forward over the b rows, the same size: ``reference_forward_bytes`` + 8·b·s (:1424-1436).
    ``precomputed``: ``ref_logps`` and ``ref_KL_logps`` [b] in the batch (:1412-1423), no step 3."""
    ref_weights = reference_weight_bytes(tensors, setup.ref_model, reference_shards(setup))
    batch = KTO_BATCH_TENSORS * 8 * rows * seq_len
    kl_labels = 8 * rows * seq_len
    out = []
    for m in moments:
        forward = m.phase is Phase.FORWARD
        out.append(m._replace(weights=m.weights + ref_weights, temporaries=m.temporaries + (batch if forward else 0)))
    start = [m for m in out if m.phase is Phase.FORWARD][0]
    end_of_forward = [m for m in out if m.phase is Phase.FORWARD][-1]  # the loss's forward: every activation
    scored = scored_rows(rows, seq_len, setup.completion_len)
    masked = setup.attn is not Attention.FLASH
    policy_kl = maximum(reference_head_bytes(model, dt, rows, seq_len, scored)
                        + KTO_POLICY_KL_OUTPUT_BYTES_PER_ROW * scored,
                        reference_layer_bytes(model, dt, rows, seq_len, masked))
    out.append(moment_type(Phase.FORWARD, start.weights, start.gradients, start.optimizer_states, 0, policy_kl,
                           batch + kl_labels))
    if setup.ref_model in (RefModel.COPY, RefModel.ADAPTER):
        held = logits.saved + KTO_OUTPUT_BYTES_PER_POSITION * rows * (seq_len - 1)
        out.append(moment_type(Phase.REFERENCE_FORWARD, end_of_forward.weights, end_of_forward.gradients,
                               end_of_forward.optimizer_states, end_of_forward.activations,
                               held + reference_forward_bytes(model, dt, setup, rows, seq_len) + kl_labels,
                               end_of_forward.temporaries))
    return out


def task_details(tensors, setup, device=None) -> dict:
    """What the breakdown's ``details`` say about the task (the reference's weights are inside ``weights``; GRPO's
    KV cache inside ``temporaries`` of the generation phase; vLLM's reservation inside ``runtime_overhead``)."""
    if not setup.task.uses_fused_head:
        return {}
    out = {"task": setup.task.value, "ref_model": setup.ref_model.value,
           "reference_model_bytes": reference_weight_bytes(tensors, setup.ref_model, reference_shards(setup))}
    if setup.task is Task.GRPO:
        out["rollout_engine"] = setup.rollout_engine.value
        if setup.rollout_engine.value == "vllm":
            out["vllm_reservation_bytes"] = vllm_reservation_bytes(setup, device)
            out["vllm_reservation"] = "modelled: gpu_memory_utilization x GPU memory (vLLM's documented rule)"
    return out


def vllm_reservation_bytes(setup, device) -> int:
    """A colocated vLLM engine (``GRPOConfig(use_vllm=True, vllm_mode="colocate")``) holds
    ``gpu_memory_utilization`` x the GPU's total memory: vLLM documents the fraction as the share of GPU memory the
    engine may use for its weights, activations and KV cache, and pre-allocates the KV cache up to it
    (docs.vllm.ai, ``EngineArgs.gpu_memory_utilization``; TRL passes ``vllm_gpu_memory_utilization``, default 0.3,
    ``grpo_config.py:656-657``). Modelled, not traced; 0 without a GPU (the fraction of what?)."""
    if setup.task is not Task.GRPO or setup.rollout_engine.value != "vllm" or device is None:
        return 0
    return int(setup.vllm_gpu_fraction * device.memory_bytes)


def preference_masked(masked, attn_used: Attention):
    """Whether the attention gets a 4-D mask. The collator passes ``attention_mask`` [B, s] and pads every row to the
    longest of the 2·b (``dpo_trainer.py:180-199``): chosen and rejected completions differ in length, so the mask
    holds zeros and transformers builds the 4-D mask (``masking_utils._ignore_causal_mask_sdpa`` skips it only for
    an all-ones mask it can read) for sdpa and eager; FlashAttention-2 unpads instead (no mask tensor)."""
    if attn_used is Attention.FLASH:
        return masked
    return True


# GRPO (``--task grpo``): TRL 1.16 GRPOTrainer, modelled (not traced).
GRPO_LOSS_TENSORS = 6  # fp32 [R, C] tensors of the clipped loss saved for backward: per-token log-probs, coef_1 =
# exp(logps - old), coef_2 = clamp(coef_1), the two per-token losses and their min (grpo_trainer.py _compute_loss)
SAMPLING_PROBS_BYTES = 4  # fp32 softmax probabilities per row and vocabulary entry (generation/utils.py _sample)
GRPO_BATCH_TENSORS = 5  # prompt_ids, prompt_mask, completion_ids, completion_mask [rows, .] int64, the concatenated
# input_ids / attention_mask of the training forward counted once more per row of s


def generation_bytes(model: ModelSpec, setup, dt, generations, prompt_len: int, completion_len: int) -> int:
    """transformers ``generate`` of b·g completions of C tokens after P prompt tokens (``grpo_trainer.py:2193``
    ``_generate`` -> ``unwrap_model_for_generation``, no_grad, DynamicCache): the larger of the prefill and of the
    last decode step, from the serving model (``serving/hf_engine.prefill_moment``, ``decode_moment``: the KV cache
    formulas of ``serving/kv_cache.py``). Element bytes: the stored dtype of the weights (generation runs outside
    the Trainer's autocast) or, for QLoRA, the 4-bit base's compute dtype. TRL samples (``do_sample=True``,
    ``grpo_trainer.py:1155-1173``): transformers' ``_sample`` adds ``probs = softmax(next_token_scores)``, fp32
    [b·g, V], beside the step's logits and their fp32 copy, then ``torch.multinomial`` where greedy decoding takes
    ``argmax`` (``SAMPLING_PROBS_BYTES``; the serving model's decode peak is that sampling moment at the last step)."""
    from ..serving.hf_engine import decode_moment, prefill_moment

    if hasattr(generations, "shape"):
        import numpy

        return numpy.vectorize(lambda g: generation_bytes(model, setup, dt, int(g), prompt_len, completion_len),
                               otypes=[numpy.int64])(generations)
    e = dt.c if setup.method is Method.QLORA else dt.r
    prefill = prefill_moment(model, generations, prompt_len, element_bytes=e)
    decode = decode_moment(model, generations, prompt_len + completion_len, element_bytes=e, prompt=prompt_len)
    return max(prefill.total, decode.total + SAMPLING_PROBS_BYTES * generations * model.vocab_size)


def generation_kv_cache_bytes(model: ModelSpec, setup, dt, generations, prompt_len: int, completion_len: int) -> int:
    """The KV cache alone at the end of the generation (``serving/kv_cache.hf_cache_bytes``), for ``details``."""
    from ..serving.kv_cache import hf_cache_bytes

    e = dt.c if setup.method is Method.QLORA else dt.r
    return hf_cache_bytes(model, generations, prompt_len + completion_len - 1, last_input=1, element_bytes=e)


def grpo_moments(moments: list, model: ModelSpec, setup, tensors, dt, rows, seq_len, moment_type):
    """GRPO's step: the training moments (``estimator._moments`` on R = b·g / grad_accum rows, scored on the
    completions) plus the loss's fp32 [R, C] buffers and the buffered generation batch; the generation moment (the
    policy's weights and optimizer states, no gradients: ``zero_grad(set_to_none=True)`` ran, the KV cache and
    generate's transients); with a reference (beta > 0) its no-grad forward over R rows at a time while scoring
    (``_generate_and_score_completions``: before the training forward, so no activations are held)."""
    ref_weights = reference_weight_bytes(tensors, setup.ref_model, reference_shards(setup))
    generations = rows * setup.grad_accum  # b·g completions in one generate
    batch = GRPO_BATCH_TENSORS * 8 * generations * seq_len
    loss = GRPO_LOSS_TENSORS * 4 * rows * setup.completion_len
    out = []
    for m in moments:
        training = m.phase in (Phase.FORWARD, Phase.BACKWARD_START)
        out.append(m._replace(weights=m.weights + ref_weights,
                              temporaries=m.temporaries + batch + (loss if training else 0)))
    load = [m for m in out if m.phase is Phase.OPTIMIZER_STEP][-1]
    W, O = load.weights, load.optimizer_states
    if setup.rollout_engine.value == "hf":
        out.append(moment_type(Phase.GENERATION, W, 0, O, 0, 0,
                               batch + generation_bytes(model, setup, dt, generations, setup.prompt_len,
                                                        setup.completion_len)))
    if setup.ref_model in (RefModel.COPY, RefModel.ADAPTER):
        reference = reference_forward_bytes(model, dt, setup, rows, seq_len)
        out.append(moment_type(Phase.REFERENCE_FORWARD, W, 0, O, 0, reference, batch))
    return out


# Distillation (``--task distill``): TRL 1.16 GKDTrainer (``trl/experimental/gkd/gkd_trainer.py``), off-policy.
DISTILL_BATCH_TENSORS = 3  # input_ids, attention_mask, labels [b, s] int64 (DataCollatorForChatML; :325-341)
# generalized_jsd_loss (gkd_trainer.py:238-322, beta=0.5) on [b, s-1, V] logits of e bytes each: its buffers at the
# forward's peak and those autograd keeps for backward, in e-byte elements per [b, s-1, V] position. Traced on fake
# tensors under vramcalc's AllocationTracker (/tmp/gkd_d15d.py, b=2, s=1024, V=32768): fp32 inputs, peak 17.0 units
# of fp32 [b, s-1, V] with the two inputs (2.0), 7.0 kept once the inputs are dropped; bf16 inputs (no autocast):
# 8.5 and 3.5 units (1.0 for the inputs): 15 and 7 elements each time. The backward's peak stays below the forward's.
JSD_FORWARD_ELEMENTS = 15  # the two /T copies, two log_softmax, the stacked shifted pair, logsumexp, two kl_div, ...
JSD_SAVED_ELEMENTS = 7


def distill_logits_element_bytes(dt) -> int:
    """Bytes of one logit reaching the GKD loss: accelerate wraps both models' forward in
    ``convert_outputs_to_fp32`` under mixed precision (``accelerator.py:1791-1801``, ``prepare_model``, the teacher's
    too with ``evaluation_mode=True``), and the Trainer runs ``compute_loss`` outside autocast
    (``trainer.py:2268-2273``): fp32 under autocast, the weights' dtype without."""
    return 4 if dt.autocast else dt.c


def teacher_weight_bytes(setup, dt) -> int:
    """The teacher's weights, stored in the policy's 16-bit compute dtype (GKDConfig ``teacher_model_init_kwargs``
    ``dtype``, ``gkd_trainer.py:156-175``; fp32 when the policy computes in fp32): params x c, alive at every moment
    (``prepare_model(teacher, evaluation_mode=True)``, ``:194``)."""
    return teacher_spec(setup).params * dt.c


def distill_logits_bytes(model: ModelSpec, dt, rows, seq_len):
    """The student's logits and the GKD loss (``LogitsBytes``, T = b·s, T' = b·(s-1), e the loss's element bytes):
    lm_head writes c·T·V, accelerate's fp32 copy (c + e)·T·V; in the loss the student's and the teacher's e·T·V
    logits and ``JSD_FORWARD_ELEMENTS``·e·T'·V buffers (forward peak), ``JSD_SAVED_ELEMENTS``·e·T'·V kept for
    backward (``compute_loss`` returns only the loss: both logits tensors are dropped, ``gkd_trainer.py:360-361``);
    lm_head's backward sees the slice's e·T·V gradient and the cast's c·T·V. Gemma-2's final soft-cap keeps its tanh
    output (c·T·V) from the student's forward into backward (``logits.py``)."""
    from .logits import LogitsBytes

    V, c = model.vocab_size, dt.c
    e = distill_logits_element_bytes(dt)
    full = rows * seq_len * V
    shifted = rows * (seq_len - 1) * V
    labels = 8 * rows * seq_len
    softcap = c * full if model.traits.logit_softcap else 0  # Gemma-2's tanh output, saved for its backward
    forward = maximum((c + (e if e != c else 0)) * full,
                      2 * e * full + JSD_FORWARD_ELEMENTS * e * shifted) + labels + softcap
    saved = JSD_SAVED_ELEMENTS * e * shifted + labels + softcap
    head = (e + (c if e != c else 0)) * full + labels
    return LogitsBytes(forward, saved, forward, head)


def distill_moments(moments: list, model: ModelSpec, setup, dt, rows, seq_len, moment_type):
    """GKDTrainer's step: the student's moments (``estimator._moments`` with ``distill_logits_bytes``) with the
    teacher's weights at every moment and the batch in the forward, plus the teacher's no-grad forward
    (``gkd_trainer.py:331-338``) after the student's: the student's activations and its e·T·V logits are held while
    the larger of the teacher's costliest layer (``reference_layer_bytes`` on the teacher, 16-bit, padded mask) and
    its head (the final hidden state c·T·h, its c·T·V logits and their fp32 copy under autocast) runs."""
    teacher = teacher_spec(setup)
    tw = teacher.params * dt.c
    batch = DISTILL_BATCH_TENSORS * 8 * rows * seq_len
    out = []
    for m in moments:
        forward = m.phase is Phase.FORWARD
        out.append(m._replace(weights=m.weights + tw, temporaries=m.temporaries + (batch if forward else 0)))
    end_of_forward = [m for m in out if m.phase is Phase.FORWARD][-1]
    e = distill_logits_element_bytes(dt)
    c = dt.c
    full = rows * seq_len * teacher.vocab_size
    tdt = dt.__class__(c=c, r=c, norm_out=c, autocast=dt.autocast, adapter=dt.adapter)
    masked = setup.attn is not Attention.FLASH
    head = c * rows * seq_len * teacher.hidden_size + (c + (e if e != c else 0)) * full
    teacher_forward = maximum(reference_layer_bytes(teacher, tdt, rows, seq_len, masked), head)
    out.append(moment_type(Phase.REFERENCE_FORWARD, end_of_forward.weights, end_of_forward.gradients,
                           end_of_forward.optimizer_states, end_of_forward.activations,
                           (e + (c if model.traits.logit_softcap else 0)) * rows * seq_len * model.vocab_size,
                           teacher_forward + end_of_forward.temporaries))
    return out


def distill_details(setup, dt) -> dict:
    """``details`` for ``--task distill``: the teacher and its weights (inside ``weights``)."""
    return {"task": setup.task.value, "teacher": setup.teacher, "teacher_model_bytes": teacher_weight_bytes(setup, dt)}


# Reward (``--task reward``): TRL 1.16 RewardTrainer (``trl/trainer/reward_trainer.py``) on a sequence classifier.
# The model is ``AutoModelForSequenceClassification`` with num_labels=1 (``model.reward_spec``: ``score`` [1, h] in
# place of lm_head, whose width the head terms read as ``ModelSpec.head_width``). One step: b pairs, the collator
# stacks the b chosen rows over the b rejected rows (``DataCollatorForPreference.torch_call``, :203-230), one forward
# of B = 2·b rows (``compute_loss``, :778-817), ``rewards_chosen, rewards_rejected = torch.chunk(logits.squeeze(-1),
# 2)`` and ``-logsigmoid(chosen - rejected).mean()`` (:786-792): [b] tensors. No logits over the vocabulary, no
# cross-entropy, no reference model.
REWARD_BATCH_TENSORS = 2  # input_ids, attention_mask [2·b, s] int64 (the collator, reward_trainer.py:213-224)
POOLING_BYTES_PER_POSITION = 4 + 4  # GenericForSequenceClassification (transformers 5.25 modeling_layers.py:
# 180-182): non_pad_mask = (input_ids != pad).to(int32) and token_indices * non_pad_mask, int32 [B, s] each


def reward_logits_bytes(dt, rows, seq_len):
    """The score head's outputs at each moment (``logits.LogitsBytes``), T = B·s positions:

    - forward: ``logits = self.score(hidden_states)`` [B, s, 1] in c (modeling_layers.py:167), the pooling's two
      int32 [B, s] (:180-182; ``argmax`` and ``pooled_logits = logits[arange(B), last]`` [B, 1], :190, are B-sized);
    - saved for backward: nothing of size T (the indexing keeps its [B] indices, the Linear its input: the final
      norm's output, counted with the head's saved activations);
    - backward: the index's backward scatters the pooled gradient into zeros [B, s, 1] in c, which is ``score``'s
      output gradient (c·T) while its backward makes the [B, s, h] input gradient (``hidden_grad``)."""
    from .logits import LogitsBytes

    tokens = rows * seq_len
    return LogitsBytes(dt.c * tokens + POOLING_BYTES_PER_POSITION * tokens, 0, dt.c * tokens, dt.c * tokens)


def reward_moments(moments: list, rows, seq_len):
    """The policy's moments (``estimator._moments`` on B = 2·b rows) with the collator's batch in the forward
    moments; nothing else (no reference, the loss on [b])."""
    batch = REWARD_BATCH_TENSORS * 8 * rows * seq_len
    return [m._replace(temporaries=m.temporaries + batch) if m.phase is Phase.FORWARD else m for m in moments]
