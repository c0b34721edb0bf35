"""The ``--task`` options, resolved and checked against the rest of the setup (issue 15).

Preference tasks (``dpo``, ``ipo``, ``simpo``, ``orpo``, ``cpo``) follow TRL 1.16's ``DPOTrainer``:

- one step takes ``batch_size`` b *pairs*; ``DataCollatorForPreference.torch_call`` (``trl/trainer/dpo_trainer.py:
  146-211``) stacks the b prompt+chosen rows over the b prompt+rejected rows: one forward of 2·b rows, each padded to
  the longest of the 2·b (``padding_free`` is disabled in 1.16, ``dpo_trainer.py:732-739``);
- ``seq_len`` is the length of one such row, prompt plus completion; ``prompt_len`` P (default 0) of them are the
  prompt, whose labels are -100 (``labels = input_ids.masked_fill(completion_mask == 0, -100)``, ``:1303``); the
  other ``completion_len`` C = seq_len - P are scored. Both completions of a pair are taken C tokens long (the
  padded length: padding positions also carry a zero completion mask, so the scored count is an upper bound).
  Giving ``prompt_len`` and ``completion_len`` sets ``seq_len`` to their sum;
- ``ref_model``: ``copy`` (TRL's default for full fine-tuning: ``create_model_from_path`` with the policy's dtype and
  quantization config, ``:916-927``), ``adapter`` (TRL's default with peft: the reference is the policy under
  ``use_adapter(model, None)`` = peft ``disable_adapter``, ``:1326-1335``), ``precomputed``
  (``precompute_ref_log_probs=True``: ``ref_model`` is None and the batch carries two floats per pair, ``:909-914,
  1318-1319``) or ``none`` (the reference-free losses).
The loss is TRL's fused lm_head (``add_fused_lm_head``, ``:958-962``): ``--loss trl`` is implied.

``kto`` follows TRL 1.16's ``KTOTrainer`` (``trl/trainer/kto_trainer.py``): ``batch_size`` b *unpaired* rows of
``seq_len`` (prompt plus completion, the same length rule), each with a mismatched KL row (the completions cycled
by one within the batch, ``:1150-1151``) that the policy and the reference score under ``torch.no_grad``
(``_compute_kl_logps``, ``:1337-1368``); the default ``loss_type="kto"`` computes that KL term, which needs b > 1
(``:815, 844-847``). The reference defaults as DPO's (``copy`` full, ``adapter`` peft, ``:916-940``; ``precomputed``
is ``precompute_ref_log_probs``).
"""

from __future__ import annotations

import functools

from .errors import VramcalcError, positive_int
from .model import ModelSpec
from .options import Loss, Method, RefModel, RolloutEngine, Stack, Task

GRPO_OPTIONS = ("num_generations", "rollout_engine", "vllm_gpu_fraction")
DISTILL_OPTIONS = ("teacher",)
TASK_OPTIONS = ("ref_model", "prompt_len", "completion_len") + GRPO_OPTIONS + DISTILL_OPTIONS
GRPO_NUM_GENERATIONS = 8  # trl/trainer/grpo_config.py:480-481 (num_generations=8)
GRPO_COMPLETION_LEN = 512  # grpo_config.py:494-495 (max_completion_length=512)
VLLM_GPU_FRACTION = 0.3  # grpo_config.py:656-657 (vllm_gpu_memory_utilization=0.3, colocate mode)
_MAX_GENERATIONS = 2**16
_MAX_LEN = 2**30


def resolve_task(values: dict, given: dict, origins: dict, model: ModelSpec | None = None) -> None:
    """Fill ``task``, ``ref_model``, ``prompt_len``, ``completion_len`` (and ``seq_len``, ``loss`` where the task
    implies them) in ``values``, the keywords of a ``TrainingSetup`` being built; ``given`` the user's options.
    An encoder family (``FamilyTraits.encoder``: BERT) trains as a sequence classifier: ``classify`` is its default
    and its only task."""
    encoder = model is not None and model.traits.encoder
    task = Task.parse(given.get("task", Task.CLASSIFY if encoder else Task.SFT), "task")
    if encoder and "task" not in given:
        origins["task"] = f"implied by model ({model.family}: an encoder, a sequence classifier)"
    values["task"] = task
    if encoder and task is not Task.CLASSIFY:
        raise VramcalcError(f"{model.name} ({model.family}) is an encoder, trained as a sequence classifier: "
                            f"--task classify (its default), not --task {task.value}, which needs a causal LM")
    if task is Task.CLASSIFY:
        if not encoder:
            raise VramcalcError("--task classify is modelled for the encoder families (bert); a decoder's sequence "
                                "classifier with one label is --task reward (TRL's RewardTrainer)")
        _classify(values, given)
        limit = model.max_position_embeddings
        if "seq_len" not in given and limit and values["seq_len"] > limit:  # (a longer default cannot run)
            values["seq_len"] = limit
            origins["seq_len"] = f"implied by model (its {limit} learned positions)"
        return
    if task is Task.SFT:
        if "teacher" in given:
            raise VramcalcError("--teacher applies to --task distill, not --task sft")
        for key in TASK_OPTIONS:
            if key in given:
                where = ("--task grpo" if key in GRPO_OPTIONS else
                         "the preference tasks (--task dpo, ipo, simpo, orpo, cpo, kto) and --task grpo")
                raise VramcalcError(f"--{key.replace('_', '-')} applies to {where}, not --task sft")
        values.update(ref_model=RefModel.NONE, prompt_len=0, completion_len=None)
        return
    if task is Task.DISTILL:
        _distill(values, given, origins)
        return
    if "teacher" in given:
        raise VramcalcError(f"--teacher applies to --task distill, not --task {task.value}")
    _check_preference_setup(task, values)
    if task is Task.REWARD:
        _reward(values, given)
        return
    method = values["method"]
    if "loss" in given and Loss.parse(given["loss"], "loss") is not Loss.TRL:
        raise VramcalcError(f"--task {task.value} scores with TRL's fused lm_head (trl/trainer/dpo_trainer.py:958-962, "
                            f"grpo_trainer.py:1068-1073, always); --loss {given['loss']} is not what the trainer "
                            "runs: leave --loss out")
    if values["loss"] is not Loss.TRL:
        values["loss"] = Loss.TRL
        origins["loss"] = "implied by task"
    if task is Task.GRPO:
        _grpo(values, given, origins)
        return
    for key in GRPO_OPTIONS:
        if key in given:
            raise VramcalcError(f"--{key.replace('_', '-')} applies to --task grpo, not --task {task.value}")
    if task is Task.KTO and values["batch_size"] < 2:
        raise VramcalcError("--task kto: KTOTrainer's KL term needs --batch-size 2 or more (trl/trainer/"
                            "kto_trainer.py:844-847: with one row the KL term equals the implied reward)")
    values["ref_model"] = _ref_model(task, method, given, origins)
    _lengths(values, given, origins)


def _reward(values: dict, given: dict) -> None:
    """RewardTrainer 1.16 (``trl/trainer/reward_trainer.py``): b pairs, chosen and rejected rows of ``seq_len`` in
    one forward (the collator, :203-230), no reference, no prompt mask (every token reaches the score head), the
    loss on the pooled scores (:786-792) whatever ``--loss`` says; LoRA keeps ``score`` trainable
    (``modules_to_save``), so ``lm_head`` is no target."""
    for key in TASK_OPTIONS + ("loss",):
        if key in given:
            raise VramcalcError(f"--{key.replace('_', '-')} does not apply to --task reward (RewardTrainer: a "
                                "sequence classifier scored by -logsigmoid(chosen - rejected), no reference, "
                                "no lm_head)")
    if any(name in ("lm_head", "embed_tokens") for name in values.get("lora_targets") or ()):
        raise VramcalcError("--task reward: the sequence classifier has no lm_head and peft trains its score head "
                            "whole (modules_to_save); leave lm_head and embed_tokens out of --lora-targets")
    values.update(ref_model=RefModel.NONE, prompt_len=0, completion_len=None)


def _classify(values: dict, given: dict) -> None:
    """``--task classify``: transformers' Trainer on ``AutoModelForSequenceClassification`` (an encoder: BERT), b
    sequences of ``seq_len`` tokens and one label each; the loss is the model's own ``CrossEntropyLoss`` on its
    [b, num_labels] logits (modeling_bert.py L1133-1135), so no task option nor ``--loss`` applies."""
    for key in TASK_OPTIONS + ("loss",):
        if key in given:
            raise VramcalcError(f"--{key.replace('_', '-')} does not apply to --task classify (a sequence classifier "
                                "scored by its own cross-entropy on [b, num_labels] logits)")
    values.update(ref_model=RefModel.NONE, prompt_len=0, completion_len=None)


def _grpo(values: dict, given: dict, origins: dict) -> None:
    """GRPOTrainer 1.16: ``batch_size`` b prompts per optimizer step and device, each sampled ``num_generations`` g
    times in one ``generate`` of b·g rows (``generation_batch_size`` = per-device batch x ``steps_per_generation`` =
    grad_accum, ``grpo_config.py:1099``), trained in grad_accum micro-batches of b·g / grad_accum rows. The
    reference: none with the default ``beta=0.0`` (``grpo_config.py:681-682``, ``grpo_trainer.py:984-986``); with
    beta > 0 a copy (full) or the disabled adapter (peft, :987-990)."""
    method = values["method"]
    if "ref_model" in given:
        ref = RefModel.parse(given["ref_model"], "reference model")
        if ref is RefModel.PRECOMPUTED:
            raise VramcalcError("--task grpo scores fresh completions: a reference is none (beta=0), copy or adapter")
        if ref is RefModel.ADAPTER and not method.uses_lora:
            raise VramcalcError(f"--ref-model adapter needs --method lora or qlora, not {method.value}")
    else:
        ref = RefModel.NONE
        origins["ref_model"] = "implied by task (GRPOConfig beta=0.0)"
    values["ref_model"] = ref
    generations = GRPO_NUM_GENERATIONS
    if "num_generations" in given:
        generations = positive_int(given["num_generations"], "number of generations", _MAX_GENERATIONS)
    else:
        origins["num_generations"] = "implied by task"
    values["num_generations"] = generations
    rows = values["batch_size"] * generations
    if rows % values["grad_accum"]:
        raise VramcalcError(f"{values['batch_size']} prompts x {generations} generations = {rows} completions do not "
                            f"split into {values['grad_accum']} accumulation steps; use a multiple")
    engine = RolloutEngine.parse(given.get("rollout_engine", RolloutEngine.HF), "rollout engine")
    values["rollout_engine"] = engine
    fraction = None
    if engine is RolloutEngine.VLLM:
        fraction = VLLM_GPU_FRACTION
        if "vllm_gpu_fraction" in given:
            fraction = _fraction(given["vllm_gpu_fraction"])
        else:
            origins["vllm_gpu_fraction"] = "implied by rollout_engine"
    elif "vllm_gpu_fraction" in given:
        raise VramcalcError("--vllm-gpu-fraction applies to --rollout-engine vllm")
    values["vllm_gpu_fraction"] = fraction
    completion = GRPO_COMPLETION_LEN
    if "completion_len" in given:
        completion = _length(given["completion_len"], "completion length")
    else:
        origins["completion_len"] = "implied by task (GRPOConfig max_completion_length)"
    if "prompt_len" in given:
        prompt = _length(given["prompt_len"], "prompt length")
        _seq_len_from(values, given, origins, prompt, completion)
    else:
        prompt = values["seq_len"] - completion
        if prompt < 1:
            raise VramcalcError(f"--seq-len {values['seq_len']} leaves no prompt before a {completion}-token "
                                "completion; give --prompt-len or a longer --seq-len")
        origins["prompt_len"] = "implied by seq_len - completion_len"
    values.update(prompt_len=prompt, completion_len=completion)


def _distill(values: dict, given: dict, origins: dict) -> None:
    """TRL 1.16's ``GKDTrainer`` (``trl/experimental/gkd/gkd_trainer.py``), off-policy (a dataset's completions):
    the student trains on b rows of ``seq_len`` beside a teacher in inference mode (``evaluation_mode=True``,
    ``:191-194``; ``torch.no_grad`` forward, ``:333-338``). ``compute_loss`` (``:324-361``) calls both models without
    labels, so SFTTrainer's fused head falls back to the model's own forward (``trl/trainer/utils.py:1603-1609``):
    full [b, s, V] logits for each, then ``generalized_jsd_loss`` (``:238-322``). ``--teacher`` names the teacher
    (any model ``vramcalc`` reads), which must share the student's vocabulary (``:177-185``: checked by
    ``check_teacher``)."""
    if "teacher" not in given or not str(given["teacher"]).strip():
        raise VramcalcError("--task distill needs --teacher MODEL (the GKD teacher, a model with the student's "
                            "vocabulary)")
    for key in TASK_OPTIONS:
        if key != "teacher" and key in given:
            raise VramcalcError(f"--{key.replace('_', '-')} does not apply to --task distill")
    word = "--task distill"
    if values["method"] not in (Method.FULL, Method.LORA, Method.QLORA):
        raise VramcalcError(f"{word} is modelled for --method full, lora and qlora")
    if values["packing"]:
        raise VramcalcError(f"{word}: GKDTrainer pads with DataCollatorForChatML (gkd_trainer.py:133-135), no "
                            "padding-free batches: use --no-packing")
    if values["optimizer_in_backward"]:
        raise VramcalcError(f"{word} is not modelled with --optimizer-in-backward")
    if values["stack"] not in (Stack.TRL, Stack.HF):
        raise VramcalcError(f"{word} follows TRL's GKDTrainer: use --stack trl or hf")
    if values["num_gpus"] > 1:
        raise VramcalcError(f"{word} is modelled on one GPU (the teacher's placement under sharding is not)")
    if "loss" in given and Loss.parse(given["loss"], "loss") is not Loss.HF:
        raise VramcalcError(f"{word}: GKDTrainer.compute_loss takes the full logits of the student's own forward "
                            f"(gkd_trainer.py:325-328); --loss {given['loss']} is not what the trainer runs")
    if values["loss"] is not Loss.HF:
        values["loss"] = Loss.HF  # the student's forward writes its [b, s, V] logits (no fused head, no chunks)
        origins["loss"] = "implied by task (full logits)"
    values.update(teacher=str(given["teacher"]).strip(), ref_model=RefModel.NONE, prompt_len=0, completion_len=None)


def teacher_spec(setup) -> ModelSpec:
    """The ``--teacher`` model (``catalogue.get_model``: a catalogue name, Hub id or config.json), resolved once per
    name: the setup check, the weights and the teacher's forward all read it."""
    return _resolve_teacher(setup.teacher)


@functools.lru_cache(maxsize=64)
def _resolve_teacher(name: str) -> ModelSpec:
    from .catalogue import get_model

    return get_model(name)


def check_classify(model, setup) -> None:
    """What vramcalc models of an encoder's classification step (``--task classify``, ``terms/encoder.py``): full
    fine-tuning on one GPU with transformers' Trainer, any precision but fp8, any optimizer, with or without full
    checkpointing, under sdpa, flash or eager attention. Everything else is refused in one line; so is a sequence
    past the learned position table (``BertEmbeddings`` slices ``position_ids`` to it: a longer batch fails)."""
    if setup.task is not Task.CLASSIFY:
        return
    name = f"{model.name} ({model.family}, --task classify)"
    if setup.method is not Method.FULL:
        raise VramcalcError(f"{name}: --method full only (the encoder's full fine-tuning is modelled; "
                            f"--method {setup.method.value} on an encoder is not)")
    if setup.num_gpus > 1 or setup.sharding.value != "none" or setup.device_map.value != "none":
        raise VramcalcError(f"{name}: one GPU only (no --num-gpus, --sharding or --device-map for an encoder)")
    if setup.grad_ckpt.value not in ("none", "full", "reentrant"):
        raise VramcalcError(f"{name}: --grad-ckpt {setup.grad_ckpt.value} is not modelled for an encoder; use "
                            "--grad-ckpt (full) or reentrant")
    if setup.precision.value == "fp8":
        raise VramcalcError(f"{name}: --precision fp8 is not modelled for an encoder")
    if setup.stack is not Stack.HF:
        raise VramcalcError(f"{name}: --stack {setup.stack.value} is a causal-LM stack; an encoder trains with the "
                            "hf stack (transformers' Trainer)")
    knobs = {"compile": setup.compile, "activation-offload": setup.activation_offload,
             "optimizer-in-backward": setup.optimizer_in_backward, "packing": setup.packing,
             "kernels": setup.kernels.value != "none", "modules-to-save": bool(setup.modules_to_save),
             "images": bool(setup.images)}
    for knob, on in knobs.items():
        if on:
            raise VramcalcError(f"{name}: --{knob} is not modelled for an encoder")
    limit = model.max_position_embeddings
    if limit and setup.padded_seq_len > limit:
        raise VramcalcError(f"{name}: --seq-len {setup.padded_seq_len} exceeds its {limit} learned positions "
                            "(max_position_embeddings: BertEmbeddings cannot embed a longer sequence)")


def check_teacher(student, setup) -> None:
    """GKDTrainer refuses a teacher whose vocabulary differs from the student's (``gkd_trainer.py:177-185``: the loss
    compares the two full next-token distributions): one error line, or none for other tasks."""
    if setup.task is not Task.DISTILL:
        return
    teacher = teacher_spec(setup)
    if teacher.vocab_size != student.vocab_size:
        raise VramcalcError(f"--task distill: the teacher {setup.teacher} has vocab_size {teacher.vocab_size}, the "
                            f"student {student.vocab_size}; GKD compares full next-token distributions over one "
                            "shared tokenizer (gkd_trainer.py:177-185)")


def _fraction(value) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise VramcalcError(f"--vllm-gpu-fraction must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < f <= 1.0:
        raise VramcalcError(f"--vllm-gpu-fraction must be in (0, 1], got {value!r}")
    return f


def _ref_model(task: Task, method: Method, given: dict, origins: dict) -> RefModel:
    if "ref_model" not in given:
        default = RefModel.NONE if task.reference_free else (RefModel.ADAPTER if method.uses_lora else RefModel.COPY)
        origins["ref_model"] = "implied by task" if task.reference_free else "implied by method"
        return default
    ref = RefModel.parse(given["ref_model"], "reference model")
    if task.reference_free and ref is not RefModel.NONE:
        raise VramcalcError(f"--task {task.value} is reference-free; --ref-model {ref.value} applies to dpo and ipo")
    if not task.reference_free and ref is RefModel.NONE:
        raise VramcalcError(f"--task {task.value} needs reference log-probs; for a reference-free loss use "
                            "--task simpo, orpo or cpo")
    if ref is RefModel.ADAPTER and not method.uses_lora:
        raise VramcalcError(f"--ref-model adapter is the policy with its peft adapter disabled: it needs --method "
                            f"lora or qlora, not {method.value}")
    return ref


def _lengths(values: dict, given: dict, origins: dict) -> None:
    prompt = 0 if "prompt_len" not in given else _length(given["prompt_len"], "prompt length", zero=True)
    values["prompt_len"] = prompt
    if "completion_len" in given:
        completion = _length(given["completion_len"], "completion length")
        _seq_len_from(values, given, origins, prompt, completion)
    else:
        completion = values["seq_len"] - prompt
        if completion < 1:
            raise VramcalcError(f"--prompt-len {prompt} leaves no completion in --seq-len {values['seq_len']}; "
                                "give a longer --seq-len or --completion-len")
        origins["completion_len"] = "implied by seq_len - prompt_len"
    values["completion_len"] = completion


def _seq_len_from(values: dict, given: dict, origins: dict, prompt: int, completion: int) -> None:
    """A row is its prompt and its completion: both lengths given set ``seq_len``, which must then agree."""
    total = prompt + completion
    if "seq_len" in given and values["seq_len"] != total:
        raise VramcalcError(f"--seq-len {values['seq_len']} is not --prompt-len {prompt} + --completion-len "
                            f"{completion} (each row is prompt + completion); give one of the two")
    values["seq_len"] = total
    origins["seq_len"] = "implied by prompt_len + completion_len"


def _length(value, what: str, zero: bool = False) -> int:
    if zero and str(value).strip() == "0":
        return 0
    return positive_int(value, what, _MAX_LEN)


def _check_preference_setup(task: Task, values: dict) -> None:
    """What the preference model does not cover yet: one error line each."""
    word = f"--task {task.value}"
    if values["method"] is Method.PROMPT:
        raise VramcalcError(f"{word} is modelled for --method full, lora and qlora (not prompt tuning)")
    if values["packing"]:
        raise VramcalcError(f"{word}: DPOTrainer 1.16 disables padding_free (trl/trainer/dpo_trainer.py:732-739); "
                            "use --no-packing")
    if values["optimizer_in_backward"]:
        raise VramcalcError(f"{word} is not modelled with --optimizer-in-backward")
    if values["stack"] in (Stack.TORCHTUNE, Stack.LITGPT, Stack.UNSLOTH):
        raise VramcalcError(f"{word} follows TRL's DPOTrainer; --stack {values['stack'].value} has its own recipe, "
                            "not modelled: use --stack trl or hf")


def task_warnings(setup) -> list[str]:
    """What the estimate of a task says from a model only (not traced)."""
    out = []
    if setup.task is Task.GRPO:
        out.append("--task grpo: generation from the serving formulas (transformers generate's KV cache, checked "
                   "against generate traced on fake tensors: tracing/tasks.trace_generation_bytes), training on "
                   "b x num_generations completions with TRL's fused head")
        if setup.rollout_engine is RolloutEngine.VLLM:
            out.append(f"--rollout-engine vllm: the colocated engine's reservation is modelled from vLLM's "
                       f"gpu_memory_utilization rule ({setup.vllm_gpu_fraction} x the GPU's memory, in "
                       "runtime_overhead; needs --gpu)")
    if setup.task is Task.DISTILL:
        out.append(f"--task distill: GKDTrainer's off-policy step (the dataset's completions) with the teacher "
                   f"{setup.teacher} in 16-bit; GKDConfig's default lmbda=0.5 also generates with the student "
                   "(max_new_tokens=128) on half the steps: that generation phase is not modelled")
    if not setup.task.uses_fused_head or setup.num_gpus == 1:
        return out
    return out + [f"--task {setup.task.value} on {setup.num_gpus} GPUs: the policy's states are sharded as for SFT and "
            "the reference copy is whole per GPU (ddp, zero1-2) or 1/n per GPU (zero3, fsdp), its gathered units "
            "left out; modelled, not traced"]
