"""What a decoder layer keeps of its attention output and fused qkv projection, against the trace.

o_proj's input is the attention output, or a contiguous copy of it (eager attention; the flash kernel on a fused
qkv's head-major query). That tensor is kept only where o_proj saves it itself: a LoRA o_proj whose adapter casts
its input (an fp32 adapter, peft ``lora/layer.py`` ``_cast_input_dtype``) saves the cast, and the copy dies after
o_proj. In the first layer under LoRA on o_proj alone no gradient flows through the attention, which then saves
nothing, so o_proj's adapter saves the output itself. Each of these was off by one [T, a*d] tensor per layer (phi-3-mini,
LoRA on all linears, fp16, b=2, s=2048: +2.3%).
"""

import pytest

from vramcalc.options import Term

from .conftest import needs_torch
from .tiny_models import TINY
from .trace_helpers import estimated_and_traced

pytestmark = [needs_torch, pytest.mark.trace]

CASES = [
    (TINY["phi3"], dict(seq_len=256, method="lora", lora_targets="o_proj")),
    (TINY["phi3"], dict(seq_len=256, method="lora", lora_targets="o_proj", precision="bf16-true")),
    (TINY["phi3"], dict(seq_len=256, method="lora", lora_targets="all-linear", precision="fp16")),
    (TINY["phi3"], dict(seq_len=256, method="lora", lora_targets="o_proj", adapter_dtype="bf16")),
    (TINY["llama"], dict(seq_len=256, method="lora", lora_targets="o_proj", adapter_dtype="bf16")),
    (TINY["llama"], dict(seq_len=256, method="lora", lora_targets="o_proj", attn="eager")),
]


@pytest.mark.parametrize("spec, options", CASES,
                         ids=[f"{s.name}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for s, o in CASES])
def test_o_proj_input_and_fused_qkv_are_kept_as_the_trace_keeps_them(spec, options):
    peak, traced = estimated_and_traced(spec, **options)
    assert traced.phase == peak.phase
    assert abs(peak.activations - traced.terms[Term.ACTIVATIONS]) <= 0.002 * traced.terms[Term.ACTIVATIONS]
