"""``--task``: the preference tasks' estimate (``vramcalc/terms/tasks.py``), their options and their errors.
Standard library only (the estimate); the trace's agreement is ``test_trace_tasks.py``."""

import json

import pytest

import vramcalc as vc
from vramcalc.errors import VramcalcError

from .cli_helpers import run_cli

MODEL = "llama-3.1-8b"
JOB = dict(seq_len=2048, prompt_len=1024, batch_size=2, grad_ckpt=True)


def _peak(**options) -> int:
    return vc.estimate(MODEL, task="dpo", **dict(JOB, **options)).peak_tensor_bytes


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_copied_reference_above_adapter_reference_above_precomputed(method):
    """A copy holds a second model's weights at every moment; the adapter reference only adds its no-grad forward
    beside the held activations; precomputed log-probs add neither."""
    copy, adapter, precomputed = (_peak(method=method, ref_model=ref) for ref in ("copy", "adapter", "precomputed"))
    assert copy > adapter >= precomputed
    assert copy - adapter >= vc.estimate(MODEL, task="dpo", method=method, ref_model="copy", **JOB).details[
        "reference_model_bytes"] // 2


def test_reference_forward_moment_is_above_precomputed_forward():
    """Without checkpointing the adapter reference's no-grad forward runs beside every saved activation: its
    moment is the forward's peak plus what it adds, so it beats the same job with precomputed log-probs."""
    options = dict(JOB, method="lora", grad_ckpt=False, batch_size=1, seq_len=1024, prompt_len=512)
    adapter = vc.estimate(MODEL, task="dpo", ref_model="adapter", **options)
    precomputed = vc.estimate(MODEL, task="dpo", ref_model="precomputed", **options)
    assert adapter.peak_tensor_bytes > precomputed.peak_tensor_bytes


def test_copy_reference_holds_the_base_model_as_the_policy_stores_it():
    """Full fine-tuning in bf16: the reference is one more bf16 model, so its bytes equal the policy's weights."""
    sft = vc.estimate(MODEL, method="full", precision="bf16")
    dpo = vc.estimate(MODEL, task="dpo", method="full", precision="bf16")
    assert dpo.details["reference_model_bytes"] == sft.terms()["weights"]
    assert dpo.terms()["weights"] == 2 * sft.terms()["weights"]


def test_qlora_copy_reference_is_quantized_like_the_policy():
    """QLoRA's reference copy is loaded with the same 4-bit quantization config: under half a bf16 copy (the
    embedding and lm_head, 2 GB of the 8B model, stay 16-bit)."""
    qlora = vc.estimate(MODEL, task="dpo", method="qlora", ref_model="copy").details["reference_model_bytes"]
    bf16 = vc.estimate(MODEL, method="full", precision="bf16").terms()["weights"]
    assert qlora < bf16 / 2


def test_dpo_step_is_above_sft_of_the_same_pairs():
    """b pairs run 2·b rows: DPO with precomputed log-probs is above SFT of b sequences of the same length."""
    sft = vc.estimate(MODEL, method="lora", seq_len=2048, batch_size=2, loss="trl", grad_ckpt=True)
    assert _peak(method="lora", ref_model="precomputed", prompt_len=0) > sft.peak_tensor_bytes


def test_longer_prompts_score_fewer_rows():
    """Prompt tokens are not scored (labels -100): at one row length, a longer prompt shrinks the fused head."""
    short = vc.estimate(MODEL, task="dpo", method="lora", seq_len=4096, prompt_len=128, batch_size=4)
    long = vc.estimate(MODEL, task="dpo", method="lora", seq_len=4096, prompt_len=3072, batch_size=4)
    assert long.peak_tensor_bytes < short.peak_tensor_bytes


def test_prompt_and_completion_lengths_set_the_row_length():
    b = vc.estimate(MODEL, task="dpo", method="lora", prompt_len=300, completion_len=212)
    assert b.inputs["seq_len"] == 512 and b.inputs["completion_len"] == 212
    assert b.inputs["origins"]["seq_len"] == "implied by prompt_len + completion_len"


def test_default_reference_follows_trl():
    """TRL: a copy for full fine-tuning, the disabled adapter with peft, none for the reference-free losses."""
    assert vc.estimate(MODEL, task="dpo", method="full").inputs["ref_model"] == "copy"
    assert vc.estimate(MODEL, task="dpo", method="qlora").inputs["ref_model"] == "adapter"
    assert vc.estimate(MODEL, task="simpo", method="lora").inputs["ref_model"] == "none"
    assert vc.estimate(MODEL, task="dpo").inputs["loss"] == "trl"


def test_sft_default_is_the_task_and_unchanged():
    default, explicit = vc.estimate(MODEL), vc.estimate(MODEL, task="sft")
    assert (default.terms(), default.phase, default.details) == (explicit.terms(), explicit.phase, explicit.details)
    assert vc.estimate(MODEL).inputs["task"] == "sft"


@pytest.mark.parametrize("options, words", [
    (dict(task="dpo", method="full", ref_model="adapter"), "needs --method lora or qlora"),
    (dict(task="simpo", ref_model="copy"), "reference-free"),
    (dict(task="dpo", ref_model="none"), "--task simpo"),
    (dict(ref_model="copy"), "not --task sft"),
    (dict(task="dpo", loss="hf"), "fused lm_head"),
    (dict(task="dpo", prompt_len=2048, seq_len=2048), "no completion"),
    (dict(task="dpo", prompt_len=10, completion_len=10, seq_len=100), "is not --prompt-len"),
    (dict(task="dpo", packing=True), "padding_free"),
    (dict(task="kto", batch_size=1), "--batch-size 2 or more"),
    (dict(task="kto", batch_size=2, ref_model="none"), "needs reference log-probs"),
    (dict(task="reward", ref_model="copy"), "does not apply to --task reward"),
    (dict(task="reward", prompt_len=128), "does not apply to --task reward"),
    (dict(task="reward", loss="hf"), "does not apply to --task reward"),
    (dict(task="reward", method="lora", lora_targets="q_proj,lm_head"), "no lm_head"),
    (dict(task="nonsense"), "unknown task"),
])
def test_bad_task_options_are_one_error_naming_them(options, words):
    with pytest.raises(VramcalcError, match=words):
        vc.estimate(MODEL, **options)


def test_cli_task_flags_and_json(capsys):
    code, out, err = run_cli(capsys, "estimate", MODEL, "--task", "dpo", "--method", "lora", "--ref-model", "copy",
                             "--prompt-len", "512", "--completion-len", "512", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["inputs"]["task"] == "dpo" and data["inputs"]["seq_len"] == 1024
    assert sum(data["terms"].values()) == data["total_bytes"]


def test_cli_bad_task_is_one_error_line(capsys):
    code, out, err = run_cli(capsys, "estimate", MODEL, "--task", "dpo", "--ref-model", "adapter")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:")


# -- GRPO (modelled, not traced) ----------------------------------------------------------------------------------
GRPO = dict(task="grpo", method="lora", batch_size=2, prompt_len=256, grad_ckpt=True)


def _generation_peak(**options) -> int:
    return vc.estimate(MODEL, **dict(GRPO, **options)).details["phase_peak_bytes"]["generation"]


def test_grpo_reports_generation_and_training_peaks_and_takes_the_larger():
    b = vc.estimate(MODEL, **GRPO)
    peaks = b.details["phase_peak_bytes"]
    assert "generation" in peaks and "forward" in peaks
    assert b.peak_tensor_bytes == max(peaks.values())


def test_grpo_generation_grows_linearly_with_generations_times_completion():
    """The KV cache holds b·g rows of P + C tokens: doubling g doubles what generation adds above the weights and
    optimizer states, and a longer completion adds to it."""
    base = vc.estimate(MODEL, **GRPO).details["phase_peak_bytes"]["optimizer-step"]
    g8, g16 = (_generation_peak(num_generations=g, completion_len=512) - base for g in (8, 16))
    assert 1.9 < g16 / g8 < 2.1
    assert _generation_peak(num_generations=8, completion_len=1024) > _generation_peak(num_generations=8,
                                                                                       completion_len=512)


def test_grpo_reference_only_with_beta():
    """GRPOConfig's beta=0.0 loads no reference; a copy (beta > 0, full) adds a second model."""
    none = vc.estimate(MODEL, task="grpo", method="full", precision="bf16")
    copy = vc.estimate(MODEL, task="grpo", method="full", precision="bf16", ref_model="copy")
    assert none.inputs["ref_model"] == "none"
    assert copy.terms()["weights"] - none.terms()["weights"] == copy.details["reference_model_bytes"] > 0


def test_grpo_vllm_reservation_is_the_fraction_of_the_gpu():
    hf = vc.estimate(MODEL, gpu="h100-sxm", **GRPO)
    vllm = vc.estimate(MODEL, gpu="h100-sxm", rollout_engine="vllm", vllm_gpu_fraction=0.4, **GRPO)
    reservation = vllm.details["vllm_reservation_bytes"]
    assert reservation == int(0.4 * vllm.gpu.memory_bytes)
    assert vllm.terms()["runtime_overhead"] - hf.terms()["runtime_overhead"] == reservation
    assert "generation" not in vllm.details["phase_peak_bytes"]  # vLLM generates inside its reservation


@pytest.mark.parametrize("options, words", [
    (dict(task="grpo", batch_size=3, num_generations=2, grad_accum=4), "accumulation"),
    (dict(task="grpo", ref_model="precomputed"), "fresh completions"),
    (dict(task="grpo", vllm_gpu_fraction=0.5), "--rollout-engine vllm"),
    (dict(task="grpo", rollout_engine="vllm", vllm_gpu_fraction=1.5), r"\(0, 1\]"),
    (dict(task="dpo", num_generations=4), "applies to --task grpo"),
    (dict(rollout_engine="vllm"), "applies to --task grpo, not --task sft"),  # the sft refusal names grpo too
    (dict(completion_len=100), r"and --task grpo, not --task sft"),
    (dict(task="grpo", seq_len=256, completion_len=512), "no prompt"),
])
def test_bad_grpo_options_are_one_error(options, words):
    with pytest.raises(VramcalcError, match=words):
        vc.estimate(MODEL, **options)


# -- KTO ----------------------------------------------------------------------------------------------------------
KTO = dict(task="kto", seq_len=2048, prompt_len=1024, batch_size=4, grad_ckpt=True)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_kto_copied_reference_above_adapter_reference_above_precomputed(method):
    """KTOTrainer's references (kto_trainer.py:916-940, 1412-1436): a copy's weights, the adapter's no-grad forwards
    (the KL rows, then the rows) beside the held activations, or two floats per row."""
    copy, adapter, precomputed = (vc.estimate(MODEL, method=method, ref_model=ref, **KTO).peak_tensor_bytes
                                  for ref in ("copy", "adapter", "precomputed"))
    assert copy > adapter >= precomputed


def test_kto_default_reference_follows_trl():
    assert vc.estimate(MODEL, method="full", **KTO).inputs["ref_model"] == "copy"
    assert vc.estimate(MODEL, method="lora", **KTO).inputs["ref_model"] == "adapter"


def test_kto_holds_its_kl_batch():
    """b unpaired rows carry b KL rows: three more [b, s] int64 tensors than the same rows' DPO-shaped batch, and
    the KL rows' labels while they are scored; the step is above SFT of the same b rows with TRL's fused head."""
    sft = vc.estimate(MODEL, method="lora", seq_len=2048, batch_size=4, loss="trl", grad_ckpt=True)
    kto = vc.estimate(MODEL, method="lora", ref_model="precomputed", **dict(KTO, prompt_len=0))
    assert kto.peak_tensor_bytes - sft.peak_tensor_bytes >= 3 * 8 * 4 * 2048


def test_kto_max_batch_and_plan_start_at_two_rows():
    """KTOTrainer refuses one row (its KL term); ``max-batch`` and ``plan`` search from two."""
    from vramcalc.planning import max_batch_size

    largest = max_batch_size(MODEL, "h100-sxm", task="kto", method="lora", seq_len=2048, prompt_len=1024)
    assert largest >= 2
    assert vc.estimate(MODEL, task="kto", method="lora", seq_len=2048, prompt_len=1024, batch_size=largest,
                       gpu="h100-sxm").fits("h100-sxm")


# -- distillation (--task distill: TRL 1.16 GKDTrainer) -----------------------------------------------------------
DISTILL = dict(task="distill", teacher="llama-3.2-3b", batch_size=2, seq_len=1024)
STUDENT = "llama-3.2-1b"


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_distill_is_above_sft_of_the_student_by_the_teacher_and_both_logits(method):
    """GKD holds a 16-bit teacher at every moment and, in the loss, the student's and the teacher's fp32 [b, s, V]
    logits (accelerate's convert_outputs_to_fp32): at least that much above the student's SFT step."""
    options = dict(DISTILL, method=method)
    distill = vc.estimate(STUDENT, **options)
    sft = vc.estimate(STUDENT, method=method, batch_size=2, seq_len=1024, stack="trl")
    logits = 2 * 4 * 2 * 1024 * 128256
    assert distill.peak_tensor_bytes > sft.peak_tensor_bytes + distill.details["teacher_model_bytes"] + logits


def test_distill_teacher_is_stored_in_bf16():
    """Llama-3.2-3B has 3,212,749,824 parameters (meta-llama/Llama-3.2-3B, its safetensors: 6.43 GB in bf16)."""
    details = vc.estimate(STUDENT, **DISTILL).details
    assert details["teacher"] == "llama-3.2-3b" and details["teacher_model_bytes"] == 2 * 3_212_749_824


def test_distill_grows_with_the_teacher():
    small = vc.estimate(STUDENT, **DISTILL).peak_tensor_bytes
    large = vc.estimate(STUDENT, **dict(DISTILL, teacher="llama-3.1-8b")).peak_tensor_bytes
    assert large - small >= 2 * (8_030_261_248 - 3_212_749_824)


@pytest.mark.parametrize("options, words", [
    (dict(task="distill"), "needs --teacher"),
    (dict(task="distill", teacher="qwen3-0.6b"), "vocab_size 151936"),
    (dict(task="dpo", teacher="llama-3.2-3b"), "--teacher applies to --task distill"),
    (dict(teacher="llama-3.2-3b"), "--teacher applies to --task distill, not --task sft"),
    (dict(task="distill", teacher="llama-3.2-3b", packing=True), "no-packing"),
    (dict(task="distill", teacher="llama-3.2-3b", loss="trl"), "full logits"),
    (dict(task="distill", teacher="llama-3.2-3b", ref_model="copy"), "does not apply"),
])
def test_bad_distill_options_are_one_error(options, words):
    with pytest.raises(VramcalcError, match=words):
        vc.estimate(STUDENT, **options)


def test_cli_distill_vocabulary_mismatch_is_one_error_line(capsys):
    code, out, err = run_cli(capsys, "estimate", STUDENT, "--task", "distill", "--teacher", "qwen3-8b")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:")


# -- reward (RewardTrainer on AutoModelForSequenceClassification) --------------------------------------------------
REWARD = dict(task="reward", seq_len=2048, batch_size=2, grad_ckpt=True)


def test_reward_model_weights_are_the_causal_lm_without_lm_head_plus_a_score_row():
    """AutoModelForSequenceClassification (num_labels=1) replaces lm_head [V, h] by score [1, h] (transformers
    modeling_layers.py:138): for Llama-3.1-8B (untied, V=128256, h=4096, bf16) the weights differ by 2·(V - 1)·h
    bytes, the estimate's allocator rounding aside."""
    sft = vc.estimate(MODEL, method="full", precision="bf16", seq_len=2048).terms()["weights"]
    reward = vc.estimate(MODEL, method="full", precision="bf16", **REWARD).terms()["weights"]
    assert abs((sft - reward) - 2 * (128256 - 1) * 4096) <= 4096


def test_reward_lora_trains_the_score_head_too():
    """peft's SEQ_CLS task type puts score in modules_to_save (peft_model.py:1830-1836): h more trainable
    parameters than the same adapter on the causal LM."""
    sft = vc.estimate(MODEL, method="lora", seq_len=2048).details["trainable_params"]
    reward = vc.estimate(MODEL, method="lora", **REWARD).details["trainable_params"]
    assert reward - sft == 4096


def test_reward_has_no_vocabulary_logits():
    """The score head's output is [2·b, s, 1] and the loss works on [b]: the logits term is a few bytes per token,
    where SFT's hf loss holds fp32 [T, V] (4·128256 bytes per token)."""
    tokens = 2 * REWARD["batch_size"] * REWARD["seq_len"]
    for method in ("full", "lora", "qlora"):
        breakdown = vc.estimate(MODEL, method=method, **REWARD)
        assert breakdown.terms()["logits"] <= 16 * tokens


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_reward_is_below_dpo_with_a_copied_reference_on_the_same_pairs(method):
    """The same 2·b rows through the same backbone, without a second model and without log-probs over V."""
    reward = vc.estimate(MODEL, method=method, **REWARD).peak_tensor_bytes
    dpo = vc.estimate(MODEL, method=method, ref_model="copy", **(REWARD | {"task": "dpo"})).peak_tensor_bytes
    assert reward < dpo


def test_reward_runs_both_rows_of_each_pair():
    """Chosen and rejected rows in one forward (the collator, reward_trainer.py:203-230): b pairs cost about what
    2·b rows of a sequence classifier cost, so doubling b roughly doubles the activations."""
    one = vc.estimate(MODEL, method="lora", **REWARD | {"batch_size": 1}).terms()["activations"]
    two = vc.estimate(MODEL, method="lora", **REWARD).terms()["activations"]
    assert 1.8 * one < two < 2.2 * one
