"""fp8 training as torchao's float8 recipe allocates it: the transient fp8 casts of a ``Float8Linear``.

Recipe modelled (``--precision fp8``): ``torchao.float8.convert_to_float8_training(model, config=Float8LinearConfig())``
with the default "tensorwise" recipe (dynamic scaling, one fp32 scale per tensor, e4m3 for input and weight, e5m2
for grad_output), eager mode (no ``torch.compile``, as HF Trainer runs by default), torchao 0.18. The module filter
is torchao README's: every ``nn.Linear`` of the decoder layers whose in and out features are both multiples of 16
(the fp8 GEMM's hardware rule, ``float8_linear_utils._auto_filter_for_tensorwise``); ``lm_head`` is excluded, as
torchtitan's ``float8.filter_fqns=["output"]`` does, and so are LoRA adapters and the v5 3-D expert tensors and
routers (not ``nn.Linear``; torchao converts MoE experts only through its separate MoE training API).

What differs from bf16, from ``torchao/float8/float8_linear.py::matmul_with_hp_or_float8_args``:
  * weights, gradients and optimizer states: unchanged. ``Float8Linear.from_float`` keeps ``mod.weight`` (bf16 in a
    bf16 model); no fp8 copy of a weight outlives one matmul.
  * saved activations: unchanged. ``forward`` calls ``ctx.save_for_backward(input_hp, weight_hp_t)``: the
    high-precision input and weight, exactly what ``nn.Linear`` saves; the fp8 casts are made again in backward.
  * transients: each cast ``hp_tensor_to_float8_dynamic`` (``float8_scaling_utils.py``) takes ``amax =
    max(abs(x))`` (a bf16 copy, freed before the next step), then ``_ToFloat8ConstrFunc.forward`` makes
    ``x.to(float32) * scale`` (4 bytes per element, kept in a local until the cast returns), ``to_fp8_saturated``
    clamps it (another 4 bytes per element, ``float8_utils.py``) and converts it (1 byte per element): a cast of n
    elements peaks at 9·n bytes above what it leaves, and leaves n bytes plus a 4-byte fp32 scale.
    Backward casts, in order, for a Linear of in K, out N over T tokens: grad_output (dim0, kept), the weight
    (kept), the bf16 grad_input matmul (also made by nn.Linear), grad_output again (dim1: a separate cast under
    tensorwise scaling), the saved input (kept), the grad_weight matmul. The largest fp8 bytes alive beyond what
    ``nn.Linear``'s own backward holds at the same point are ``linear_backward_cast_bytes``.
The forward casts (9·T·K for the input, 9·K·N for the weight, freed when the matmul returns) fall while the
activations are still growing, below the loss's peak; they are not modelled. Rowwise scaling ("rowwise" recipe:
fp32 scales per row, grad_output cast per axis) is not modelled.
"""

from __future__ import annotations

from ..model import LinearModule, ModelSpec
from ..options import Precision
from ..units import maximum

FP8_BYTES = 1  # torch.float8_e4m3fn / float8_e5m2
SCALE_BYTES = 4  # one fp32 scale per tensor (tensorwise)
CAST_PEAK_BYTES_PER_ELEMENT = 4 + 4 + FP8_BYTES  # fp32 scaled copy, fp32 clamped copy, the fp8 result
FP8_ALIGNMENT = 16  # in and out features must be multiples of 16 (fp8 GEMM; torchao's auto filter)


def converted_linears(spec: ModelSpec) -> tuple[LinearModule, ...]:
    """The decoder ``nn.Linear`` modules ``convert_to_float8_training`` swaps for ``Float8Linear`` under the recipe
    above: in and out features multiples of 16 (lm_head, experts and routers are not in ``inventory.linears``)."""
    return tuple(module for module in spec.inventory.linears
                 if module.in_features % FP8_ALIGNMENT == 0 and module.out_features % FP8_ALIGNMENT == 0)


def cast_peak_bytes(numel):
    """Bytes alive while one tensor of ``numel`` elements is cast to fp8, above the high-precision input:
    9·n (fp32 ``x.to(float32) * scale``, fp32 ``clamp``, the fp8 result) plus its fp32 scale."""
    return CAST_PEAK_BYTES_PER_ELEMENT * numel + SCALE_BYTES


def cast_kept_bytes(numel):
    """Bytes one finished fp8 cast keeps: n bytes of e4m3/e5m2 plus its fp32 scale."""
    return FP8_BYTES * numel + SCALE_BYTES


def linear_backward_cast_bytes(module: LinearModule, tokens):
    """The largest fp8 cast bytes alive during one ``Float8Linear``'s backward, beyond ``nn.Linear``'s own:

        max(9·T·N,                          casting grad_output (dim0)
            T·N + 9·K·N,                    casting the weight for grad_input
            T·N + K·N + 9·T·N,              casting grad_output again (dim1), beside the bf16 grad_input
            2·T·N + K·N + 9·T·K)            casting the saved input for grad_weight
        (+ 4 bytes per fp32 scale alive), with K in_features, N out_features, T tokens. The two kept grad_output
    casts, the weight's and the input's (2·T·N + K·N + T·K) are alive during the grad_weight matmul too, below the
    last line. Elementwise when ``tokens`` is a numpy array. Source: ``matmul_with_hp_or_float8_args.backward``."""
    K, N, T = module.in_features, module.out_features, tokens
    go_dim0 = cast_peak_bytes(T * N)
    weight = cast_kept_bytes(T * N) + cast_peak_bytes(K * N)
    go_dim1 = cast_kept_bytes(T * N) + cast_kept_bytes(K * N) + cast_peak_bytes(T * N)
    inputs = 2 * cast_kept_bytes(T * N) + cast_kept_bytes(K * N) + cast_peak_bytes(T * K)
    return maximum(maximum(go_dim0, weight), maximum(go_dim1, inputs))


def layer_backward_cast_bytes(spec: ModelSpec, precision: Precision, tokens):
    """fp8 backward cast bytes of one decoder layer: the largest ``linear_backward_cast_bytes`` among its converted
    Linears (attention, dense MLP or shared experts); 0 unless ``precision`` is fp8. The estimate adds it to each
    half-layer's backward transients: an upper bound, taking the widest Linear's casts as coinciding with the rest
    of that half's backward transients (for the attention half too, whose own Linears are narrower)."""
    if precision is not Precision.FP8:
        return 0
    out = 0
    for module in converted_linears(spec):
        out = maximum(out, linear_backward_cast_bytes(module, tokens))
    return out
