"""The trace's 4-bit layer (bitsandbytes' own quantize_4bit and MatMul4Bit around a plain Parameter) allocates what a
real ``bnb.nn.Linear4bit`` allocates, on real CPU tensors."""

import pytest

from .conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.trace]


def _live_after_forward_backward(layer, x):
    from vramcalc.tracing.cuda_emulation import cuda_kernel_emulation
    from vramcalc.tracing.tracker import AllocationTracker

    tracker = AllocationTracker(round_to=1)
    with tracker, cuda_kernel_emulation(sdpa=False):
        y = layer(x)
        forward_peak = tracker.peak.total_bytes
        y.float().sum().backward()
    return forward_peak, tracker.peak.total_bytes


@pytest.mark.parametrize("tokens", [512, 2048])  # below and above bitsandbytes' 1536-row dequantize threshold
@pytest.mark.parametrize("double_quant", [True, False])
def test_stand_in_layer_matches_a_real_linear4bit(tokens, double_quant):
    import bitsandbytes as bnb
    import torch
    from torch import nn

    from vramcalc.options import Quant
    from vramcalc.tracing.qlora import _quantized_template, fake_linear4bit_class, materialise_quant_states

    torch.manual_seed(0)
    dense = nn.Linear(512, 1024, bias=False, dtype=torch.bfloat16)
    real = bnb.nn.Linear4bit(512, 1024, bias=False, compute_dtype=torch.bfloat16, compress_statistics=double_quant,
                             quant_type="nf4")
    real.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, compress_statistics=double_quant,
                                    quant_type="nf4")._quantize("cpu")
    with torch.device("meta"):
        meta_dense = nn.Linear(512, 1024, bias=False, dtype=torch.bfloat16)
        template = _quantized_template((1024, 512), torch.bfloat16, Quant.NF4.value, double_quant)
        stand_in = fake_linear4bit_class()(meta_dense, template, "nf4", double_quant, torch.bfloat16)
    stand_in = stand_in.to_empty(device="cpu")
    wrapper = nn.Sequential(stand_in)
    materialise_quant_states(wrapper)

    # the same stored bytes: packed weight and quantization state
    def stored(layer):
        state = layer.weight.quant_state
        tensors = [layer.weight, state.absmax, state.code]
        if state.state2 is not None:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        return sum(t.numel() * t.element_size() for t in tensors)

    assert stored(stand_in) == stored(real)
    x = torch.randn(tokens, 512, dtype=torch.bfloat16, requires_grad=True)
    assert _live_after_forward_backward(stand_in, x) == _live_after_forward_backward(real, x.detach().requires_grad_())
