"""``trace --stack trl`` runs TRL 1.16's SFTTrainer code (``vramcalc/tracing/stacks/trl.py``) and the estimate's TRL
loss rule (``vramcalc/terms/trl_loss.py``) agrees with it.

The setups cover full, LoRA and QLoRA, checkpointing on and off, bf16, mixed-bf16 (TRL's own default: the model
loaded in fp32 under bf16 autocast) and fp32, a vocabulary wider than TRL's 32768-column tile and more than 4096
scored rows (its token tile). Skipped without trl.
"""

import functools
import statistics
from unittest import mock

import pytest

from vramcalc.errors import VramcalcError
from vramcalc.model import ModelSpec
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch
from .tiny_models import TINY

pytestmark = [needs_torch, pytest.mark.trace]
trl = pytest.importorskip("trl")

TOLERANCE = 0.03
MEDIAN_TOLERANCE = 0.005

# a vocabulary of two TRL tiles (32768 + 7232 columns); hidden and layers stay tiny
WIDE_VOCAB = ModelSpec(name="tiny-llama-wide-vocab", family="llama", hidden_size=256, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=64, intermediate_size=688, vocab_size=40000,
                       max_position_embeddings=8192)
MODELS = dict(TINY, wide_vocab=WIDE_VOCAB)

CASES = [
    ("llama", dict(method="lora", seq_len=512)),
    ("llama", dict(method="full", seq_len=512)),
    ("llama", dict(method="qlora", seq_len=512)),
    ("llama", dict(method="lora", seq_len=512, grad_ckpt=False)),
    ("llama", dict(method="full", seq_len=1024, precision="mixed-bf16")),
    ("llama", dict(method="lora", seq_len=1024, precision="mixed-bf16", batch_size=2)),
    ("llama", dict(method="full", seq_len=256, precision="fp32")),
    ("qwen3", dict(method="lora", seq_len=2048, batch_size=4)),
    ("qwen3", dict(method="qlora", seq_len=4096, batch_size=2, lora_targets="all-linear")),
    ("gemma2", dict(method="full", seq_len=512, batch_size=2)),
    ("wide_vocab", dict(method="lora", seq_len=1024, batch_size=2)),
    ("wide_vocab", dict(method="lora", seq_len=2048, precision="mixed-bf16", batch_size=3)),
    ("wide_vocab", dict(method="full", seq_len=4096, batch_size=2, grad_ckpt=False)),
    ("wide_vocab", dict(method="full", seq_len=4096, precision="mixed-bf16", batch_size=2, grad_ckpt=False)),
]
IDS = [f"{family}-{'-'.join(f'{k}={v}' for k, v in options.items())}" for family, options in CASES]


def _estimated_peak(spec, resolved) -> int:
    """The estimate's peak tensor bytes over the step's moments (``--loss trl``, the trl preset's loss)."""
    from vramcalc.estimator import step_moments

    return max(m.tensor_bytes for m in step_moments(spec, resolved))


@functools.lru_cache(maxsize=None)
def _traced_and_estimated(index: int) -> tuple[int, int]:
    from vramcalc.tracing.runner import run_trace
    from vramcalc.tracing.stacks.trl import SFTStepTracer

    family, options = CASES[index]
    spec = MODELS[family]
    resolved = resolve_setup(spec, stack="trl", **options)
    traced = sum(run_trace(spec, resolved, progress=False, tracer_class=SFTStepTracer).terms.values())
    return traced, _estimated_peak(spec, resolved)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_trl_estimate_is_within_3_percent_of_the_trl_trace(index):
    traced, estimated = _traced_and_estimated(index)
    assert abs(estimated - traced) / traced < TOLERANCE


def test_trl_estimate_median_error_is_below_half_a_percent():
    errors = []
    for index in range(len(CASES)):
        traced, estimated = _traced_and_estimated(index)
        errors.append(abs(estimated - traced) / traced)
    assert statistics.median(errors) <= MEDIAN_TOLERANCE


def test_trl_trace_runs_the_fused_head_and_never_holds_the_full_logits():
    """TRL's own ``add_fused_lm_head`` patches the model (with SFTTrainer's outputs), and at the peak the logits term
    is smaller than one 16-bit [T, V] tensor: HF's loss would hold at least 12·T·V bytes there."""
    import vramcalc as vc
    from trl.trainer import utils as trl_utils

    spec = WIDE_VOCAB
    options = dict(method="lora", seq_len=4096, batch_size=2)
    with mock.patch.object(trl_utils, "add_fused_lm_head", wraps=trl_utils.add_fused_lm_head) as patched:
        result = vc.trace(spec, stack="trl", progress=False, **options)
    assert patched.call_count == 1
    assert patched.call_args.kwargs["outputs"] == ("log_probs", "entropy", "is_top1")
    tokens = options["batch_size"] * options["seq_len"]
    assert result.terms()["logits"] < 2 * tokens * spec.vocab_size
    assert result.details["trace_stack"] == "trl"


@pytest.mark.parametrize("options, word", [
    (dict(loss="hf"), "--loss hf"),
    (dict(num_gpus=2, sharding="ddp"), "num_gpus=2"),
    (dict(activation_offload=True), "activation"),
    (dict(grad_ckpt="selective"), "selective"),
])
def test_trl_trace_refuses_what_sfttrainer_does_not_run(options, word):
    import vramcalc as vc

    with pytest.raises(VramcalcError, match=word):
        vc.trace(TINY["llama"], stack="trl", method="lora", seq_len=128, progress=False, **options)
