"""A model whose own loss takes lm_head's output as it comes (Qwen v1's ``modeling_qwen.py``: a plain
``CrossEntropyLoss`` on ``lm_logits[..., :-1, :].contiguous()``, no ``.float()``), and DeepSpeed's engine, under which
accelerate leaves autocast off: the loss's chain stays in the logits' dtype (``terms/logits._model_dtype_loss_bytes``).
The byte counts are checked against torch's own ops run under the allocation tracker on real CPU tensors."""

import pytest

import vramcalc as vc
from vramcalc.terms import logits as logits_terms
from vramcalc.terms.distributed import compute_setup
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch

B, S, V = 2, 64, 4096


@needs_torch
def test_a_loss_without_upcast_saves_and_peaks_in_the_logits_dtype_without_autocast():
    import torch

    from vramcalc.tracing.tracker import AllocationTracker

    torch.manual_seed(0)
    output = torch.randn(B, S, V, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (B, S))
    from torch.utils._python_dispatch import TorchDispatchMode

    tracker = AllocationTracker(round_to=1)

    class HighWater(TorchDispatchMode):  # the tracker's live bytes after each op of the backward
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            HighWater.peak = max(HighWater.peak, tracker.live_bytes)
            return out

    with tracker:
        lm_logits = output * 1.0  # lm_head's bf16 output, kept in the model's outputs until the loss returns
        shift_logits = lm_logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        loss = torch.nn.CrossEntropyLoss()(shift_logits.view(-1, V), shift_labels.view(-1))
        forward_peak = tracker.peak.total_bytes
        del lm_logits, shift_logits, shift_labels  # Trainer drops ``outputs`` before backward
        saved = tracker.live_bytes
        with HighWater():
            loss.backward()
    backward_peak = HighWater.peak
    expected = logits_terms._model_dtype_loss_bytes(2, False, B * S, B, V, 0)
    labels_bytes = 8 * B * (S - 1)  # the shifted int64 labels nll_loss keeps
    assert saved == pytest.approx(expected.saved + labels_bytes, rel=0.01)
    assert forward_peak == pytest.approx(expected.forward_peak + labels_bytes, rel=0.01)
    # backward: the saved log_softmax, nll_loss's gradient and log_softmax's, all bf16 (then the slice's and the
    # product's gradients of lm_head's output, below that)
    assert backward_peak == pytest.approx(expected.backward_peak + labels_bytes, rel=0.01)


def test_qwen_v1_under_deepspeed_runs_its_loss_in_bf16_and_under_autocast_in_fp32():
    spec = vc.get_model("qwen-7b")
    tokens, shifted = 4 * 1024, 4 * 1023
    deepspeed = compute_setup(resolve_setup(spec, method="full", num_gpus=2, sharding="zero3", precision="bf16",
                                            batch_size=4, seq_len=1024))
    assert not deepspeed.setup.precision.autocast  # accelerate: native_amp False under DeepSpeed
    for setup, element in ((deepspeed.setup, 2), (resolve_setup(spec, method="lora", precision="bf16").setup, 4)):
        from vramcalc.terms.activations import dtypes

        dt = dtypes(setup.method, setup.precision, setup.adapter_dtype)
        lg = logits_terms.logits_bytes(spec, setup.loss, dt, tokens, sequences=4)
        assert lg.backward_peak == 3 * element * shifted * spec.vocab_size + 8 * tokens
    llama = vc.get_model("llama-3.1-8b")  # transformers' ForCausalLMLoss upcasts: fp32 either way
    setup = compute_setup(resolve_setup(llama, method="full", num_gpus=2, sharding="zero3", precision="bf16")).setup
    dt = dtypes(setup.method, setup.precision, setup.adapter_dtype)
    assert logits_terms.logits_bytes(llama, setup.loss, dt, tokens).backward_peak == \
        3 * 4 * tokens * llama.vocab_size + 8 * tokens


@needs_torch
def test_one_sequence_makes_no_shifted_copy():
    # logits[..., :-1, :] of a contiguous [1, s, V] tensor is contiguous already (the batch dim has size 1), so
    # .contiguous() returns the slice itself: the forward peak is lm_head's output and log_softmax's, no copy between
    import torch

    from vramcalc.tracing.tracker import AllocationTracker

    output = torch.randn(1, S, V, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (1, S))
    tracker = AllocationTracker(round_to=1)
    with tracker:
        lm_logits = output * 1.0
        shift_logits = lm_logits[..., :-1, :].contiguous()
        assert shift_logits.data_ptr() == lm_logits.data_ptr()
        loss = torch.nn.CrossEntropyLoss()(shift_logits.view(-1, V), labels[..., 1:].contiguous().view(-1))
        forward_peak = tracker.peak.total_bytes
    expected = logits_terms._model_dtype_loss_bytes(2, False, S, 1, V, 0)
    assert expected.forward_peak == 2 * S * V + 2 * (S - 1) * V  # lm_head's output, the bf16 log_softmax
    assert forward_peak == pytest.approx(expected.forward_peak + 8 * (S - 1), rel=0.01)
    assert loss.requires_grad


def test_model_dtype_loss_is_hf_for_qwen_v1_and_its_own_rule_elsewhere():
    # --loss model-dtype puts any family on the rule Qwen v1's own loss follows; hf keeps the upcast elsewhere
    llama = vc.get_model("llama-3.1-8b")
    plain = vc.estimate(llama, precision="bf16-true", loss="model-dtype", batch_size=2, seq_len=1024)
    upcast = vc.estimate(llama, precision="bf16-true", loss="hf", batch_size=2, seq_len=1024)
    tokens, shifted, vocab = 2 * 1024, 2 * 1023, llama.vocab_size
    # hf under bf16-true saves the fp32 log_softmax of all T rows; model-dtype the bf16 one of T' shifted rows
    assert upcast.terms()["logits"] - plain.terms()["logits"] >= 4 * tokens * vocab - 2 * shifted * vocab - 2**20
    qwen = vc.get_model("qwen-7b")
    assert (vc.estimate(qwen, loss="model-dtype", batch_size=2).peak_tensor_bytes
            == vc.estimate(qwen, loss="hf", batch_size=2).peak_tensor_bytes)
