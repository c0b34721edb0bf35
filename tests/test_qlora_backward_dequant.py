"""QLoRA's backward dequantizes each 4-bit weight at any sequence length, one MLP or attention Linear at a time.

``MatMul4Bit.backward`` (bitsandbytes ``autograd/_functions.py``) computes the input gradient as
``torch.matmul(grad_output, F.dequantize_4bit(B, ctx.state).to(grad_output.dtype))``: the whole weight in the compute
dtype, whatever the token count (only the forward's fused ``gemm_4bit`` kernel avoids it below 1536 tokens). down's
backward holds it beside down's input gradient; up's comes after mul's has freed its input gradient and its two saved
[T, I] inputs; the attention's backward dequantizes its own projections. With the loss's tensors gone before the
layers' backward (``--loss fused``) that is the peak: llama-3.2-1b QLoRA all-linear r32 selective-op fused s=256 was
-1.82% (fuzz33 #19; the dequantized weight counted only above 1536 tokens).
"""

import pytest

from vramcalc.options import Phase

from .conftest import needs_torch
from .trace_helpers import estimated_and_traced

pytestmark = [needs_torch, pytest.mark.trace]

CASES = [
    dict(seq_len=256, method="qlora", loss="fused"),
    dict(seq_len=1024, method="qlora", loss="fused", precision="bf16-true"),
    dict(seq_len=256, method="qlora", loss="fused", grad_ckpt="selective-op", lora_targets="all-linear", lora_rank=32),
]


@pytest.mark.parametrize("options", CASES, ids=["-".join(f"{k}={v}" for k, v in o.items()) for o in CASES])
def test_qlora_backward_dequantizes_below_the_fused_kernel_threshold(options):
    # a real size (fake tensors): the dequantized [I, h] weight is a visible part of the layer's backward
    from vramcalc.catalogue import get_model

    peak, traced = estimated_and_traced(get_model("llama-3.2-1b"), **options)
    assert traced.phase is Phase.BACKWARD and peak.phase is Phase.BACKWARD
    assert abs(peak.tensor_bytes - sum(traced.terms.values())) <= 0.001 * sum(traced.terms.values())


def test_a_layernorm_familys_fp32_inputs_hold_the_dequantized_weight_and_its_fp32_cast():
    """Under bf16 autocast OPT's LayerNorm hands its 4-bit fc1 an fp32 input, ``Linear4bit.set_compute_type``
    computes in fp32, and the backward's ``dequantize_4bit(B, state).to(grad_output.dtype)`` keeps the bf16 weight
    and its fp32 cast at once: 6 bytes per weight of fc1 [16384, 4096] (the session-34 grid row opt-6.7b QLoRA with
    checkpointing was -3.6%)."""
    from vramcalc.catalogue import get_model

    peak, traced = estimated_and_traced(get_model("opt-6.7b"), seq_len=512, method="qlora", grad_ckpt=True)
    total = sum(traced.terms.values())
    assert traced.phase is Phase.BACKWARD
    assert abs(peak.tensor_bytes / total - 1) < 0.01
