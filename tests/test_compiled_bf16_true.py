"""torch.compile without autocast (bf16-true): the compiled loss's backward and eager attention's saved softmax.

- The compiled cross-entropy's backward kernel writes the c logits' gradient beside the saved c logits: inductor
  allocates a kernel's outputs before the launch and writes into an input's buffer only when it is donated
  (``_inductor/codegen/wrapper.py::can_reuse``), which AOTAutograd never makes a saved tensor aliasing a forward
  input or output (``collect_fw_donated_buffer_idxs``). The trace's fused kernel released its inputs first (gemma-2b
  LoRA compile eager selective bf16-true b=2 s=2048 was +12.42%: logits counted 2·c·T·V, traced c·T·V).
- Compiled eager attention keeps the 16-bit scores and the softmax's fp32 row max and sum, not the fp32
  probabilities (llama-3.2-1b LoRA compile eager bf16-true s=512: +7.0%).
"""

import pytest

from vramcalc.options import Term

from .conftest import needs_torch
from .trace_helpers import estimated_and_traced

pytestmark = [needs_torch, pytest.mark.trace]

# real sizes (fake tensors): on the tiny models a fixed few MB of the compiled trace outweigh the logits
CASES = [
    ("llama-3.2-1b", dict(seq_len=256, method="lora", precision="bf16-true", compile=True)),
    ("llama-3.2-1b", dict(seq_len=256, batch_size=2, method="lora", precision="bf16-true", compile=True,
                          attn="eager")),
    ("qwen3-0.6b", dict(seq_len=256, method="lora", precision="bf16-true", compile=True, attn="eager",
                        grad_ckpt="selective")),
]


@pytest.mark.parametrize("name, options", CASES,
                         ids=[f"{s}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for s, o in CASES])
def test_compiled_loss_gradient_sits_beside_its_saved_logits(name, options):
    from vramcalc.catalogue import get_model

    peak, traced = estimated_and_traced(get_model(name), **options)
    assert traced.phase == peak.phase
    assert abs(peak.logits - traced.terms[Term.LOGITS]) <= 0.001 * traced.terms[Term.LOGITS]
    assert abs(peak.tensor_bytes - sum(traced.terms.values())) <= 0.001 * sum(traced.terms.values())
