"""``--trainer-use-cache``: transformers 4.x's Trainer without checkpointing runs the model with its config's
``use_cache`` (ms-swift 1.5 ``sft.py`` turns it off only under gradient checkpointing), and under mixed precision
accelerate's ``convert_to_fp32`` (0.25.0 ``utils/operations.py:629-647``, recursing into tuples) copies the returned
keys and values to fp32 at the model call's end. Checked against the trace, which copies the returned cache as
accelerate does."""

import pytest

from vramcalc import VramcalcError, estimate
from vramcalc.estimator import step_moments
from vramcalc.model import ModelSpec
from vramcalc.options import Phase
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch

# multi-head attention, as Qwen v1 (k = a): the attention saves the cache's own tensors. 16-bit weights (the trace's
# transformers 5.25 rotates keys in the weights' dtype: fp32 under mixed-bf16, which accelerate would not convert;
# 4.x and Qwen v1 keep them in c). A small vocabulary, so that the copies move the peak to the forward.
MHA = ModelSpec(name="tiny-llama-mha", family="llama", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                head_dim=64, intermediate_size=688, vocab_size=512, max_position_embeddings=4096)


def test_a_forward_moment_gains_the_fp32_copy_of_every_layers_keys_and_values():
    options = dict(seq_len=256, batch_size=2, method="lora", precision="bf16", grad_ckpt=False)
    plain = step_moments(MHA, resolve_setup(MHA, **options))
    cached = step_moments(MHA, resolve_setup(MHA, **options, trainer_use_cache=True))
    assert len(cached) == len(plain) + 1
    loss_forward = plain[next(i for i, m in enumerate(plain) if m.phase is Phase.BACKWARD_START) - 1]
    def tensors(m):  # the moment's tensors (the allocator's stranded blocks follow from them)
        return m.phase, m.weights, m.gradients, m.optimizer_states, m.activations, m.logits, m.temporaries

    extra = [m for m in cached if tensors(m) not in {tensors(p) for p in plain}]
    assert len(extra) == 1 and extra[0].phase is Phase.FORWARD
    conversion = extra[0]
    # k and v, 4 layers, 2 x 256 tokens, 4 heads x 64, fp32: 2 * 4 * 512 * 256 * 4 bytes
    assert conversion.activations - loss_forward.activations == 4_194_304
    assert conversion.logits == loss_forward.logits


def test_nothing_changes_under_checkpointing_or_without_autocast():
    for options in (dict(grad_ckpt=True), dict(grad_ckpt=False, precision="bf16-true")):
        plain = estimate(MHA, seq_len=256, method="lora", **options)
        cached = estimate(MHA, seq_len=256, method="lora", trainer_use_cache=True, **options)
        assert cached.peak_tensor_bytes == plain.peak_tensor_bytes


def test_the_knob_models_the_trainers_hf_loss_only():
    with pytest.raises(VramcalcError, match="trainer-use-cache"):
        estimate(MHA, seq_len=256, loss="hf-shifted", trainer_use_cache=True)
    with pytest.raises(VramcalcError, match="trainer-use-cache"):
        estimate(MHA, seq_len=256, loop_keeps_outputs=True, trainer_use_cache=True)


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("options", [dict(method="lora"), dict(method="full"), dict(method="lora", attn="eager"),
                                     dict(method="qlora")],
                         ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()))
def test_the_trainer_cache_is_within_3_percent_of_the_trace(options):
    from .trace_helpers import estimated_and_traced

    peak, traced = estimated_and_traced(MHA, seq_len=256, batch_size=2, grad_ckpt=False, trainer_use_cache=True,
                                        **options)
    total = sum(traced.terms.values())
    assert abs(peak.tensor_bytes - total) / total < 0.03
