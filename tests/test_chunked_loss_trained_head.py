"""A chunked loss with a trained lm_head: what the loss's backward holds once two chunks are in.

Each chunk's ``F.linear(hidden_chunk, weight)`` makes a full [V, h] weight gradient, and autograd's input buffer sums
them out of place: three at once. An fp32 head under 16-bit autocast is multiplied as autocast's one cached c copy
(``cached_cast`` keeps a leaf that requires grad), so those gradients are c·V·h, summed in the input buffer of the
cast's ``ToCopyBackward``, which makes the fp32 .grad only after the last chunk. Each chunk's logits gradient is
released when its mm's backward returns, before the sum; lm_head's input gradients of the two chunks wait in the
split's buffer. olmo-2-0425-1b full mixed-bf16 sgd chunked s=512 was +5.35% (three fp32 gradients counted: backward
start +11.05%); bf16-true s=2048 backward start +0.49% (a chunk's logits gradient counted).
"""

import pytest

from vramcalc.estimator import step_moments
from vramcalc.options import Phase
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.trace]

CASES = [
    ("olmo-2-0425-1b", dict(seq_len=512, method="full", precision="mixed-bf16", optimizer="sgd", loss="chunked")),
    ("olmo-2-0425-1b", dict(seq_len=1024, method="full", precision="bf16-true", optimizer="sgd", loss="chunked")),
]


@pytest.mark.parametrize("name, options", CASES, ids=[f"{f}-{o['precision']}" for f, o in CASES])
def test_chunked_loss_sums_a_trained_heads_gradients_in_the_compute_dtype(name, options):
    # a real vocabulary (fake tensors): the head's gradients are a visible part of backward start
    from vramcalc.catalogue import get_model
    from vramcalc.tracing.runner import run_trace

    spec = get_model(name)
    resolved = resolve_setup(spec, **options)
    moments = step_moments(spec, resolved)
    traced = run_trace(spec, resolved, progress=False)
    start = max(m.tensor_bytes for m in moments if m.phase is Phase.BACKWARD_START)
    assert abs(start - traced.phase_peaks[Phase.BACKWARD_START]) <= 0.001 * traced.phase_peaks[Phase.BACKWARD_START]
    # the head's backward ran inside the loss's: no later moment holds the loss's tensors
    after = max(m.tensor_bytes for m in moments if m.phase is Phase.BACKWARD)
    assert after <= traced.phase_peaks[Phase.BACKWARD] * 1.005
    peak = max(m.tensor_bytes for m in moments)
    assert abs(peak - sum(traced.terms.values())) <= 0.001 * sum(traced.terms.values())
