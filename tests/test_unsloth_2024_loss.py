"""``--loss unsloth-2024``: Unsloth 2024.1-2024.11.7's loss (``unsloth/models/llama.py:959-986`` and
``kernels/cross_entropy_loss.py:262-347`` @October-2024, the same lines in the 2024.10.7 wheel). lm_head's 16-bit
[T, V] logits are saved whole by ``Fast_CrossEntropyLoss`` with a [T] fp32 logsumexp and the hstacked int64 labels,
and its backward writes the gradient into them; under autocast accelerate copies the returned logits to fp32. The
hand numbers below are those of that source, not of vramcalc's code; the trace runs the same allocations
(``tracing/losses.Unsloth2024CrossEntropy``)."""

import pytest

import vramcalc as vc
from vramcalc.terms import logits as logits_terms

from .cli_helpers import assert_one_error_line
from .conftest import needs_torch
from .tiny_models import TINY
from .trace_helpers import setup_id

# Llama-3.2-3B at 2 x 2048 on a T4 (the unb-llama3.2-3b-conv row's shape): V = 128,256 (config.json vocab_size)
T, V = 2 * 2048, 128_256
LOGITS_FP16 = 2 * T * V  # llama.py:959 lm_head(hidden_states) in fp16: 1,050,673,152 B
LOGSUMEXP = 4 * T  # cross_entropy_loss.py:312 torch.logsumexp(dim=1) of the [T, 2] chunked one: [T] fp32
LABELS = 8 * T  # llama.py:979 torch.hstack((labels[..., 1:], -100 column)): int64 [2, 2048]
FP32_COPY = 4 * T * V  # accelerate convert_outputs_to_fp32 on outputs.logits under fp16 autocast


def test_the_loss_keeps_one_16_bit_logits_tensor_and_makes_no_gradient_tensor():
    spec = vc.get_model("llama-3.2-3b")
    assert spec.vocab_size == V
    lg = logits_terms.unsloth_2024_loss_bytes(2, True, T, V)
    assert LOGITS_FP16 == 1_050_673_152
    assert lg.saved == LOGITS_FP16 + LOGSUMEXP + LABELS
    assert lg.backward_peak == lg.saved  # the kernel stores dloss * y into logits_ptr (:256) and returns logits (:347)
    assert lg.backward_request == 0  # no [rows, V] request in backward: nothing strands beside it
    assert lg.forward_peak == LOGITS_FP16 + FP32_COPY + LOGSUMEXP + LABELS
    assert lg.head_backward == LOGITS_FP16 + LABELS
    # inside the kernel call: losses [T] fp32, the chunked logsumexp [T, 2] (V > 65536) and its [T] reduction
    assert lg.forward_in_model == LOGITS_FP16 + LABELS + 4 * T + 4 * 2 * T + 4 * T
    # bf16-true (no autocast): no fp32 copy of the returned logits
    assert logits_terms.unsloth_2024_loss_bytes(2, False, T, V).forward_peak == lg.forward_in_model


def test_the_estimate_of_the_llama_3_2_row_peaks_at_the_forward_with_the_fp32_copy():
    options = dict(stack="unsloth", method="qlora", precision="fp16", compute_dtype="fp16", batch_size=2,
                   seq_len=2048, loss="unsloth-2024", gpu="t4")
    old = vc.estimate("llama-3.2-3b", **options)
    assert old.phase.value == "forward"
    assert old.terms()["logits"] == LOGITS_FP16 + FP32_COPY + LOGSUMEXP + LABELS
    # a record step's fp16 logits fit in the block the previous record's fp32 copy freed; its own fp32 copy fits in
    # none: K(T) = 4·T·V (docs/evidence/varying_length_reserved/unsloth_2024_replay.jsonl: the allocator replay)
    assert old.details["reserved_growth_per_longer_step_bytes"] == FP32_COPY
    bf16_true = vc.estimate("llama-3.2-3b", **dict(options, precision="bf16-true", compute_dtype="bf16"))
    assert bf16_true.details["reserved_growth_per_longer_step_bytes"] == LOGITS_FP16 + LOGSUMEXP + LABELS
    # the stack's own word (Unsloth >= 2024.11.8, cut-cross-entropy) keeps no [T, V] tensor to climb on
    assert vc.estimate("llama-3.2-3b", **dict(options, loss="fused")).details[
        "reserved_growth_per_longer_step_bytes"] < LOGITS_FP16 // 10


def test_gemma_2s_soft_cap_adds_no_logits_copy():
    # DO_SOFTCAPPING runs inside both kernels (cross_entropy_loss.py:74, 231): Gemma-2 is Llama's rule at its V
    gemma = vc.get_model("gemma-2-2b")
    assert gemma.traits.logit_softcap
    from vramcalc.terms.activations import dtypes
    from vramcalc.training_setup import resolve_setup

    setup = resolve_setup(gemma, method="qlora", precision="fp16", loss="unsloth-2024").setup
    dt = dtypes(setup.method, setup.precision, setup.adapter_dtype)
    tokens = 2048
    lg = logits_terms.logits_bytes(gemma, setup.loss, dt, tokens, sequences=1)
    assert lg.saved == 2 * tokens * 256_000 + 4 * tokens + 8 * tokens


def test_a_loop_keeping_outputs_is_refused_with_one_error_line(capsys):
    assert_one_error_line(capsys, "llama-3.2-1b", dict(loss="unsloth-2024", loop_keeps_outputs=True),
                          "unsloth-2024")


@needs_torch
def test_the_traced_loss_saves_the_logits_and_returns_them_as_their_gradient():
    import torch

    from vramcalc.tracing.losses import unsloth_2024_causal_lm_loss
    from vramcalc.tracing.tracker import AllocationTracker

    b, s, vocab = 2, 64, 70_000  # two 65,536-column chunks: the [T, 2] logsumexp path
    output = torch.randn(b, s, vocab, dtype=torch.float16, requires_grad=True)
    tracker = AllocationTracker(round_to=1)
    pointers = []
    with tracker:
        labels = torch.randint(0, vocab, (b, s))  # the batch's labels (8·T), counted by the tracker as the trace does
        logits = output * 1.0  # lm_head's fp16 output (the product saves nothing)
        logits.register_hook(lambda grad: pointers.append(grad.data_ptr()))
        loss = unsloth_2024_causal_lm_loss(logits, labels, vocab)
        pointer = logits.data_ptr()
        del logits
        saved = tracker.live_bytes
        loss.backward()
    tokens = b * s
    # the fp16 logits, the [T] fp32 logsumexp, the hstacked labels, the batch's labels; the division's two scalars
    assert saved == 2 * tokens * vocab + 4 * tokens + 8 * tokens + 8 * tokens + 4 + 8
    assert pointers == [pointer]  # the gradient lm_head's backward receives is the logits' own storage


TINY_SETUPS = [("llama", dict(method="lora", precision="fp16")),
               ("llama", dict(method="qlora", precision="fp16", compute_dtype="fp16", grad_ckpt=True)),
               ("llama", dict(method="lora", precision="mixed-bf16", batch_size=1)),
               ("gemma2", dict(method="lora", precision="bf16")),
               ("mistral", dict(method="qlora", grad_ckpt=True)),
               ("qwen3", dict(method="lora", precision="bf16", grad_ckpt=True))]


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("family, options", TINY_SETUPS, ids=setup_id)
def test_the_estimate_follows_the_trace_of_the_emulated_loss(family, options):
    """The HF step with Unsloth's loss as the model's ``loss_function`` (``tracing/losses.py``; Gemma-2's cap off in
    the model, as Unsloth applies it in the kernel): peak within 0.5%. (bf16-true LoRA on the tiny Llama reads
    +1.5%, the final norm's backward moment, the same with ``--loss fused``: not this loss's.)"""
    from .trace_helpers import peak_error

    options = dict(dict(seq_len=256, batch_size=2, loss="unsloth-2024"), **options)
    assert abs(peak_error(TINY[family], **options)) < 0.005
