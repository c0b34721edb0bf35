"""Trace TRL 1.16's ``DPOTrainer`` step (``--task dpo, ipo, simpo, orpo, cpo``): the HF trace's model, optimizer and
step (``runner.py``, ``step.py``) with DPOTrainer's preparation and its real ``_compute_loss`` on fake tensors.

What runs, in the order DPOTrainer runs it (line numbers of ``trl/trainer/dpo_trainer.py``, trl 1.16.0 wheel):

- preparation: ``model.enable_input_require_grads()`` with peft and checkpointing (:717-718); QLoRA's trainable
  parameters but DoRA's magnitude cast to bf16 (:727-729, with ``--adapter-dtype bf16`` as for SFT);
  ``add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))`` (:955-960) and
  ``add_fused_lm_head(ref_model)`` (:961-962, ``outputs=("log_probs",)``);
- the reference: ``copy`` builds a second model exactly as the policy is built (``build.build_model``: same dtype,
  same bitsandbytes quantization) without the adapter, frozen, in eval mode, no checkpointing (TRL's
  ``create_model_from_path`` + ``accelerator.prepare_model(evaluation_mode=True)``, :916-927,990); ``adapter`` is the
  peft policy under ``use_adapter(model, None)`` = ``disable_adapter()`` (:1326-1335); ``precomputed`` and ``none``
  put ``ref_chosen_logps``/``ref_rejected_logps`` [b] fp32 in the batch and set ``precompute_ref_logps`` (:1318-1319;
  the reference-free losses have the same memory shape, a forward of 2·b rows and no reference);
- the batch is ``DataCollatorForPreference``'s output (:146-211): ``input_ids``, ``attention_mask`` and
  ``completion_mask`` [2·b, s] int64, the first ``prompt_len`` columns of ``completion_mask`` zero;
- ``DPOTrainer._compute_loss`` itself (:1285-1612), called with a stand-in ``self`` that holds DPOConfig's defaults
  (``loss_type=["sigmoid"]``, ``["ipo"]`` for ipo; ``beta=0.1``; no ``ld_alpha``; ``reverse_kl``; no weighting) and
  an accelerator on one process (``gather`` the identity). Its metrics call ``.item()``: on fake tensors
  ``Tensor.item`` answers 0 and ``bool()`` True while the loss runs (``_FakeScalars``); nothing is allocated by them.

``--task grpo``: the training phase only. ``GRPOTrainer._compute_loss`` (``grpo_trainer.py:3020``, DAPO loss,
beta=0) runs on b·g / grad_accum completions shaped like ``_generate_and_score_completions``' output (prompt and
completion ids and masks, advantages, ``num_items_in_batch``), with the fused head's ``("log_probs", "entropy")``
(:1068-1073). The reference's scoring forward is modelled (``terms/tasks.py``); generation is traced apart, through
transformers' real ``generate`` and its cache classes (``trace_generation_bytes``, the serving trace).

``--task kto``: ``KTOTrainer._compute_loss`` (``trl/trainer/kto_trainer.py:1370``) on ``KTODataCollator``'s batch
(b rows and their KL rows), with its real ``_compute_kl_logps`` (the policy's and the reference's no-grad forwards
of the KL rows), the policy's fused head with ``("log_probs", "entropy", "mean_logits")`` (:967-970) and the
reference as for DPO (a copy, ``use_adapter(model, None)`` or precomputed ``ref_logps``/``ref_KL_logps``).

The attention mask: fake tensors make transformers build the 4-D mask (``masking_utils._ignore_causal_mask_sdpa``
returns False for a fake ``padding_mask``), which is what a padded batch of chosen and rejected rows of different
lengths gets on a GPU (``terms/tasks.py``).

Data-dependent shapes: the fused head keeps the rows whose label is not -100 (``hidden_states[mask]``) and the
metrics index with completion masks. Each row of a mask over the shifted positions [.., s-1] has
``min(completion_len, s-1)`` true values (``_KnownMask``): fake tensors cannot count them.

``disable_gradient_checkpointing`` (``trl/models/utils.py:397``) would call ``gradient_checkpointing_enable`` again
and replace the trace's recompute markers: the trace turns the layers' ``gradient_checkpointing`` flags off and back
on instead, which is what that call changes for the no-grad forward. The same context marks the tracker's phase
``reference-forward``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections import defaultdict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import VramcalcError
from ..model import ModelSpec
from ..options import Attention, GradCkpt, Phase, RefModel, Task
from ..training_setup import ResolvedSetup
from .stacks.trl import _bool_index, _cuda_kernel_path, _import_trl, prepare_like_trl
from .step import StepTracer, base_model

DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # dpo_trainer.py:955
GRPO_OUTPUTS = ("log_probs", "entropy")  # grpo_trainer.py:1068-1073
KTO_OUTPUTS = ("log_probs", "entropy", "mean_logits")  # kto_trainer.py:967-970
KTO_BETA = 0.1  # kto_config.py:205 default
DPO_BETA = 0.1  # dpo_config.py:297 default
LOSS_TYPES = {Task.IPO: ["ipo"]}  # DPOConfig loss_type; others the default ["sigmoid"] (dpo_config.py:245)


class _KnownMask(TorchDispatchMode):
    """Boolean-mask ops answered with the allocation the real op makes: a mask whose last dimension is ``width``
    (the s-1 shifted positions) has ``per_row`` true values per row; any other mask is all true."""

    def __init__(self, width: int, per_row: int):
        super().__init__()
        self.width, self.per_row = width, per_row

    def _count(self, mask: torch.Tensor) -> int:
        if mask.dim() and mask.shape[-1] == self.width:
            return mask.numel() // self.width * self.per_row
        return mask.numel()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten.index.Tensor and _bool_index(args[1]):
            x, (mask,) = args[0], [i for i in args[1] if i is not None]
            return torch.empty((self._count(mask), *x.shape[mask.dim():]), dtype=x.dtype, device=x.device)
        if func is aten.masked_select.default:
            x, mask = args[0], args[1]
            shape = torch.broadcast_shapes(x.shape, mask.shape)
            return torch.empty((self._count(torch.empty(shape, dtype=torch.bool, device="meta")),), dtype=x.dtype,
                               device=x.device)
        if func is aten.nonzero.default:
            mask = args[0]
            return torch.empty((self._count(mask), mask.dim()), dtype=torch.long, device=mask.device)
        if func in (aten.index_put_.default, aten._index_put_impl_.default) and _bool_index(args[1]):
            return args[0]
        if func is aten.index_put.default and _bool_index(args[1]):
            return torch.empty_like(args[0])
        return func(*args, **kwargs)


@contextlib.contextmanager
def _fake_scalars():
    """``.item()`` answers 0 and ``bool()`` True on fake tensors (the loss's metrics); real tensors are unchanged."""
    from torch._subclasses.fake_tensor import FakeTensor

    item, to_bool = torch.Tensor.item, torch.Tensor.__bool__

    def fake_item(self):
        return 0 if isinstance(self, FakeTensor) else item(self)

    def fake_bool(self):
        return True if isinstance(self, FakeTensor) else to_bool(self)

    torch.Tensor.item, torch.Tensor.__bool__ = fake_item, fake_bool
    try:
        yield
    finally:
        torch.Tensor.item, torch.Tensor.__bool__ = item, to_bool


class _Accelerator:
    """accelerate on one process, as ``_compute_loss`` uses it."""

    device = torch.device("cpu")
    is_main_process = True
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def autocast():
        return contextlib.nullcontext()  # the step's autocast is already on (StepTracer.autocast)

    @staticmethod
    def unwrap_model(model):
        return model

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def build_reference_model(spec: ModelSpec, resolved: ResolvedSetup) -> nn.Module:
    """``--ref-model copy``: the policy's model built again (same dtype and quantization), without the adapter,
    frozen, in eval mode, no checkpointing. Called inside the trace's FakeTensorMode, so its tensors are fake."""
    from . import build

    setup = dataclasses.replace(resolved.setup, grad_ckpt=GradCkpt.NONE)
    ref_resolved = dataclasses.replace(resolved, setup=setup)
    original = build.apply_lora
    build.apply_lora = lambda model, _resolved: model  # no adapter on the reference
    try:
        model = build.build_model(spec, ref_resolved, None)
    finally:
        build.apply_lora = original
    model.requires_grad_(False)
    model.eval()
    return model


class PreferenceStepTracer(StepTracer):
    """The HF step with DPOTrainer's preparation and its ``_compute_loss`` (module docstring)."""

    def __init__(self, model, spec, resolved, tracker):
        from trl.trainer import dpo_trainer, grpo_trainer, kto_trainer

        self._grpo = grpo_trainer
        self._dpo = dpo_trainer
        self._kto = kto_trainer
        setup = resolved.setup
        outputs = {Task.GRPO: GRPO_OUTPUTS, Task.KTO: KTO_OUTPUTS}.get(setup.task, DPO_OUTPUTS)
        self._kernel_modules = prepare_like_trl(model, resolved, tracker, outputs)
        self.ref_model = None
        if setup.ref_model is RefModel.COPY:
            from .qlora import quant_state_tensors

            self.ref_model = build_reference_model(spec, resolved)
            trl_utils, _ = self._kernel_modules
            trl_utils.add_fused_lm_head(self.ref_model)  # :961-962
            tracker.register_weights(list(self.ref_model.parameters()) + list(self.ref_model.buffers())
                                     + quant_state_tensors(self.ref_model))
        self.reference_weight_bytes = 0 if self.ref_model is None else sum(
            t.untyped_storage().nbytes() for t in {id(t): t for t in _all_tensors(self.ref_model)}.values())
        super().__init__(model, spec, resolved, tracker)

    def _install_loss(self) -> None:
        self.head = base_model(self.model).get_output_embeddings()
        backbones = [getattr(base_model(self.model), base_model(self.model).base_model_prefix)]
        if self.ref_model is not None:
            backbones.append(getattr(self.ref_model, self.ref_model.base_model_prefix))
        tracker = self.tracker

        def backbone_done(module, args, output):  # the fused head's region starts when the backbone returns
            tracker.in_logits = True

        self._hooks.extend(backbone.register_forward_hook(backbone_done) for backbone in backbones)
        self.loss = {Task.GRPO: self._grpo_loss, Task.KTO: self._kto_loss}.get(self.setup.task, self._dpo_loss)

    def _shim(self):
        setup = self.setup
        return types.SimpleNamespace(
            model=self.model, ref_model=self.ref_model, accelerator=_Accelerator(), aux_loss_enabled=False,
            precompute_ref_logps=setup.ref_model in (RefModel.PRECOMPUTED, RefModel.NONE),
            args=types.SimpleNamespace(gradient_checkpointing_kwargs=None), ld_alpha=None,
            f_divergence_type="reverse_kl", loss_types=LOSS_TYPES.get(setup.task, ["sigmoid"]), loss_weights=[1.0],
            beta=DPO_BETA, use_weighting=False, label_smoothing=0.0, _metrics={"train": defaultdict(list),
                                                                             "eval": defaultdict(list)},
            _total_train_tokens=0, _tp_size=1)

    def _grpo_shim(self):
        setup = self.setup
        shim = types.SimpleNamespace(
            model=self.model, accelerator=_Accelerator(), aux_loss_enabled=False, top_entropy_quantile=1.0,
            off_policy_mask_threshold=None, importance_sampling_level="token", loss_type="dapo", epsilon_low=0.2,
            epsilon_high=0.2, beta=0.0, use_vllm=False, vllm_importance_sampling_correction=False,
            _entropy_bonus_enabled=False, current_gradient_accumulation_steps=setup.grad_accum,
            max_completion_length=setup.completion_len, _metrics={"train": defaultdict(list),
                                                                  "eval": defaultdict(list)},
            args=types.SimpleNamespace(delta=None, use_bias_correction_kl=True, steps_per_generation=setup.grad_accum))
        shim._get_per_token_logps_and_entropies = types.MethodType(
            self._grpo.GRPOTrainer._get_per_token_logps_and_entropies, shim)
        return shim

    def _grpo_loss(self, forward_module, input_ids, on_logits=None, position_ids=None):
        """GRPOTrainer's training forward (``_compute_loss``, grpo_trainer.py:3020) on R completions of a buffered
        generation batch (``_generate_and_score_completions``' output: prompt and completion ids and masks,
        advantages [R], ``num_items_in_batch``); beta=0 (the reference's log-probs are computed while scoring,
        before the step: the estimate's reference-forward moment)."""
        from ..terms.tasks import training_rows

        setup = self.setup
        rows = training_rows(setup, setup.batch_size)
        inputs = {"prompt_ids": torch.zeros(rows, setup.prompt_len, dtype=torch.long),
                  "prompt_mask": torch.ones(rows, setup.prompt_len, dtype=torch.long),
                  "completion_ids": torch.zeros(rows, setup.completion_len, dtype=torch.long),
                  "completion_mask": torch.ones(rows, setup.completion_len, dtype=torch.long),
                  "advantages": torch.zeros(rows), "num_items_in_batch": torch.tensor(float(rows))}
        return self._grpo.GRPOTrainer._compute_loss(self._grpo_shim(), self.model, inputs)

    def _dpo_loss(self, forward_module, input_ids, on_logits=None, position_ids=None):
        """The collator's batch of 2·b rows and ``DPOTrainer._compute_loss`` (``input_ids`` of the HF step unused)."""
        setup = self.setup
        b, s = setup.batch_size, setup.seq_len
        inputs = {"input_ids": torch.zeros(2 * b, s, dtype=torch.long),
                  "attention_mask": torch.ones(2 * b, s, dtype=torch.long),
                  "completion_mask": torch.ones(2 * b, s, dtype=torch.long)}
        if setup.prompt_len:
            inputs["completion_mask"][:, :setup.prompt_len] = 0
        shim = self._shim()
        if shim.precompute_ref_logps:
            inputs["ref_chosen_logps"] = torch.zeros(b)
            inputs["ref_rejected_logps"] = torch.zeros(b)
        return self._dpo.DPOTrainer._compute_loss(shim, self.model, inputs, return_outputs=False)

    def _kto_shim(self):
        setup = self.setup
        shim = types.SimpleNamespace(
            model=self.model, ref_model=self.ref_model, accelerator=_Accelerator(), aux_loss_enabled=False,
            precompute_ref_logps=setup.ref_model is RefModel.PRECOMPUTED, calculate_KL=True, loss_type="kto",
            beta=KTO_BETA, desirable_weight=1.0, undesirable_weight=1.0,
            args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
        kl_logps = self._kto.KTOTrainer._compute_kl_logps
        tracker = self.tracker

        def compute_kl_logps(model, batch):  # the policy's no-grad KL forward comes before its own forward
            out = kl_logps(shim, model, batch)
            if tracker.phase is Phase.FORWARD:
                tracker.in_logits = False
            return out

        shim._compute_kl_logps = compute_kl_logps
        return shim

    def _kto_loss(self, forward_module, input_ids, on_logits=None, position_ids=None):
        """``KTODataCollator``'s batch of b rows with their KL rows (``kto_trainer.py:161-203``: ``input_ids``,
        ``attention_mask``, ``completion_mask``, ``KL_*`` [b, s] int64, ``label`` [b] bool; ``ref_logps`` and
        ``ref_KL_logps`` [b] with precomputed log-probs) and ``KTOTrainer._compute_loss`` (:1370)."""
        setup = self.setup
        b, s = setup.batch_size, setup.seq_len
        inputs = {}
        for prefix in ("", "KL_"):
            inputs[prefix + "input_ids"] = torch.zeros(b, s, dtype=torch.long)
            inputs[prefix + "attention_mask"] = torch.ones(b, s, dtype=torch.long)
            inputs[prefix + "completion_mask"] = torch.ones(b, s, dtype=torch.long)
            if setup.prompt_len:
                inputs[prefix + "completion_mask"][:, :setup.prompt_len] = 0
        inputs["label"] = torch.arange(b) % 2 == 0
        if setup.ref_model is RefModel.PRECOMPUTED:
            inputs["ref_logps"] = torch.zeros(b)
            inputs["ref_KL_logps"] = torch.zeros(b)
        return self._kto.KTOTrainer._compute_loss(self._kto_shim(), self.model, inputs, return_outputs=False)

    @contextlib.contextmanager
    def _reference_forward(self, model, gradient_checkpointing_kwargs=None):
        """``disable_gradient_checkpointing`` as the trace runs it (module docstring), marking the phase."""
        layers = [m for m in self.model.modules() if getattr(m, "gradient_checkpointing", False) is True]
        tracker = self.tracker
        for layer in layers:
            layer.gradient_checkpointing = False
        tracker.phase, tracker.in_logits = Phase.REFERENCE_FORWARD, False
        try:
            yield
        finally:
            for layer in layers:
                layer.gradient_checkpointing = True
            tracker.phase, tracker.in_logits = Phase.FORWARD, True

    def run(self, steps: int = 2, progress=None) -> None:
        setup = self.setup
        width = setup.seq_len - 1
        per_row = min(setup.completion_len, width)
        originals = [(m, m.disable_gradient_checkpointing) for m in (self._dpo, self._kto)]
        for module, _ in originals:
            module.disable_gradient_checkpointing = self._reference_forward
        try:
            with _cuda_kernel_path(*self._kernel_modules), _fake_scalars(), _KnownMask(width, per_row):
                super().run(steps, progress)
        finally:
            for module, original in originals:
                module.disable_gradient_checkpointing = original


def trace_generation_bytes(spec: ModelSpec, resolved: ResolvedSetup) -> dict:
    """GRPO's generation phase traced: transformers' real ``generate`` of b·g completions of ``completion_len``
    tokens after ``prompt_len`` prompt tokens, with its real ``DynamicCache``, on fake tensors (the serving trace,
    ``serving/trace.run_inference_trace``, with TRL's sampling config: ``do_sample=True``, temperature 1, no top-k or
    top-p, ``grpo_trainer.py:1155-1173``). The policy generates under ``torch.no_grad`` outside the Trainer's
    autocast (``_generate_single_turn``, :1866-1875) in its stored 16-bit dtype (the compute dtype of a 4-bit
    base). Returns the peak's bytes beside the weights (KV cache, activations, logits and sampling: what
    ``terms/tasks.generation_bytes`` estimates), its phase (prefill or decode) and the cache's final bytes.
    The model states (policy weights, optimizer states) are the training trace's and are not repeated here."""
    from ..options import Method
    from ..serving.terms import InferenceTerm, Weights
    from ..serving.trace import run_inference_trace

    setup = resolved.setup
    if setup.task is not Task.GRPO:
        raise VramcalcError("the generation trace is GRPO's (--task grpo)")
    half = setup.precision.value in ("bf16", "fp16") or setup.method is Method.QLORA
    if not half:
        raise VramcalcError(f"the generation trace runs 16-bit weights; --precision {setup.precision.value} "
                            "generates in fp32")
    weights = Weights.FP16 if "fp16" in setup.precision.value else Weights.BF16
    result = run_inference_trace(spec, batch_size=setup.batch_size * setup.num_generations,
                                 prompt_len=setup.prompt_len, new_tokens=setup.completion_len, weights=weights,
                                 sample=True)
    phase = result.peak_phase
    terms = result.phase_terms[phase]
    return {"generation_bytes": sum(v for k, v in terms.items() if k is not InferenceTerm.WEIGHTS),
            "phase": phase.value, "kv_cache_bytes": result.cache_bytes_final, "seconds": result.seconds}


SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")  # sft_trainer.py:1144-1147 (GKDTrainer is an SFTTrainer)


class _ModelCall:
    """A model called as the Trainer's accelerate-prepared model is: its forward under the step's autocast and
    ``convert_outputs_to_fp32`` on the outputs (``accelerator.py:1791-1801``), the 16-bit logits then dropped."""

    def __init__(self, module, autocast, to_fp32: bool):
        self.module, self._autocast, self.to_fp32 = module, autocast, to_fp32

    def eval(self):
        return self

    def __call__(self, **kwargs):
        with self._autocast():
            out = self.module(**kwargs)
        if self.to_fp32:
            out.logits = out.logits.float()
        return out


class DistillStepTracer(StepTracer):
    """``--task distill``: the HF step with SFTTrainer's fused head on the student (GKDTrainer's parent) and
    ``GKDTrainer.compute_loss`` (``trl/experimental/gkd/gkd_trainer.py:324-361``, beta=0.5) run on fake tensors with
    a teacher built like the student's base (``build.build_model`` on ``--teacher``, full, in the policy's 16-bit
    compute dtype, frozen, eval mode). The Trainer computes the loss outside autocast (``trainer.py:2268-2273``):
    only the two forwards run under it."""

    def __init__(self, model, spec, resolved, tracker):
        from trl.experimental.gkd import gkd_trainer

        from ..catalogue import get_model
        from ..training_setup import resolve_setup
        from . import build
        from .qlora import quant_state_tensors

        self._gkd = gkd_trainer
        self._kernel_modules = prepare_like_trl(model, resolved, tracker, SFT_OUTPUTS)
        setup = resolved.setup
        teacher = get_model(setup.teacher)
        from ..terms.activations import dtypes

        c = dtypes(setup.method, setup.precision, setup.adapter_dtype).c  # terms/tasks.teacher_weight_bytes
        precision = "fp32" if c == 4 else ("fp16" if "fp16" in setup.precision.value else "bf16")
        teacher_resolved = resolve_setup(teacher, method="full", precision=precision, batch_size=setup.batch_size,
                                         seq_len=setup.seq_len, attn=setup.attn.value)
        self.teacher_model = build.build_model(teacher, teacher_resolved, None)
        self.teacher_model.requires_grad_(False)
        self.teacher_model.eval()
        tracker.register_weights(_all_tensors(self.teacher_model) + quant_state_tensors(self.teacher_model))
        self.teacher_model_bytes = sum(t.untyped_storage().nbytes()
                                       for t in {id(t): t for t in _all_tensors(self.teacher_model)}.values())
        super().__init__(model, spec, resolved, tracker)

    def _install_loss(self) -> None:
        self.head = base_model(self.model).get_output_embeddings()
        self.loss = self._distill_loss

    def _distill_loss(self, forward_module, input_ids, on_logits=None, position_ids=None):
        """``DataCollatorForChatML``'s batch (``input_ids``, ``attention_mask``, ``labels`` [b, s] int64) and
        ``GKDTrainer.compute_loss`` with the teacher (``input_ids`` of the HF step unused)."""
        setup = self.setup
        b, s = setup.batch_size, setup.seq_len
        inputs = {"input_ids": torch.zeros(b, s, dtype=torch.long),
                  "attention_mask": torch.ones(b, s, dtype=torch.long),
                  "labels": torch.zeros(b, s, dtype=torch.long)}
        to_fp32 = setup.precision.autocast
        shim = types.SimpleNamespace(teacher_model=_ModelCall(self.teacher_model, self.autocast, to_fp32), beta=0.5,
                                     generalized_jsd_loss=self._gkd.GKDTrainer.generalized_jsd_loss)
        with torch.autocast("cpu", enabled=False):
            return self._gkd.GKDTrainer.compute_loss(shim, _ModelCall(forward_module, self.autocast, to_fp32), inputs)

    def run(self, steps: int = 2, progress=None) -> None:
        width = self.setup.seq_len - 1
        with _cuda_kernel_path(*self._kernel_modules), _KnownMask(width, width):
            super().run(steps, progress)


def _all_tensors(model: nn.Module):
    from .qlora import quant_state_tensors

    return list(model.parameters()) + list(model.buffers()) + quant_state_tensors(model)


class RewardStepTracer(StepTracer):
    """``--task reward``: the HF step on ``AutoModelForSequenceClassification`` (``build.build_model``, num_labels=1;
    peft ``task_type="SEQ_CLS"``) with RewardTrainer's preparation (``enable_input_require_grads`` with peft and
    checkpointing, ``reward_trainer.py:542-543``; QLoRA adapters cast to bf16, :545-552) and its real
    ``compute_loss`` (:778-817) on ``DataCollatorForPreference``'s batch (:203-230: ``input_ids`` and
    ``attention_mask`` [2·b, s] int64, chosen rows over rejected rows), with a stand-in ``self``
    (``center_rewards_coefficient=None``, RewardConfig's default; an accelerator on one process)."""

    def __init__(self, model, spec, resolved, tracker):
        from trl.trainer import reward_trainer

        from ..options import AdapterDtype, Method
        from .stacks.trl import cast_qlora_adapters

        self._reward = reward_trainer
        setup = resolved.setup
        if hasattr(model, "get_base_model") and setup.grad_ckpt:
            model.enable_input_require_grads()
        if setup.method is Method.QLORA and setup.adapter_dtype is AdapterDtype.BF16:
            tracker.register_weights(cast_qlora_adapters(model))
        self.ref_model = None
        self.reference_weight_bytes = 0
        super().__init__(model, spec, resolved, tracker)

    def _install_loss(self) -> None:
        self.head = base_model(self.model).score  # peft's ModulesToSaveWrapper under LoRA
        tracker = self.tracker

        def head_begins(module, args):  # the head's region: score's output and the pooling
            tracker.in_logits = True

        self._hooks.append(self.head.register_forward_pre_hook(head_begins))
        self.loss = self._reward_loss

    def _reward_loss(self, forward_module, input_ids, on_logits=None, position_ids=None):
        setup = self.setup
        rows, s = 2 * setup.batch_size, setup.seq_len
        inputs = {"input_ids": torch.zeros(rows, s, dtype=torch.long),
                  "attention_mask": torch.ones(rows, s, dtype=torch.long)}
        shim = types.SimpleNamespace(
            model=self.model, accelerator=_Accelerator(), args=types.SimpleNamespace(center_rewards_coefficient=None),
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
        return self._reward.RewardTrainer.compute_loss(shim, self.model, inputs)

    def run(self, steps: int = 2, progress=None) -> None:
        with _fake_scalars():
            super().run(steps, progress)


def check_traceable(resolved: ResolvedSetup) -> None:
    setup = resolved.setup
    if not setup.task.uses_fused_head and setup.task not in (Task.DISTILL, Task.REWARD):
        raise VramcalcError(f"--task {setup.task.value} is estimate-only (modelled, not traced yet)")
    if setup.num_gpus > 1:
        raise VramcalcError(f"the --task {setup.task.value} trace runs one GPU; num_gpus={setup.num_gpus} is "
                            "estimate-only")
    if setup.attn is Attention.FLASH:
        raise VramcalcError(f"the --task {setup.task.value} trace runs sdpa or eager: FlashAttention-2 unpads the "
                            "padded batch (flash_attn_varlen_func), a CUDA kernel; --attn flash is estimate-only here")
    if getattr(setup, "activation_offload", False) or setup.compile:
        raise VramcalcError(f"the --task {setup.task.value} trace runs neither --activation-offload nor --compile")


def trace_task(spec: ModelSpec, resolved: ResolvedSetup, *, progress=None, gpu=None):
    """``vramcalc.trace(..., task=...)`` for the preference tasks: the HF step with the task's step tracer."""
    from ..estimator import assemble_measured
    from .engine import run_trace

    trl, _, _ = _import_trl()
    check_traceable(resolved)
    tracers = []

    base = {Task.DISTILL: DistillStepTracer, Task.REWARD: RewardStepTracer}.get(resolved.setup.task,
                                                                                PreferenceStepTracer)

    class Tracer(base):
        def __init__(self, *args):
            super().__init__(*args)
            tracers.append(self)

    result = run_trace(spec, resolved, progress=progress, tracer_class=Tracer)
    ref_bytes = getattr(tracers[0], "reference_weight_bytes", 0) if tracers else 0
    teacher = {"teacher": resolved.setup.teacher,
               "teacher_model_bytes": tracers[0].teacher_model_bytes} if tracers and hasattr(tracers[0], "teacher_model_bytes") else {}
    return assemble_measured(
        spec, resolved, result.terms, result.phase, source="trace (trl)", gpu=gpu, paged_bytes=result.paged_bytes,
        details={"trace_seconds": round(result.seconds, 3), "trace_peak_rss_bytes": result.peak_rss_bytes,
                 "trace_stack": "trl", "trace_stack_version": trl.__version__, "task": resolved.setup.task.value,
                 "reference_model_bytes": ref_bytes,
                 "phase_peaks": {phase.value: peak for phase, peak in result.phase_peaks.items()}, **teacher})


__all__ = ["trace_task", "trace_generation_bytes", "PreferenceStepTracer", "RewardStepTracer", "build_reference_model"]
