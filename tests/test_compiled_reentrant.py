"""--compile with reentrant checkpointing: the recompute runs the layer's training graph, not the forward's no-grad one.

Reentrant checkpointing (``torch.utils.checkpoint.CheckpointFunction``) runs the layer's forward under ``no_grad`` and
recomputes it in backward with grad enabled. dynamo guards a compiled frame on the grad mode (its global state
guard), so the recompute gets a graph with autograd. The trace keyed its compiled layer graphs on the inputs only, so
the recompute reused the no-grad graph and ``CheckpointFunction.backward`` raised "none of output has
requires_grad=True, this checkpoint() is not necessary" (fuzz33 #55: tinyllama-1.1b prompt tuning, reentrant,
compile, hf-loop).
"""

import pytest

from vramcalc.estimator import step_moments
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.trace]


@pytest.mark.parametrize("options", [dict(method="lora"), dict(method="prompt", loss="hf-loop", virtual_tokens=8)],
                         ids=["lora", "prompt-hf-loop"])
def test_compiled_layers_recompute_with_grad_under_reentrant_checkpointing(options):
    # a real size (fake tensors): on the tiny models a fixed few MB of the compiled trace outweigh the layers
    from vramcalc.catalogue import get_model
    from vramcalc.tracing.runner import run_trace

    spec = get_model("tinyllama-1.1b")
    resolved = resolve_setup(spec, seq_len=256, grad_ckpt="reentrant", compile=True, **options)
    traced = run_trace(spec, resolved, progress=False)  # raised in CheckpointFunction.backward before
    peak = max(m.tensor_bytes for m in step_moments(spec, resolved))
    assert abs(peak - sum(traced.terms.values())) <= 0.002 * sum(traced.terms.values())
