"""logits under TRL's fused lm_head (``--loss trl``): SFTTrainer 1.16's tiled log-probabilities.

SFTTrainer patches the model with ``add_fused_lm_head`` (trl 1.16.0 ``trl/trainer/sft_trainer.py:1144-1147``,
``trl/trainer/utils.py:1548``) and computes the loss from ``model(..., fused_lm_head=True).log_probs``
(``sft_trainer.py:1611-1618``). lm_head's module never runs: ``ChunkedLogProbFunction``
(``trl/kernels/chunked_logprob.py:299-465``) projects the scored rows through ``lm_head.weight`` in tiles of
``TRL_TOKEN_TILE`` rows by ``TRL_VOCAB_TILE`` columns written into one reused buffer, folds each tile into online
log-sum-exp statistics (a Triton kernel on CUDA, no allocation), and in backward recomputes each tile, overwrites it
with the logits gradient and accumulates the input (and weight) gradients in fp32. No [T, V] tensor exists and nothing
runs under ``torch.utils.checkpoint``.

Symbols: T = b·s tokens; N = b·(s - 1) scored rows (the last position of each sequence has no label; every other
label is trained, as everywhere in vramcalc); h; V; c the compute bytes; r the bytes of the backbone's output (the
final norm's: ``max(norm_out, r)``); C = min(N, 4096) tile rows; W = 32768 tile columns (the buffer is
[C, 32768] even when V < 32768: ``mm_buf`` is allocated before the vocabulary loop, ``chunked_logprob.py:347,413``).

Forward, inside the kernel (``utils.py:1599-1666``, ``chunked_logprob.py:311-392``):
  mask [b, s-1] bool (N), ``hidden_states[mask]`` an [N, h] copy (r·N·h, saved), ``labels[mask]`` int64 (8N, saved),
  seven fp32 [N] statistics (28N), the tile buffer c·C·W, then ``log_z`` (4N, saved), log-probs (4N), entropy (4N,
  saved: SFTTrainer asks for ``("log_probs", "entropy", "is_top1")``) with one [N] fp32 temporary, and ``is_top1``
  from two bool comparisons (3N), while the backbone's output [b, s, h] is still referenced by the patched forward
  (r·T·h). Peak = saved + (28 + 4 + 4 + 4 + 3)·N + c·C·W + r·T·h (+ the cast copies below).
Saved into backward: mask, the [N, h] copy, targets, log_z and entropy: ``(1 + 8 + 4 + 4)·N + r·N·h``.
Backward-start: the loss gradient [b, s-1] fp32 and its ``masked_select`` (8N), ``grad_hidden`` [N, h] fp32
  (4·N·h), the tile buffer c·C·W and, when the head trains, the fp32 weight gradient 4·V·h; at the return, the
  copies ``grad_hidden.to(r)`` (r·N·h when r != 4) and ``grad_weight.to(weight dtype)`` (the gradient itself,
  unless fp32).
Casts (mixed precision: fp32 backbone output and fp32 lm_head under 16-bit autocast): the row block being scored is
  cast to c (c·C·h, a local alive through its vocabulary loop) and each tile's weight slice too (c·min(W, V)·h,
  freed after its matmul in forward; in backward ``w_chunk``, :423, is made while the previous slice is still bound,
  so two slices exist at once: ``_slice_pair_columns``; the last slice and row block stay referenced until the
  return, :455).
  lm_head's module never runs, so there is no c·V·h autocast copy of the head (``without_head_copy``).
After the kernel's backward (lm_head's place in the estimator's moments): its returned [N, h] input gradient and
  IndexBackward's / SliceBackward's zeros (r·T·h); at the final norm's backward, the gradient of the backbone's output
  [b, s, h] in r (``LogitsBytes.forward_hidden_grad``: the estimator's final-norm moment reads that field).

When lm_head trains (full fine-tuning) the estimate's ``head_saved`` already counts lm_head's input (r·T·h, the norm
output that a ``nn.Linear`` head would save). TRL saves its [N, h] copy instead and the norm output is freed, so the
copy is left out of ``saved`` there (r·b·h bytes over, b rows).
"""

from __future__ import annotations

from .logits import LogitsBytes
from ..model import ModelSpec
from ..units import DType, maximum, select
from .activations import Dtypes
from .temporaries import WeightCopies

TRL_VOCAB_TILE = 32768  # trl/trainer/utils.py:1506 _CHUNKED_LOGPROB_CHUNK_SIZE (trl 1.16.0)
TRL_TOKEN_TILE = 4096  # trl/kernels/chunked_logprob.py:31 TOKEN_CHUNK_SIZE (trl 1.16.0)
_F32 = DType.FP32.bytes
_I64 = DType.INT64.bytes
_BOOL = 1
# per scored row: mask, targets, log_z, entropy (saved into backward)
SAVED_PER_ROW_BYTES = _BOOL + _I64 + _F32 + _F32
# per scored row, forward only: 7 fp32 statistics, log-probs, entropy's temporary, log(sum_exp), 3 bool comparisons
FORWARD_PER_ROW_BYTES = 7 * _F32 + _F32 + _F32 + _F32 + 3 * _BOOL
# per scored row, backward: the loss gradient [b, s-1] fp32 and its masked_select
BACKWARD_PER_ROW_BYTES = 2 * _F32


def _slice_pair_columns(V: int, rows):
    """Columns of the two weight-slice casts alive at once in backward: ``w_chunk = weight[start:end].to(c)`` is made
    while the previous one is still bound. Slices of W columns, the last one ``V - W·(k - 1)``, in a loop that
    restarts for each block of 4096 rows: two full slices with three or more per row block, a full and the last
    with two, and with one slice (V <= W) two copies of it once there is a second row block."""
    slices = -(-V // TRL_VOCAB_TILE)
    if slices >= 3:
        return 2 * TRL_VOCAB_TILE
    if slices == 2:
        return TRL_VOCAB_TILE + _last_block(V, TRL_VOCAB_TILE)
    return V + select(rows > TRL_TOKEN_TILE, V, 0)


def _last_block(n, block: int):
    """The size of the last of ceil(n / block) blocks (n >= 1; ints or numpy arrays)."""
    return n - block * ((n - 1) // block)


def trl_logits_bytes(model: ModelSpec, dt: Dtypes, tokens, head_grad_bytes: int = 0, sequences=1, rows=None,
                     extra_forward_per_row: int = 0) -> LogitsBytes:
    """The fused head's bytes at each moment (formulas: the module docstring), for ``tokens`` T in ``sequences`` b
    sequences (ints or numpy arrays of one shape); ``head_grad_bytes`` lm_head's weight gradient when it trains.
    lm_head's parameter is in the residual dtype ``dt.r``.
    ``rows``: the scored rows N when labels are -100 on some positions (a preference task's prompts,
    ``terms/tasks.py``); the per-position tensors (the bool mask, the loss gradient [b, s-1]) stay per position P =
    T - b. ``extra_forward_per_row``: bytes per scored row of the outputs SFTTrainer does not ask for (DPOTrainer's
    ``mean_logits``, 4)."""
    V, h = model.vocab_size, model.hidden_size
    c = dt.c
    r = max(dt.norm_out, dt.r)
    positions = tokens - sequences
    rows = positions if rows is None else rows
    tile_rows = rows - maximum(rows - TRL_TOKEN_TILE, 0)  # min(N, 4096), array-safe
    tile = c * tile_rows * TRL_VOCAB_TILE
    hidden_copy = r * rows * h
    # mixed precision: the row block being scored cast to c, and each tile's weight slice (module docstring)
    row_cast = c * h if r != c else 0
    col_cast = c * h if dt.r != c else 0
    forward_casts = row_cast * tile_rows + col_cast * min(TRL_VOCAB_TILE, V)
    backward_casts = row_cast * tile_rows + col_cast * _slice_pair_columns(V, rows)
    saved = _BOOL * positions + (SAVED_PER_ROW_BYTES - _BOOL) * rows + (0 if head_grad_bytes else hidden_copy)
    # in forward both the backbone's output (alive in the patched forward's frame; when lm_head trains it is the
    # lm_head input ``head_saved`` counts) and the copy exist
    in_forward = hidden_copy if head_grad_bytes else r * tokens * h
    forward = saved + in_forward + (FORWARD_PER_ROW_BYTES + extra_forward_per_row) * rows + tile + forward_casts
    weight_grad = return_copies = 0
    if head_grad_bytes:
        fp32_grad = _F32 * V * h  # the fp32 accumulator; ``.to(weight dtype)`` is the gradient itself when fp32
        weight_grad = fp32_grad
        return_copies = head_grad_bytes if head_grad_bytes != fp32_grad else 0
    return_copies = return_copies + (r * rows * h if r != _F32 else 0)  # grad_hidden.to(r)
    return_casts = row_cast * _last_block(rows, TRL_TOKEN_TILE) + col_cast * _last_block(V, TRL_VOCAB_TILE)
    backward = (saved + _F32 * positions + (BACKWARD_PER_ROW_BYTES - _F32) * rows + _F32 * rows * h + weight_grad + tile
                + maximum(backward_casts, return_casts + return_copies))
    # lm_head's moment: the kernel's input gradient and IndexBackward's / SliceBackward's zeros beside it (r·T·h;
    # the estimator adds c·T·h of hidden-state gradient there)
    head_backward = r * rows * h + (r - c) * tokens * h
    # the final norm's moment: the gradient of the backbone's output [b, s, h] in r (SliceBackward of ``[:, :-1]``)
    output_grad = r * tokens * h
    return LogitsBytes(forward, saved, backward, head_backward, forward_hidden_grad=output_grad)


def without_head_copy(copies: WeightCopies, model: ModelSpec, dt: Dtypes, tensors) -> WeightCopies:
    """``temporaries.weight_copy_bytes`` without lm_head's autocast copy (c·V·h of an fp32 head under 16-bit autocast,
    saved by ``F.linear``): the fused head never calls lm_head, it casts one [32768, h] slice at a time (counted in
    ``trl_logits_bytes``) and saves the fp32 parameter itself. Same head test as ``weight_copy_bytes``."""
    if not dt.autocast or dt.c == _F32:
        return copies
    head = next((t for t in tensors if t.kind == "lm_head" or (t.kind == "embedding" and model.tie_word_embeddings)),
                None)
    if head is None or head.bits != 32:
        return copies
    head_copy = dt.c * model.vocab_size * model.hidden_size
    return WeightCopies(copies.forward - head_copy, copies.backward_start - head_copy)
