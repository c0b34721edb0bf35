"""Saved tensors of the layers of a hybrid model that are not attention: LFM2's gated short convolution (a mixin of
``activations._LayerWalk``, which calls it for the layers whose ``layer_types`` entry is "conv").

Symbols as in ``activations``: h hidden, K the convolution's taps (conv_L_cache), c compute bytes (the autocast
dtype), r the parameter dtype's bytes, T = b·s tokens. ``Lfm2ShortConv.forward`` (transformers 5.25
``models/lfm2/modeling_lfm2.py`` L398-415, with the pure-torch ``causal_conv1d_fn`` L293-313 that training takes:
the cached-decode kernels run only with a cache)::

    BCx = in_proj(x).transpose(-1, -2); B, C, x = BCx.chunk(3, dim=-2)   # three views of one [b, 3h, s] output
    Bx = B * x                                                          # saves B and x
    out = F.conv1d(Bx.to(weight.dtype), weight.unsqueeze(1), bias, padding=K - 1, groups=h)[:, :, :s]
    y = C * out.to(Bx.dtype)                                            # saves C and out
    out_proj(y.transpose(-1, -2).contiguous())

Attention layers have a KV cache; these have a conv state (``serving``). Each rule below is checked against the
trace (``tests/test_hybrid_lfm2.py``).
"""

from __future__ import annotations

from ..units import DType

_F32 = DType.FP32.bytes


def gated_projection_saved_per_token(width: int, out_bytes: int) -> int:
    """in_proj's [T, 3h] output, pinned whole while a gradient flows: ``B * x`` saves its views B and x, ``C * out``
    saves C (modeling_lfm2.py L406-412). Formula: ``3·h·out`` bytes per token, ``out`` the in_proj output's
    element size (c under autocast)."""
    return 3 * width * out_bytes


def conv_input_saved_per_token(width: int, conv_in_bytes: int) -> int:
    """The depthwise Conv1d's input, saved by ``aten.convolution`` for the weight gradient and the input gradient:
    ``B * x`` cast to the weight's dtype (``hidden_states.to(weight.dtype)``, L305), and under autocast the
    convolution's own cast to the compute dtype (conv1d is a lower-precision autocast op). Formula: ``h·e`` per
    token, ``e`` = c under autocast, else the weight's bytes r."""
    return width * conv_in_bytes


def conv_output_saved_per_token(width: int, out_bytes: int) -> int:
    """The convolution's output, saved by ``C * out`` (L412): ``h·e`` per token in the input's dtype (``.to`` of
    L313 is a no-op when the convolution ran in that dtype). The view ``[:, :, :s]`` pins the padded [b, h, s + K -
    1] output: the (K - 1)·h·e bytes per sequence and layer are left out (0.4% of this term at s = 512, K = 3)."""
    return width * out_bytes


def conv_weight_copy_bytes(width: int, kernel: int, c: int, r: int, autocast: bool) -> int:
    """Per layer: under autocast with a weight of another dtype, conv1d casts ``weight.unsqueeze(1)`` (a view, so
    autocast's leaf-weight cache does not apply) to a new [h, 1, K] tensor that the convolution saves: ``h·K·c``."""
    return width * kernel * c if autocast and r != c else 0


class ShortConvWalk:
    """Mixed into ``activations._LayerWalk``: ``short_conv`` walks one Lfm2ShortConv. Uses the walk's ``m``, ``dt``,
    ``grad``, ``full``, ``per_token``, ``per_layer``, ``linears`` and ``use``."""

    conv = False  # set by the walk's caller for the layers that run the convolution instead of attention

    def short_conv(self, n: int) -> int:
        """The convolution block on the operator norm's output (``n`` bytes per element); returns out_proj's
        output bytes per element."""
        m, dt = self.m, self.dt
        h = m.hidden_size
        bcx = self.linears([self.use("in_proj", h)], n)
        if self.grad or self.full:  # the conv weight trains in full fine-tuning: the convolution saves its input
            self.grad = True
            self.per_token += gated_projection_saved_per_token(h, bcx)
            self.per_token += conv_input_saved_per_token(h, dt.c if dt.autocast else dt.r)
            self.per_token += conv_output_saved_per_token(h, bcx)
            self.per_layer += conv_weight_copy_bytes(h, m.conv_kernel, dt.c, dt.r, dt.autocast)
        # y.transpose(-1, -2).contiguous(): a new [T, h] tensor, saved by out_proj when it trains or has an adapter
        return self.linears([self.use("conv.out_proj", h)], bcx)
