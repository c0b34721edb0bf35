"""peft's ``modules_to_save`` (``--modules-to-save embed_tokens,lm_head``): the embedding and the output layer
trained whole beside the adapters, estimated term by term and checked against the trace of the real
``ModulesToSaveWrapper`` (peft 0.21.2 ``utils/other.py:598-667``: a frozen original plus a trained deepcopy).

The real-size grid is benchmarks/accuracy.py's modules_to_save rows (benchmarks/accuracy_modules_to_save.md).
"""

import pytest

from vramcalc.errors import VramcalcError
from vramcalc.estimator import estimate, step_moments
from vramcalc.model import ModelSpec
from vramcalc.training_setup import resolve_setup

from .cli_helpers import run_cli
from .conftest import needs_torch
from .tiny_models import TINY

TOLERANCE = 0.005  # 0.5% of the traced peak

# (family, options): an untied llama, a tied family (gemma2: tied, soft-capped logits, eager attention), qwen2;
# LoRA, QLoRA (bf16 and kbit-prepared mixed-bf16), DoRA and IA3; checkpointing; bf16 and mixed-bf16; seq_len 16-32
# puts the peak at the embedding's backward or the optimizer step (the copies' gradients and states), longer
# sequences at the loss's backward (lm_head's saved input and weight gradient); DDP and FSDP ranks
CASES = [
    ("llama", dict(seq_len=512, method="lora", modules_to_save="lm_head")),
    ("llama", dict(seq_len=512, method="lora", modules_to_save="embed_tokens")),
    ("llama", dict(seq_len=512, method="lora", modules_to_save="embed_tokens,lm_head")),
    ("llama", dict(seq_len=16, method="lora", modules_to_save="embed_tokens,lm_head")),
    ("llama", dict(seq_len=16, method="lora", modules_to_save="lm_head", optimizer="adamw-foreach")),
    ("llama", dict(seq_len=512, method="lora", modules_to_save="embed_tokens,lm_head", grad_ckpt=True)),
    ("llama", dict(seq_len=512, method="lora", modules_to_save="embed_tokens", grad_ckpt=True)),
    ("llama", dict(seq_len=512, method="qlora", modules_to_save="embed_tokens,lm_head")),
    ("llama", dict(seq_len=512, method="qlora", modules_to_save="embed_tokens,lm_head", precision="mixed-bf16")),
    ("llama", dict(seq_len=128, method="lora", modules_to_save="embed_tokens,lm_head", optimizer="adamw-8bit")),
    ("llama", dict(seq_len=128, method="dora", modules_to_save="embed_tokens,lm_head")),
    ("llama", dict(seq_len=16, method="ia3", modules_to_save="embed_tokens,lm_head")),
    ("gemma2", dict(seq_len=256, method="lora", modules_to_save="embed_tokens,lm_head")),
    ("gemma2", dict(seq_len=256, method="lora", modules_to_save="embed_tokens")),
    ("gemma2", dict(seq_len=64, method="lora", modules_to_save="lm_head")),
    ("gemma2", dict(seq_len=16, method="lora", modules_to_save="embed_tokens,lm_head")),
    ("gemma2", dict(seq_len=128, method="qlora", modules_to_save="embed_tokens,lm_head", precision="mixed-bf16",
                    optimizer="paged-adamw-8bit")),
    ("qwen2", dict(seq_len=512, method="lora", modules_to_save="embed_tokens,lm_head", precision="mixed-bf16")),
    # mixed-bf16 with a short sequence: the peak is the fp32 lm_head copy's gradient made from its bf16 one
    # (estimator._cast_head_backward_moments), after the logits' gradient and the weight's autocast copy are gone
    ("llama", dict(seq_len=32, method="lora", modules_to_save="embed_tokens,lm_head", precision="mixed-bf16",
                   optimizer="adamw-8bit")),
    ("qwen2", dict(seq_len=128, method="lora", modules_to_save="lm_head", precision="mixed-bf16", grad_ckpt=True)),
    ("qwen2", dict(seq_len=16, method="qlora", modules_to_save="embed_tokens", precision="mixed-bf16",
                   optimizer="adamw-8bit")),
    ("qwen2", dict(seq_len=128, method="lora", modules_to_save="embed_tokens", lora_targets="all-linear",
                   lora_dropout=0.1, grad_accum=2)),
]

DISTRIBUTED_CASES = [
    ("llama", dict(seq_len=128, method="lora", modules_to_save="embed_tokens,lm_head", num_gpus=2, sharding="ddp")),
    ("llama", dict(seq_len=16, method="lora", modules_to_save="embed_tokens,lm_head", num_gpus=2, sharding="fsdp")),
]


def _case_id(family, options):
    return f"{family}-" + "-".join(f"{k}={v}" for k, v in options.items())


def _estimate_and_trace(family, options):
    from vramcalc.tracing.runner import run_trace

    spec = TINY[family]
    resolved = resolve_setup(spec, **options)
    peak = max(step_moments(spec, resolved), key=lambda m: m.tensor_bytes)
    traced = run_trace(spec, resolved, progress=False)
    return peak, traced


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("family, options", CASES + DISTRIBUTED_CASES,
                         ids=[_case_id(f, o) for f, o in CASES + DISTRIBUTED_CASES])
def test_estimated_peak_and_phase_match_the_traced_modules_to_save_wrapper(family, options):
    peak, traced = _estimate_and_trace(family, options)
    traced_total = sum(traced.terms.values())
    assert abs(peak.tensor_bytes - traced_total) / traced_total < TOLERANCE
    assert peak.phase == traced.phase


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_the_trace_holds_a_trained_copy_of_each_module_beside_the_frozen_original(family):
    # peft deepcopies each listed module (tied or not: a tied lm_head's copy is a new [V, h] weight), in the
    # original's 16-bit dtype (peft's autocast_adapter_dtype casts only the LoRA layers)
    from vramcalc.options import Term
    from vramcalc.tracing.runner import run_trace

    spec = TINY[family]
    without = run_trace(spec, resolve_setup(spec, method="lora", seq_len=16), progress=False)
    with_both = run_trace(spec, resolve_setup(spec, method="lora", seq_len=16, modules_to_save="embed_tokens,lm_head"),
                          progress=False)
    copy_bytes = spec.vocab_size * spec.hidden_size * 2  # bf16
    added = with_both.terms[Term.WEIGHTS] - without.terms[Term.WEIGHTS]
    # (Gemma's scaled embedding copies its embed_scale buffer too: one 512-byte allocator block)
    assert 0 <= added - 2 * copy_bytes <= 512


def test_each_module_to_save_adds_a_trained_copy_of_vocab_by_hidden_parameters():
    model = _catalogue("llama-3.2-1b")  # tied: the lm_head copy is its own [V, h] all the same
    V, h = model.vocab_size, model.hidden_size
    trained = {words: estimate(model.name, method="lora", modules_to_save=words).details["trainable_params"]
               for words in ("", "lm_head", "embed_tokens,lm_head")}
    assert trained["lm_head"] - trained[""] == V * h
    assert trained["embed_tokens,lm_head"] - trained[""] == 2 * V * h


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_modules_to_save_never_lowers_a_phase_peak(family):
    spec = TINY[family]

    def phase_peaks(**options):
        peaks = {}
        for m in step_moments(spec, resolve_setup(spec, method="lora", seq_len=256, **options)):
            peaks[m.phase] = max(peaks.get(m.phase, 0), m.tensor_bytes)
        return peaks

    plain, trained = phase_peaks(), phase_peaks(modules_to_save="embed_tokens,lm_head")
    assert all(trained[phase] > plain[phase] for phase in plain)


@pytest.mark.parametrize("words, canonical", [
    ("lm_head", ("lm_head",)),
    ("lm_head, embed_tokens", ("embed_tokens", "lm_head")),
    (["embed_tokens"], ("embed_tokens",)),
    ("", ()),
])
def test_modules_to_save_resolve_to_canonical_names_in_a_fixed_order(words, canonical):
    assert resolve_setup(TINY["llama"], method="lora", modules_to_save=words).setup.modules_to_save == canonical


def test_qwen_v1_embedding_is_accepted_by_its_own_name():
    resolved = resolve_setup(_catalogue("qwen-7b"), method="lora", modules_to_save="wte,lm_head")
    assert resolved.setup.modules_to_save == ("embed_tokens", "lm_head")


def _catalogue(name) -> ModelSpec:
    from vramcalc.catalogue import get_model

    return get_model(name)


@pytest.mark.parametrize("options, words", [
    (dict(method="full"), "full fine-tuning trains every module already"),
    (dict(method="prompt"), "not --method prompt"),
    (dict(method="lora", modules_to_save="embed_tokens,score"), "'score' is not a module"),
    (dict(method="lora", lora_targets="q_proj,lm_head"), "in both --lora-targets and --modules-to-save"),
    (dict(method="lora", stack="unsloth"), "--stack hf and trl"),
    (dict(method="lora", task="dpo"), "--task sft"),
])
def test_modules_to_save_refuses_what_it_does_not_model_in_one_line(options, words):
    options = {"modules_to_save": "lm_head", **options}
    with pytest.raises(VramcalcError) as err:
        resolve_setup(TINY["llama"], **options)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_cli_modules_to_save_with_full_fine_tuning_is_one_error_line(capsys):
    code, out, err = run_cli(capsys, "estimate", "llama-3.2-1b", "--method", "full", "--modules-to-save",
                             "embed_tokens,lm_head")
    assert code == 2 and out == ""
    assert err.startswith("error: --modules-to-save") and err.count("\n") == 1


def test_cli_json_inputs_name_the_modules_to_save(capsys):
    import json

    code, out, _ = run_cli(capsys, "estimate", "tinyllama-1.1b", "--method", "qlora", "--modules-to-save",
                           "lm_head,embed_tokens", "--format", "json")
    assert code == 0
    assert json.loads(out)["inputs"]["modules_to_save"] == "embed_tokens,lm_head"
