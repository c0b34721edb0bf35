"""A chunked loss under 16-bit autocast with a frozen fp32 lm_head: one autocast copy of the head per chunk.

``chunked_cross_entropy`` calls ``F.linear(hidden_chunk, weight)`` once per chunk. autocast caches the 16-bit copy of
a weight only when it requires grad (ATen ``autocast_mode.cpp::cached_cast``), so a frozen head (LoRA, QLoRA's
kbit-prepared head, prompt tuning under mixed-*) is cast again by every chunk, and every chunk's F.linear saves its
copy until that chunk's backward: CHUNKED_LOSS_CHUNKS copies at backward start. olmo-2-0425-1b, LoRA, mixed-fp16,
chunked loss, s=4096 was -19.8% (one copy counted, eight traced: -2.88 GB of temporaries).
"""

import pytest

from vramcalc.options import Term

from .conftest import needs_torch
from .trace_helpers import estimated_and_traced

pytestmark = [needs_torch, pytest.mark.trace]

CASES = [
    ("smollm2-135m", dict(seq_len=256, method="lora", precision="mixed-bf16", loss="chunked")),  # tied head
    ("qwen2.5-0.5b", dict(seq_len=512, method="lora", precision="mixed-fp16", loss="chunked")),
    ("smollm2-135m", dict(seq_len=256, method="qlora", precision="mixed-bf16", loss="chunked")),
]


@pytest.mark.parametrize("name, options", CASES, ids=[f"{f}-{o['method']}-{o['precision']}" for f, o in CASES])
def test_each_chunk_saves_its_own_copy_of_a_frozen_fp32_head(name, options):
    # real vocabularies: the head's copies are a visible part of the peak
    from vramcalc.catalogue import get_model

    peak, traced = estimated_and_traced(get_model(name), **options)
    assert traced.phase == peak.phase
    assert abs(peak.temporaries - traced.terms[Term.TEMPORARIES]) <= 0.01 * traced.terms[Term.TEMPORARIES]
    assert abs(peak.tensor_bytes - sum(traced.terms.values())) <= 0.005 * sum(traced.terms.values())
