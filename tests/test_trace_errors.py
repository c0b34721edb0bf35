"""The trace rejects what the estimate rejects, with the same message, and an interrupted trace leaves nothing."""

import pytest

import vramcalc
from vramcalc.errors import VramcalcError

from .conftest import needs_torch
from .tiny_models import TINY

pytestmark = [needs_torch, pytest.mark.trace]

BAD = [
    dict(model="llama-3.1-8b", batch_size=0),
    dict(model="llama-3.1-8b", method="qlora", precision="fp8"),
    dict(model="llama-3.1-8b", lora_rank=16),
    dict(model="llama-3.1-8b", optimizer="adam"),
    dict(model="lama-3.1-8b"),
]


@pytest.mark.parametrize("options", BAD, ids=lambda o: " ".join(f"{k}={v}" for k, v in o.items()))
def test_trace_rejects_bad_input_with_the_estimates_message(options):
    options = dict(options)
    model = options.pop("model")
    with pytest.raises(VramcalcError) as from_estimate:
        vramcalc.estimate(model, **options)
    with pytest.raises(VramcalcError) as from_trace:
        vramcalc.trace(model, **options)
    assert str(from_trace.value) == str(from_estimate.value)


def test_interrupted_trace_restores_every_patch_and_hook():
    import torch
    from transformers import masking_utils

    from vramcalc.tracing import runner, step

    sdpa, dropout = torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.dropout
    find_packed = masking_utils.find_packed_sequence_indices
    original_run = step.StepTracer.run
    seen = {}

    def interrupted(self, *args, **kwargs):
        seen["tracer"] = self
        raise KeyboardInterrupt

    step.StepTracer.run = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run_trace(TINY["llama"], vramcalc.training_setup.resolve_setup(TINY["llama"], method="lora"))
    finally:
        step.StepTracer.run = original_run
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    assert torch.nn.functional.dropout is dropout
    assert masking_utils.find_packed_sequence_indices is find_packed
    tracer = seen["tracer"]
    assert not tracer.head._forward_pre_hooks  # the tracer's module hooks are gone
    assert torch._C._len_torch_dispatch_stack() == 0  # no tracker or fake mode left active


def test_model_transformers_cannot_build_is_a_one_line_error():
    from vramcalc.model import ModelSpec
    from vramcalc.tracing.runner import run_trace
    from vramcalc.training_setup import resolve_setup

    # kv heads that divide the heads (ModelSpec refuses the rest itself), an odd head_dim transformers refuses
    broken = ModelSpec(name="odd", family="llama", hidden_size=250, num_layers=1, num_heads=3, num_kv_heads=3,
                       head_dim=83, intermediate_size=64, vocab_size=128)
    with pytest.raises(VramcalcError, match="cannot build odd") as err:
        run_trace(broken, resolve_setup(broken))
    assert "\n" not in str(err.value)
