"""An encoder trained as a sequence classifier (``FamilyTraits.encoder``: BERT, ``--task classify``): the step's
moments from the op-by-op lifetimes of its tensors.

The step is transformers' Trainer on ``BertForSequenceClassification`` (transformers 5.25 ``models/bert/
modeling_bert.py``; the same modules in 4.16-4.24, which ran the hf-perf-doc measurements): full fine-tuning, one GPU.
Each stage (the embeddings, one layer, the pooler and classifier) is written once as the ops it runs, in order, each
op making and freeing named tensors (``_Timeline``); autograd's saved tensors are what is alive when a stage's
forward ends, and every op is a candidate moment. The same lists give the saved activations, the forward's and the
backward's transients and the order in which gradients appear, so no separate rule is stated per term. Sizes are
``activations.Saved`` (bytes per token T = b·s, per b·s² of attention scores, per position s, fixed per layer).

Symbols: h hidden, a heads, I intermediate, V vocab, P positions; c the compute dtype's bytes (2 under 16-bit
autocast, else the parameters'), r the parameters', x the residual stream's (LayerNorm's output: fp32 under autocast,
where CUDA runs layer_norm in fp32, casting a 16-bit input and 16-bit weights; else r). What each op allocates and
frees was read from the modules' source and checked against the trace of the real model (``tracing/encoder.py``,
``tests/test_encoder.py``):

- BertEmbeddings.forward (L69-109): word and token-type embeddings (the token-type ids: a gather of the zeros buffer,
  [1, s] int64, which the trained embedding saves) summed, plus the [1, s, h] position rows, LayerNorm (saves its
  input, an fp32 mean and rstd per row), dropout (a one-byte mask: CUDA's fused ``native_dropout``). The three
  embedding outputs live until the method returns.
- BertSelfAttention (L166-205) with ``eager_attention_forward`` (L112-137): query/key/value Linears (under autocast
  each casts the fp32 input to c for itself, and autocast caches each trained weight's and bias's c copy until
  forward ends: the weight copies are saved by the matmul); q·kᵀ (at b > 1 ``torch.matmul`` reshapes the transposed
  views into [b·a, s, d] copies, which bmm saves; at b = 1 the views themselves), ``* scaling``, softmax without a
  dtype (CUDA autocast makes it fp32: ``tracing/cuda_emulation.py`` item 6), dropout on the probabilities, probs·v
  (under autocast a c copy of the fp32 probabilities), the output's ``transpose(1, 2).contiguous()`` copy. The
  dropped-out probabilities are returned as ``attn_weights`` and live until BertLayer.forward returns (``_``).
  SDPA (``integrations/sdpa_attention.py``): CUDA's flash kernel for 16-bit inputs (no mask: full attention),
  memory-efficient for fp32; either saves q, k, v, its output (o's input, already [b, s, a, d]), an fp32
  logsumexp [b, a, s] and the philox seed and offset, with the dropout inside the kernel.
- BertSelfOutput / BertOutput (L283-294, L342-353): dense -> dropout -> LayerNorm(x + input): the sum is fp32 where
  the residual is (autocast promotes c + fp32), and LayerNorm saves it as it is. BertIntermediate (L327-339):
  dense -> GELU (``F.gelu`` saves its input).
- The pooler (L455-467) reads ``hidden_states[:, 0]``: in fp32 the dense saves that view, which keeps the last
  layer's whole output alive until its backward; under autocast it saves a [b, h] cast instead. Tensors of [b, h]
  and [b, num_labels] (tanh, dropout, the classifier, the loss) are left out: b·h·c bytes each.
- Backward follows autograd's engine (``torch/csrc/autograd/engine.cpp``): a node's outputs are made beside its
  inputs and saved tensors, which are then released; a higher sequence number runs first, so a Linear's cast of its
  input (made after its weight's and bias's casts: the autocast wrapper evaluates its arguments right to left) is
  undone before the weight gradient's ``ToCopyBackward``; a residual's two gradients are summed out of place
  (``InputBuffer::accumulate``); ``AddBackward0`` casts the fp32 gradient to a c input's dtype; a parameter's
  gradient becomes its ``.grad`` (with gradient accumulation it is added into the existing one and freed).
- The 2022 stacks (``Shape.softmax_saves_input``, ``Shape.extended_mask``): torch < 1.11's ``SoftmaxBackward0`` saves
  the softmax's input as well as its output (torch 1.10.0's generated ``Functions.h``: ``self_`` and ``result_``;
  1.11.0: ``self_scalar_type`` and ``result_``), freed when that node runs; transformers 4.x's BertModel adds its
  extended mask (``(1.0 - mask) * -10000.0`` in the parameters' dtype, [b, 1, 1, s], built from an all-ones mask
  too: 4.16.2 ``modeling_utils.py:306-307``, ``modeling_bert.py:957,969,327``) to the scaled scores, a new
  [b, a, s, s] of the wider dtype (fp32 under mixed precision), which the softmax then reads; its gradient is cast
  back to the scores' dtype by ``AddBackward0``.
- Checkpointing (transformers' GradientCheckpointingLayer on BertLayer): each layer keeps its input; its backward
  recomputes the layer's forward with grad (under its autocast state: new weight copies) before running it.
  ``reentrant`` (torch.utils.checkpoint with use_reentrant=True, transformers 4.x's default) holds the layer's
  output gradient and the recomputed output through the layer's backward (``CheckpointFunction.backward``);
  non-reentrant frees them as the plain backward does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..model import ModelSpec
from ..options import Attention, GradCkpt, Phase, Precision
from ..units import DType, maximum, round_up
from .activations import SEED_OFFSET_BYTES, Dtypes, Saved
from .layouts import LAYER_NORM_STATS

_F32 = DType.FP32.bytes
_IDS = 8  # int64 token ids
# kinds of tensor in a timeline and the term the trace gives each (tracing/tracker.py)
SAVED, MOVING, GRAD, COPY, CACHE, PARAM = "saved", "moving", "grad", "copy", "cache", "param"
_ACTIVATIONS = (SAVED, MOVING)  # autograd's saved tensors, and activations in flight (a layer's input and output)
_TEMPORARIES = (GRAD, COPY, CACHE)  # gradients of activations, autocast's weight copies and its cache


def _tok(n) -> Saved:
    return Saved(per_token=n)


def _sq(n) -> Saved:
    return Saved(per_square=n)


def _fixed(n) -> Saved:
    return Saved(per_layer=round_up(n))


class _Timeline:
    """Named tensors made and freed in order. After every ``make`` the live sizes by kind are recorded: the moments
    at which a stage's memory can peak (a free never raises it)."""

    def __init__(self, live: dict | None = None):
        self.live: dict[str, tuple[str, Saved]] = dict(live or {})
        self.points: list[dict[str, Saved]] = []

    def make(self, name: str, kind: str, size: Saved) -> None:
        self.live[name] = (kind, size)
        self.points.append(self.totals())

    def free(self, *names: str) -> None:
        for name in names:
            self.live.pop(name, None)

    def retag(self, name: str, kind: str) -> None:
        if name in self.live:
            self.live[name] = (kind, self.live[name][1])

    def totals(self) -> dict[str, Saved]:
        out: dict[str, Saved] = {}
        for kind, size in self.live.values():
            out[kind] = out.get(kind, Saved()) + size
        return out

    def of(self, *kinds: str) -> Saved:
        return sum((size for kind, size in self.live.values() if kind in kinds), Saved())


@dataclass(frozen=True)
class Shape:
    """What a timeline depends on besides the model: element bytes, attention, gradient accumulation and
    checkpointing."""

    c: int  # compute bytes: autocast's, else the parameters'
    r: int  # parameter bytes (their gradients')
    x: int  # the residual stream's bytes: LayerNorm's output, fp32 under CUDA autocast (an fp32 op), else r
    autocast: bool  # torch.autocast is on (mixed-*, and bf16/fp16: 16-bit parameters under autocast)
    copies: bool  # fp32 weights under 16-bit autocast: each Linear multiplies autocast's c copy of its weight
    attn: Attention  # the implementation used (sdpa covers flash: the same kernel on CUDA)
    accumulate: bool  # gradient accumulation: a new weight gradient is added into .grad and freed
    ckpt: GradCkpt
    # bf16 autocast: CUDA's fp32 softmax of a bf16 input runs on an fp32 copy; fp16's takes half_to_float
    # (``aten/src/ATen/native/SoftMax.cpp::softmax``)
    bf16: bool = False
    softmax_saves_input: bool = False  # torch < 1.11: SoftmaxBackward0 keeps its input too (``softmax_input``)
    extended_mask: bool = False  # transformers 4.x: the scores get the extended mask added (``masked``)

    @property
    def masked(self) -> int:
        """Bytes per element of the masked scores: the c scores plus a mask in the parameters' dtype (r) promote
        to the wider of the two."""
        return max(self.c, self.r)

    def softmax_input(self) -> tuple[str, int]:
        """The tensor ``_softmax`` reads and its element bytes: the masked scores (``extended_mask``), else the
        scaled ones; under bf16 autocast a 16-bit one's fp32 copy (``name + "32"``)."""
        name, size = ("masked", self.masked) if self.extended_mask else ("scaled", self.c)
        if self.autocast and self.bf16 and size != _F32:
            return name + "32", _F32
        return name, size

    @property
    def norm_copies(self) -> bool:
        """16-bit LayerNorm weights under autocast: CUDA's fp32 layer_norm casts them (and saves the fp32 copies)."""
        return self.autocast and self.r != _F32


def shape_of(dt: Dtypes, precision: Precision, attn_used: Attention, grad_accum: int, grad_ckpt: GradCkpt,
             softmax_saves_input: bool = False, extended_mask: bool = False) -> Shape:
    autocast = dt.autocast
    return Shape(c=dt.c, r=dt.r, x=_F32 if autocast else dt.r, autocast=autocast, copies=autocast and dt.r != dt.c,
                 attn=Attention.EAGER if attn_used is Attention.EAGER else Attention.SDPA,
                 accumulate=grad_accum > 1, ckpt=grad_ckpt, bf16=precision.compute_dtype is DType.BF16,
                 softmax_saves_input=softmax_saves_input, extended_mask=extended_mask)


def _linear(t: _Timeline, m: Shape, name: str, x: str, x_bytes: int, fan_in: int, fan_out: int, out: str,
            grad: bool = True, out_kind: str = MOVING, leaf_input: bool = False) -> None:
    """``nn.Linear`` with bias in forward: with fp32 weights under autocast its weight's and bias's c copies (cached
    until forward ends; with grad the weight's is saved by the matmul); under autocast an input of another dtype
    gets the Linear's own c cast (saved with grad, else freed after the matmul), or for a leaf that requires grad
    (``leaf_input``: the detached input of a reentrant checkpoint's recompute) one cached cast ``x.c`` that every
    Linear reading it shares (``autocast_mode.cpp::cached_cast`` caches leaves); an input already in c is saved as
    it is (``x`` retagged)."""
    if m.copies:
        t.make(f"{name}.w16", COPY, _fixed(m.c * fan_in * fan_out))
        t.make(f"{name}.b16", CACHE, _fixed(m.c * fan_out))
    if m.autocast and leaf_input:
        if "x.c" not in t.live:
            t.make("x.c", SAVED, _tok(m.c * fan_in))
    elif m.autocast and x_bytes != m.c:  # its own cast of an fp32 input
        t.make(f"{name}.x16", SAVED, _tok(m.c * fan_in))
    elif grad:
        t.retag(x, SAVED)
    t.make(out, out_kind if grad else MOVING, _tok(m.c * fan_out))
    if not grad:
        t.free(f"{name}.x16")
        t.retag(f"{name}.w16", CACHE)  # cached until forward ends, not saved


def _dropout(t: _Timeline, p: float, x: str, out: str, width: int, element_bytes: int, square: bool = False,
             grad: bool = True) -> str:
    """F.dropout in training: CUDA's native_dropout makes a one-byte mask (saved with grad) and its output; p = 0
    returns the input. Returns the output's name."""
    if not p:
        return x
    size = _sq if square else _tok
    t.make(f"{out}.mask", SAVED, size(width))
    t.make(out, MOVING, size(element_bytes * width))
    if not grad:
        t.free(f"{out}.mask")
    return out


def _layer_norm(t: _Timeline, m: Shape, name: str, x: str, x_bytes: int, out: str, width: int,
                grad: bool = True) -> None:
    """nn.LayerNorm: under autocast CUDA runs it in fp32, casting a 16-bit input (the cast is what it saves) and
    16-bit weight and bias (saved fp32 copies); it saves its input, its weight and bias and an fp32 mean and rstd
    per row, and returns r, or fp32 under autocast (``Shape.x``)."""
    kind = SAVED if grad else MOVING
    if m.autocast and x_bytes != _F32:
        t.make(f"{name}.x32", kind, _tok(_F32 * width))
    elif grad:
        t.retag(x, SAVED)
    if m.norm_copies:
        t.make(f"{name}.w32", kind, _fixed(_F32 * width))
        t.make(f"{name}.b32", kind, _fixed(_F32 * width))
    t.make(out, MOVING, _tok(m.x * width))
    t.make(f"{name}.stats", kind, _tok(LAYER_NORM_STATS * _F32))
    if not grad:
        t.free(f"{name}.x32", f"{name}.w32", f"{name}.b32", f"{name}.stats")


@functools.lru_cache(maxsize=256)
def layer_forward(model: ModelSpec, m: Shape, grad: bool = True, recompute: bool = False) -> _Timeline:
    """One BertLayer's forward from its input ``x`` (the residual stream) to its output ``y``. With grad, at the end
    the live SAVED tensors are what autograd keeps (``x`` among them where a Linear saves it as it is); without grad
    (the forward of a checkpointed layer) each tensor dies after its last use. ``recompute``: the checkpoint's
    recompute in backward, whose input is the kept one (counted by the caller: size 0 here) and whose autocast cache
    is cleared when it returns."""
    h, a, inter = model.hidden_size, model.num_heads, model.intermediate_size
    c, x = m.c, m.x
    t = _Timeline({"x": (MOVING, _tok(0 if recompute else x * h))})
    p_hidden, p_attention = model.hidden_dropout, model.attention_dropout
    batch_one = -c * h  # per_token_delta_at_batch_one of a reshape copy that is a view at b = 1
    saved = SAVED if grad else MOVING
    leaf = recompute and m.autocast and m.ckpt is GradCkpt.REENTRANT  # (CheckpointFunction's detached inputs)
    for name in ("q", "k", "v"):
        _linear(t, m, name, "x", x, h, h, name, grad, leaf_input=leaf)
    if m.attn is Attention.EAGER:
        # matmul(q, kᵀ): reshape copies at b > 1 (the originals live until BertSelfAttention returns), views at b = 1
        t.make("qc", saved, Saved(per_token=c * h, per_token_delta_at_batch_one=batch_one))
        t.make("kc", saved, Saved(per_token=c * h, per_token_delta_at_batch_one=batch_one))
        t.make("scores", MOVING, _sq(c * a))
        if not grad:
            t.free("qc", "kc")
        t.make("scaled", MOVING, _sq(c * a))
        t.free("scores")
        if m.extended_mask:  # 4.x: + the [b, 1, 1, s] extended mask (left out, as the [b, h] tensors are)
            t.make("masked", MOVING, _sq(m.masked * a))
            t.free("scaled")
        softmax_input, input_bytes = m.softmax_input()
        if softmax_input.endswith("32"):  # bf16's fp32 softmax runs on an fp32 copy (SoftMax.cpp::softmax)
            t.make(softmax_input, MOVING, _sq(_F32 * a))
        softmax = _F32 if m.autocast else input_bytes
        t.make("probs", saved, _sq(softmax * a))
        kept = softmax_input if m.softmax_saves_input and grad else None  # torch < 1.11's SoftmaxBackward0 saves self
        if kept:
            t.retag(kept, SAVED)
        t.free(*({"scaled", "masked", "scaled32", "masked32"} - {kept}))
        dropped = _dropout(t, p_attention, "probs", "dropped", a, softmax, square=True, grad=grad)
        if not grad and dropped != "probs":
            t.free("probs")
        if m.autocast:  # probs @ v: autocast's c copy of the fp32 probabilities
            t.make("dropped16", saved, _sq(c * a))
        elif grad:
            t.retag(dropped, SAVED)
        t.make("vc", saved, Saved(per_token=c * h, per_token_delta_at_batch_one=batch_one))
        t.make("context", MOVING, _tok(c * h))
        if not grad:
            t.free("vc", "dropped16")
        t.make("attended", saved, _tok(c * h))  # transpose(1, 2).contiguous(): o's input
        t.free("context")
        for name in ("q", "k", "v"):  # at b = 1 the views of the originals are what bmm saved
            if grad:
                t.live[name] = (SAVED, Saved(per_token_delta_at_batch_one=-batch_one))
            else:
                t.free(name)
    else:
        # flash (16-bit) or memory-efficient (fp32): q, k, v, the output [b, s, a, d], logsumexp, seed and offset
        t.make("attended", saved, _tok(c * h))
        t.make("lse", saved, _tok(_F32 * a))
        t.make("rng", saved, _fixed(SEED_OFFSET_BYTES))
        if grad:
            for name in ("q", "k", "v"):
                t.retag(name, SAVED)
        else:
            t.free("q", "k", "v", "lse", "rng")
    _linear(t, m, "o", "attended", c, h, h, "o", grad)
    do = _dropout(t, p_hidden, "o", "o.drop", h, c, grad=grad)
    if do != "o":
        t.free("o")
    # LayerNorm(dropout(o) + x): the sum is promoted to the stream's dtype; the dropout's output stays bound to
    # ``hidden_states`` in BertSelfOutput.forward until LayerNorm's result replaces it
    t.make("sum1", MOVING, _tok(x * h))
    _layer_norm(t, m, "ln1", "sum1", x, "y1", h, grad)
    t.free(do)
    if not grad:
        t.free("sum1", "attended")
    _linear(t, m, "up", "y1", x, h, inter, "u", grad, SAVED)  # GELU saves its input
    t.make("g", saved, _tok(c * inter))  # the GELU output, saved by output.dense
    if not grad:
        t.free("u")
    _linear(t, m, "down", "g", c, inter, h, "w", grad)  # (feed_forward_chunk keeps the GELU output to its end)
    dw = _dropout(t, p_hidden, "w", "w.drop", h, c, grad=grad)
    if dw != "w":
        t.free("w")
    t.make("sum2", MOVING, _tok(x * h))  # BertOutput.forward, as BertSelfOutput's
    _layer_norm(t, m, "ln2", "sum2", x, "y", h, grad)
    t.free(dw)
    if not grad:
        t.free("sum2")
    # BertLayer.forward returns: its input and the attention's output die unless saved, and so do the returned
    # attention weights and the GELU output; the biases' autocast copies stay cached until forward ends (a
    # recompute's, until it ends)
    for name in ("x", "y1", "dropped", "probs", "g"):
        if name in t.live and t.live[name][0] == MOVING:
            t.free(name)
    if recompute:
        t.free(*[name for name, (kind, _) in t.live.items() if kind == CACHE])
    return t


def layer_saved(model: ModelSpec, m: Shape) -> Saved:
    """What one layer's autograd keeps from forward to its backward (its input included where a Linear saves it as
    it is; the output is the next layer's input)."""
    return layer_forward(model, m).of(SAVED)


def _param_grad(t: _Timeline, m: Shape, name: str, numel: int, dtype_bytes: int) -> None:
    """A weight gradient as its op makes it: the .grad itself (PARAM) when it is in the parameter dtype and nothing
    accumulates, else a transient (GRAD): the gradient of a weight's fp32 or c copy, or one AccumulateGrad adds
    into the existing .grad."""
    t.make(name, PARAM if dtype_bytes == m.r and not m.accumulate else GRAD, _fixed(dtype_bytes * numel))


def _to_param(t: _Timeline, m: Shape, name: str, numel: int, cast: bool) -> None:
    """Where a weight gradient goes after its op: for a weight the op read through a copy (``cast``: autocast's c
    copy of an fp32 Linear weight, CUDA layer_norm's fp32 copy of a 16-bit one) the copy's ``ToCopyBackward`` makes
    the gradient in the parameter's dtype (the other freed); with accumulation AccumulateGrad adds it into .grad
    and frees it (it runs first of all ready nodes)."""
    if cast:
        _param_grad(t, m, name + ".r", numel, m.r)
        t.free(name)
        name = name + ".r"
    if m.accumulate:
        t.free(name)


def _linear_backward(t: _Timeline, m: Shape, name: str, fan_in: int, fan_out: int, grad_out: str, grad_in: str,
                     saved_input: str | None, accumulate_into: tuple[str, str] | None = None) -> None:
    """A biased Linear's backward (``AddmmBackward0``): the input's, the weight's and the bias's gradients beside its
    inputs; then its incoming gradient, saved input and weight copy are released; its own autocast cast of an fp32
    input is undone (``ToCopyBackward``, to the stream's dtype) before the weight's cast (it was made last); the
    input's gradient is summed into a residual's waiting one (``accumulate_into``: (waiting, sum)); then the weight's
    and the bias's gradients go to .grad (``_to_param``)."""
    c, r = m.c, m.r
    cast = f"{name}.x16" in t.live
    weight_bytes = c if m.copies else r
    t.make(grad_in, GRAD, _tok(c * fan_in))
    _param_grad(t, m, f"{name}.wgrad", fan_in * fan_out, weight_bytes)
    _param_grad(t, m, f"{name}.bgrad", fan_out, weight_bytes)
    t.free(grad_out, f"{name}.x16", f"{name}.w16", saved_input or "")
    if not m.copies and m.accumulate:  # AccumulateGrad runs first of the ready nodes
        t.free(f"{name}.wgrad", f"{name}.bgrad")
    if cast:
        t.make(grad_in + ".x", GRAD, _tok(m.x * fan_in))
        t.free(grad_in)
        grad_in = grad_in + ".x"
    if accumulate_into is not None:
        waiting, total = accumulate_into
        t.make(total, GRAD, _tok(m.x * fan_in))
        t.free(waiting, grad_in)
    if m.copies:
        _to_param(t, m, f"{name}.wgrad", fan_in * fan_out, cast=True)
        _to_param(t, m, f"{name}.bgrad", fan_out, cast=True)


def _layer_norm_backward(t: _Timeline, m: Shape, name: str, grad_out: str, grad_in: str, saved_input: str,
                         width: int) -> None:
    """native_layer_norm_backward: the input's gradient (fp32 under autocast, the dtype it ran in), the weight's and
    bias's (fp32 for copies of 16-bit ones, whose ``ToCopyBackward`` then makes the .grad); then the incoming
    gradient (unless held elsewhere: ``grad_out`` ""), the saved input, statistics and weight copies are released."""
    norm_bytes = _F32 if m.autocast else m.r
    t.make(grad_in, GRAD, _tok(norm_bytes * width))
    _param_grad(t, m, f"{name}.wgrad", width, norm_bytes)
    _param_grad(t, m, f"{name}.bgrad", width, norm_bytes)
    t.free(grad_out, saved_input, f"{name}.x32", f"{name}.stats", f"{name}.w32", f"{name}.b32")
    _to_param(t, m, f"{name}.wgrad", width, cast=m.norm_copies)
    _to_param(t, m, f"{name}.bgrad", width, cast=m.norm_copies)


def _residual_backward(t: _Timeline, m: Shape, p: float, grad: str, mask: str, out: str, width: int) -> str:
    """``AddBackward0`` of ``dropout(branch) + residual``: the residual keeps the gradient ``grad`` (in the stream's
    dtype, waiting for its other gradient); the branch gets it cast to c where the add promoted (autocast), then
    dropout's backward. Returns the branch's gradient, which its Linear's backward consumes."""
    source = grad
    if m.x != m.c:
        t.make(grad + ".c", GRAD, _tok(m.c * width))
        source = grad + ".c"
    if not p:
        if source == grad:  # one tensor feeds both: the Linear's backward must not release it
            t.live[out] = (GRAD, Saved())
            return out
        return source
    t.make(out, GRAD, _tok(m.c * width))
    t.free(source if source != grad else "", mask)
    return out


def layer_backward(model: ModelSpec, m: Shape, start: dict, holds_output_grad: bool = False) -> _Timeline:
    """One layer's backward from its saved tensors (``start``, a live set) and its output's gradient ``gy`` (in the
    stream's dtype) to its input's gradient ``gx``. ``holds_output_grad``: reentrant checkpointing keeps ``gy`` (and
    the recomputed output ``y``) until the layer is done."""
    h, a, inter = model.hidden_size, model.num_heads, model.intermediate_size
    c, x = m.c, m.x
    p_hidden, p_attention = model.hidden_dropout, model.attention_dropout
    t = _Timeline(start)
    t.make("gy", GRAD, _tok(x * h))
    # the MLP: LayerNorm 2, dropout, output.dense, GELU, intermediate.dense (its input's gradient summed with the
    # residual's into the attention output's)
    _layer_norm_backward(t, m, "ln2", "" if holds_output_grad else "gy", "gs2", "sum2", h)
    gw = _residual_backward(t, m, p_hidden, "gs2", "w.drop.mask", "gw", h)
    _linear_backward(t, m, "down", inter, h, gw, "gg", "g")
    t.make("gu", GRAD, _tok(c * inter))  # gelu_backward
    t.free("gg", "u")
    _linear_backward(t, m, "up", h, inter, "gu", "gy1", "y1", accumulate_into=("gs2", "gy1.sum"))
    # the attention block: LayerNorm 1, dropout, the output dense
    _layer_norm_backward(t, m, "ln1", "gy1.sum", "gs1", "sum1", h)
    go = _residual_backward(t, m, p_hidden, "gs1", "o.drop.mask", "go", h)
    _linear_backward(t, m, "o", h, h, go, "gattended", "attended")
    if m.attn is Attention.EAGER:
        t.make("gcontext", GRAD, _tok(c * h))  # the transposed gradient reshaped for bmm
        t.free("gattended")
        t.make("gv", GRAD, _tok(c * h))  # probs @ v's backward
        t.make("gdropped", GRAD, _sq(c * a))
        t.free("gcontext", "vc", "v", "dropped16" if m.autocast else "dropped")
        grad, softmax = "gdropped", _F32 if m.autocast else c
        if m.autocast:  # ToCopyBackward of the probabilities' c copy
            t.make("gdropped32", GRAD, _sq(_F32 * a))
            t.free(grad)
            grad = "gdropped32"
        if p_attention:
            t.make("gprobs", GRAD, _sq(softmax * a))
            t.free(grad, "dropped.mask")
            grad = "gprobs"
        # _softmax_backward_data in the input's dtype (freeing what SoftmaxBackward0 saved): fp16's half_to_float
        # softmax gives fp16 at once; bf16's ran on an fp32 copy, whose ToCopyBackward casts the fp32 gradient back;
        # the masked scores' AddBackward0 casts it to the c scores' dtype, or passes it on
        softmax_input, input_bytes = m.softmax_input()
        if input_bytes != c:
            t.make("g" + softmax_input, GRAD, _sq(input_bytes * a))
            t.free(grad, "probs", softmax_input)
            grad = "g" + softmax_input
        t.make("gscaled", GRAD, _sq(c * a))
        t.free(grad, "probs", softmax_input)  # (already freed above when the gradient took the input's dtype)
        t.make("gscores", GRAD, _sq(c * a))  # the scaling's backward
        t.free("gscaled")
        t.make("gq", GRAD, _tok(c * h))
        t.make("gk", GRAD, _tok(c * h))
        t.free("gscores", "qc", "kc", "q", "k")
    else:  # the SDPA kernel's backward: dq, dk, dv at once
        for name in ("gq", "gk", "gv"):
            t.make(name, GRAD, _tok(c * h))
        t.free("gattended", "q", "k", "v", "attended", "lse", "rng")
    waiting = "gs1"
    shared = "x.c" in t.live  # one cached cast of a leaf input feeds q, k and v (``_linear``)
    for index, name in enumerate(("q", "k", "v")):
        grad = f"g{name}"
        if m.attn is Attention.EAGER:  # the transposed view's gradient made contiguous for the view back to [b, s, h]
            t.make(grad + ".flat", GRAD, _tok(c * h))
            t.free(grad)
            grad = grad + ".flat"
        if not shared:
            _linear_backward(t, m, name, h, h, grad, f"gx.{name}", "x" if index == 2 else None,
                             accumulate_into=(waiting, f"gx{index}"))
            waiting = f"gx{index}"
            continue
        # the three c input gradients are summed in the shared cast's input buffer; after the last (v), its
        # ToCopyBackward gives the stream's gradient, summed with the residual's
        t.make(f"gx.{name}", GRAD, _tok(c * h))
        _param_grad(t, m, f"{name}.wgrad", h * h, c if m.copies else m.r)
        _param_grad(t, m, f"{name}.bgrad", h, c if m.copies else m.r)
        t.free(grad, f"{name}.w16", "x.c" if index == 2 else "")
        if not m.copies and m.accumulate:
            t.free(f"{name}.wgrad", f"{name}.bgrad")
        if index:
            t.make(f"gx.c{index}", GRAD, _tok(c * h))
            t.free(f"gx.c{index - 1}" if index > 1 else "gx.q", f"gx.{name}")
        if index == 2:
            t.make("gx.x", GRAD, _tok(x * h))
            t.free("gx.c2")
            t.make("gx0", GRAD, _tok(x * h))
            t.free("gs1", "gx.x")
            waiting = "gx0"
        if m.copies:
            _to_param(t, m, f"{name}.wgrad", h * h, cast=True)
            _to_param(t, m, f"{name}.bgrad", h, cast=True)
    t.live["gx"] = t.live.pop(waiting)
    if holds_output_grad:
        t.free("gy", "y")
    return t


@functools.lru_cache(maxsize=256)
def embedding_forward(model: ModelSpec, m: Shape) -> _Timeline:
    """BertEmbeddings.forward (trained): the token-type ids gathered from the zeros buffer ([1, s] int64, saved by
    their embedding; the position ids are a view of a buffer), the word and token-type embeddings and their sum, the
    [1, s, h] position rows and the second sum (saved by LayerNorm, or its fp32 cast under autocast with 16-bit
    parameters), LayerNorm, dropout; the three embedding outputs die when the method returns. Ends with the first
    layer's input ``x`` live."""
    h, r = model.hidden_size, m.r
    t = _Timeline()
    t.make("type_ids", SAVED, Saved(per_position=_IDS))
    t.make("word", MOVING, _tok(r * h))
    t.make("type", MOVING, _tok(r * h))
    t.make("sum", MOVING, _tok(r * h))
    t.make("position", MOVING, Saved(per_position=r * h))
    t.make("sum2", MOVING, _tok(r * h))
    t.free("sum")
    _layer_norm(t, m, "norm", "sum2", r, "norm", h)
    if t.live["sum2"][0] == MOVING:  # (a cast was saved: the sum dies with ``embeddings``'s rebinding)
        t.free("sum2")
    x = _dropout(t, model.hidden_dropout, "norm", "drop", h, m.x)
    t.free("word", "type", "position")
    if x != "norm":
        t.free("norm")
    t.live["x"] = t.live.pop(x)
    return t


def _embedding_rows(model: ModelSpec) -> tuple[int, int, int]:
    """Rows of the word, position and token-type tables."""
    return model.vocab_size, model.max_position_embeddings, model.type_vocab_size


@functools.lru_cache(maxsize=256)
def embedding_backward(model: ModelSpec, m: Shape) -> _Timeline:
    """The embeddings' backward from the first layer's input gradient ``gx``: dropout's, LayerNorm's (and, for an
    fp32 cast of a 16-bit input, that cast's), the position rows' gradient summed over the batch (a new [1, s, h]
    unless b = 1), then each table's ``embedding_dense_backward`` (a dense [rows, h] gradient: position, token type,
    word, in backward order), the LayerNorm's gradient held until the last of them."""
    h, r = model.hidden_size, m.r
    start = {name: entry for name, entry in embedding_forward(model, m).live.items() if entry[0] == SAVED}
    t = _Timeline(start)
    t.make("gx", GRAD, _tok(m.x * h))
    grad = "gx"
    if model.hidden_dropout:
        t.make("gdrop", GRAD, _tok(m.x * h))
        t.free("gx", "drop.mask")
        grad = "gdrop"
    cast = "norm.x32" in t.live
    _layer_norm_backward(t, m, "norm", grad, "gnorm", "sum2", h)
    if cast:  # ToCopyBackward of LayerNorm's fp32 cast of the 16-bit sum
        t.make("gnorm.r", GRAD, _tok(r * h))
        t.free("gnorm")
        t.live["gnorm"] = t.live.pop("gnorm.r")
    t.make("gposition", GRAD, Saved(per_position=r * h, per_token_delta_at_batch_one=-r * h))
    words, positions, types = _embedding_rows(model)
    _param_grad(t, m, "position.grad", positions * h, r)
    t.free("gposition")
    _to_param(t, m, "position.grad", positions * h, cast=False)  # (F.embedding is not autocast)
    _param_grad(t, m, "type.grad", types * h, r)
    t.free("type_ids")
    _to_param(t, m, "type.grad", types * h, cast=False)
    _param_grad(t, m, "word.grad", words * h, r)
    t.free("gnorm")
    _to_param(t, m, "word.grad", words * h, cast=False)
    return t


@functools.lru_cache(maxsize=256)
def head_forward(model: ModelSpec, m: Shape) -> _Timeline:
    """BertPooler's dense on ``hidden_states[:, 0]``, tanh, dropout and the classifier, from the last layer's output
    ``y``: without autocast the dense saves that [b, h] view, which keeps all of ``y``; under autocast it saves a
    [b, h] cast and ``y`` dies when the model returns; the autocast copies of fp32 weights (the [b, h] and
    [b, labels] tensors are left out: module docstring)."""
    h, labels = model.hidden_size, model.score_labels
    t = _Timeline({"y": (MOVING, _tok(m.x * h))})
    if m.copies:
        t.make("pooler.w16", COPY, _fixed(m.c * h * h))
        t.make("pooler.b16", CACHE, _fixed(m.c * h))
        t.make("classifier.w16", COPY, _fixed(m.c * labels * h))
        t.make("classifier.b16", CACHE, _fixed(m.c * labels))
        t.free("pooler.b16", "classifier.b16")
    if m.autocast:
        t.free("y")
    else:
        t.retag("y", SAVED)
    return t


@functools.lru_cache(maxsize=256)
def head_backward(model: ModelSpec, m: Shape) -> _Timeline:
    """The loss's and classifier's backward, the pooler dense's (its weight's and bias's gradients, the saved view of
    the last output released) and ``select_backward``: the last layer's output gradient, a zero [b, s, h] tensor in
    the stream's dtype with the first token's rows filled (``gy``)."""
    h, labels = model.hidden_size, model.score_labels
    t = _Timeline({name: entry for name, entry in head_forward(model, m).live.items() if entry[0] in (SAVED, COPY)})
    for name, fan_in, fan_out in (("classifier", h, labels), ("pooler", h, h)):
        _param_grad(t, m, f"{name}.wgrad", fan_in * fan_out, m.c if m.copies else m.r)
        _param_grad(t, m, f"{name}.bgrad", fan_out, m.c if m.copies else m.r)
        t.free(f"{name}.w16", "y" if name == "pooler" else "")
        if not m.copies and m.accumulate:
            t.free(f"{name}.wgrad", f"{name}.bgrad")
        if m.copies:
            _to_param(t, m, f"{name}.wgrad", fan_in * fan_out, cast=True)
            _to_param(t, m, f"{name}.bgrad", fan_out, cast=True)
    t.make("gy", GRAD, _tok(m.x * h))
    return t


class Parts:
    """A moment's bytes as the timelines split them: activations, temporaries (gradients of activations, weight
    copies), the parameters' gradients. All ``Saved`` (evaluated at the batch shape)."""

    __slots__ = ("activations", "temporaries", "gradients")

    def __init__(self, activations=Saved(), temporaries=Saved(), gradients=Saved()):
        self.activations, self.temporaries, self.gradients = activations, temporaries, gradients

    def __add__(self, other: "Parts") -> "Parts":
        return Parts(self.activations + other.activations, self.temporaries + other.temporaries,
                     self.gradients + other.gradients)

    def __mul__(self, n: int) -> "Parts":
        return Parts(self.activations * n, self.temporaries * n, self.gradients * n)

    @staticmethod
    def of(point: dict) -> "Parts":
        def part(kinds):
            return sum((point[k] for k in kinds if k in point), Saved())
        return Parts(part(_ACTIVATIONS), part(_TEMPORARIES), part((PARAM,)))


@functools.lru_cache(maxsize=256)
def step_points(model: ModelSpec, m: Shape) -> tuple[tuple[Phase, Parts], ...]:
    """Every candidate moment of one step, as (phase, its bytes beyond the weights, the optimizer states and, with
    gradient accumulation, the accumulated gradients): the embeddings' and the last layer's forward, the head's,
    the backward of the last and of the first layer (the held activations fall and the gradients grow linearly along
    the layers, so the two ends bound the rest), the embeddings' backward. Without accumulation the parameters'
    gradients are those the stages before made (whole) plus what the stage has made so far."""
    L, h, x = model.num_layers, model.hidden_size, m.x
    ckpt = bool(m.ckpt)
    reentrant = m.ckpt is GradCkpt.REENTRANT
    # the batch's input ids, alive through the step, and its labels ([b] int64: one 512-byte block)
    ids = Parts(activations=Saved(per_token=_IDS, per_layer=round_up(_IDS)))
    embedding = Parts(embedding_forward(model, m).of(SAVED))
    forward = layer_forward(model, m)
    saved, copies, cached = forward.of(SAVED), forward.of(COPY), forward.of(CACHE)
    kept_input = Parts(Saved(per_token=x * h))
    # BertModel.forward keeps the embeddings' output (``embedding_output``) until it returns: beside every layer's
    # forward where the first layer does not save it as it is (autocast; checkpointing keeps it anyway)
    held_input = kept_input if m.autocast and not ckpt else Parts()
    kept = (kept_input + Parts(temporaries=copies + cached)) if ckpt else Parts(saved, copies + cached)
    points: list[tuple[Phase, Parts]] = []
    for point in embedding_forward(model, m).points:
        points.append((Phase.FORWARD, ids + Parts.of(point)))
    before_last = ids + embedding + kept * (L - 1) + (held_input if L > 1 else Parts())
    for point in layer_forward(model, m, grad=not ckpt).points:
        points.append((Phase.FORWARD, before_last + Parts.of(point)))
    ended = ids + embedding + kept * L + held_input  # (the head's timeline holds the last layer's output)
    for point in head_forward(model, m).points:
        points.append((Phase.FORWARD, ended + Parts.of(point)))
    # backward: autocast's bias cache went with forward; each layer holds its saved tensors (or its input)
    held = kept_input if ckpt else Parts(saved, copies)
    head = head_backward(model, m)
    for point in head.points:
        points.append((Phase.BACKWARD_START, ids + embedding + held * L + Parts.of(point)))
    head_grads = Parts(gradients=head.of(PARAM))
    layer_grads = Parts()
    for index in (L - 1, 0) if L > 1 else (0,):
        below = ids + embedding + held * index + head_grads + layer_grads * (L - 1 - index)
        if ckpt:  # this layer's kept input (in ``below``), then its recompute beside the output's gradient
            below = below + kept_input
            recomputed = layer_forward(model, m, grad=True, recompute=True)
            for point in recomputed.points:
                points.append((Phase.BACKWARD, below + Parts.of(point) + Parts(temporaries=Saved(per_token=x * h))))
            start = {name: entry for name, entry in recomputed.live.items()
                     if entry[0] in (SAVED, COPY) or (reentrant and name == "y")}
        else:
            start = {name: entry for name, entry in forward.live.items() if entry[0] in (SAVED, COPY)}
        backward = layer_backward(model, m, start, holds_output_grad=reentrant)
        for point in backward.points:
            points.append((Phase.BACKWARD, below + Parts.of(point)))
        layer_grads = Parts(gradients=backward.of(PARAM))
    for point in embedding_backward(model, m).points:
        points.append((Phase.BACKWARD_END, ids + head_grads + layer_grads * L + Parts.of(point)))
    return tuple(points)


def buffer_bytes(model: ModelSpec) -> int:
    """BertEmbeddings' position_ids and token_type_ids buffers, [1, P] int64 each (not parameters: no gradient)."""
    return 2 * round_up(_IDS * (model.max_position_embeddings or 0))


def input_ids_bytes(batch_size, seq_len):
    """The batch's int64 input ids, alive through the step."""
    return _IDS * batch_size * seq_len


def largest_layer_request_bytes(model: ModelSpec, m: Shape, batch_size, seq_len):
    """The largest block one layer's forward requests (the caching allocator's segment size for the weight gradients
    that need one of their own: ``runtime.fresh_gradient_segment_bytes``): the GELU's [T, I] in c, the residual
    stream's [T, h], and eager attention's [b, a, s, s] probabilities."""
    tokens = batch_size * seq_len
    largest = maximum(tokens * model.intermediate_size * m.c, tokens * model.hidden_size * m.x)
    if m.attn is Attention.EAGER:
        softmax = _F32 if m.autocast else m.c
        largest = maximum(largest, softmax * batch_size * model.num_heads * seq_len * seq_len)
    return largest
