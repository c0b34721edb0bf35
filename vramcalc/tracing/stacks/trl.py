"""Trace TRL 1.16's ``SFTTrainer`` training step: the HF trace's model and step, prepared and scored by TRL's own code.

TRL sits on transformers + peft, so the model, the optimizer and the step are the HF trace's (``tracing/runner.py``,
``build.py``, ``step.py``: transformers ``Trainer`` with accelerate's autocast). What SFTTrainer changes is run with its
real functions, in the order ``SFTTrainer.__init__`` and ``compute_loss`` run them (trl 1.16.0 wheel; line numbers of
``trl/trainer/sft_trainer.py`` unless said otherwise):

- with PEFT and gradient checkpointing, ``model.enable_input_require_grads()`` (:899-900; transformers 5.24's
  ``activation_checkpointing_enable`` already does it, ``modeling_utils.py:3193-3198``, so it changes nothing);
- QLoRA (a 4-bit base): every trainable parameter but DoRA's ``lora_magnitude_vector`` is cast to bf16 (:908-911),
  when the setup's adapter dtype is bf16 (the trl preset); an explicit ``--adapter-dtype fp32`` keeps peft's fp32;
- ``add_fused_lm_head(base_model, outputs=("log_probs", "entropy", "is_top1"))`` (:1144-1147;
  ``trl/trainer/utils.py:1548``): the patched forward runs the backbone, drops the last position, keeps the positions
  whose label is not -100 (``hidden_states[mask]``, a copy) and calls ``trl.kernels.ChunkedLogProbFunction``
  (``kernels/chunked_logprob.py:299``) with ``_CHUNKED_LOGPROB_CHUNK_SIZE = 32768`` vocabulary columns per tile
  (``utils.py:1506``) and ``TOKEN_CHUNK_SIZE = 4096`` tokens per tile (``chunked_logprob.py:31``);
- ``compute_loss`` (:1560-1618, the default ``loss_type="nll"`` branch): ``model(**inputs, fused_lm_head=True)``,
  ``loss = (-outputs.log_probs).sum() / num_tokens``, and the metrics' reductions (:1640-1642) without ``.item()``.

The kernel, as a CUDA GPU runs it. On CUDA ``_use_triton`` is true (``chunked_logprob.py:48-49``): only the
valid positions are scored (``compact``, ``utils.py:1642-1646``), each [4096, 32768] tile of ``hidden @ W.T`` is
written into one reused ``mm_buf`` in the compute dtype and folded by a Triton kernel that allocates nothing;
backward recomputes each tile into the same kind of buffer, overwrites it with the logits gradient in place, and
accumulates ``grad_hidden`` [N, h] (and ``grad_weight`` [V, h] when lm_head trains) in fp32 with
``torch.addmm(..., out_dtype=float32, out=acc)`` (``_addmm_fp32``, CUDA branch, :52-62). Forward saves ``hidden``
(the [N, h] copy), ``targets`` [N] int64, ``log_z`` and ``entropy`` [N] fp32 (:386). Nothing runs under
``torch.utils.checkpoint``. A CPU-only torch has no Triton, so while the trace runs (``_cuda_kernel_path``):
``_use_triton`` answers True, the two Triton kernels are no-ops (they only write into tensors that exist),
``_addmm_fp32`` takes its CUDA branch, and ``triton.cdiv`` is integer ceiling division. The arithmetic is skipped;
every allocation of the real code runs.

Labels: every position is trained (``labels = input_ids``, as in the HF trace), so the boolean-mask ops whose output
size depends on the mask's values (``hidden_states[mask]``, its backward, ``masked_scatter``'s backward) are answered
for an all-true mask (``_AllLabelsValid``): fake tensors cannot count a mask's true values.

Not traced (``VramcalcError``): several GPUs (DeepSpeed/FSDP gather the head around the kernel); ``--loss hf`` or
``fused`` (SFTTrainer 1.16 always scores with the fused head unless ``compute_loss_func`` or label smoothing is set,
and refuses Liger's fused linear cross-entropy, :1135-1138); ``--activation-offload`` (TRL's ``OffloadActivations``,
``get_act_offloading_ctx_manager``, :1189-1193, moves tensors on CUDA streams); ``--grad-ckpt selective`` (TRL's own
policy, :1085-1096, saves only the attention op's output: not vramcalc's matmul-saving policy).
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ...errors import VramcalcError
from ...model import ModelSpec
from ...options import AdapterDtype, Method
from ...training_setup import ResolvedSetup
from ..step import StepTracer, base_model, checkpoint_mode

STACK = "trl"
VERSION = "1.16.0"
IGNORE_INDEX = -100
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")  # sft_trainer.py:1144-1147 (is_top1 feeds mean_token_accuracy)
_TRL_LOSSES = ("trl",)  # the trl preset's loss word


def _import_trl():
    try:
        import trl
        from trl.kernels import chunked_logprob
        from trl.trainer import utils as trl_utils
    except ImportError as err:
        raise ImportError(f"tracing --stack trl runs TRL's own code ({err.name} is missing): "
                          "pip install 'vramcalc[stacks]'") from None
    missing = [name for module, name in ((trl_utils, "add_fused_lm_head"), (chunked_logprob, "_forward_kernel"),
                                         (chunked_logprob, "_backward_kernel"), (chunked_logprob, "_addmm_fp32"),
                                         (chunked_logprob, "_use_triton"), (trl_utils, "_use_triton"))
               if not hasattr(module, name)]
    if missing:
        raise VramcalcError(f"the trl trace follows trl {VERSION}; trl {trl.__version__} lacks "
                            f"{', '.join(missing)}")
    return trl, trl_utils, chunked_logprob


def check_traceable(resolved: ResolvedSetup) -> None:
    setup = resolved.setup
    if setup.num_gpus > 1:
        raise VramcalcError(f"the trl trace runs one GPU; num_gpus={setup.num_gpus} is estimate-only for this stack")
    if getattr(setup, "activation_offload", False):
        raise VramcalcError(f"the trl trace does not run TRL's activation offloading (trl/models/"
                            f"activation_offloading.py:640, torchtune's OffloadActivations on CUDA streams); "
                            "--activation-offload with --stack trl is estimate-only")
    if checkpoint_mode(setup).caches_ops:
        raise VramcalcError("TRL's selective checkpointing saves attention outputs only (trl/models/selective_"
                            "activation_checkpointing.py:51), not vramcalc's op-level policies; "
                            "not traced with --stack trl")
    if getattr(setup.loss, "value", setup.loss) not in _TRL_LOSSES:
        raise VramcalcError(f"SFTTrainer (trl {VERSION}) scores with its fused lm_head (trl/trainer/sft_trainer.py:"
                            f"1144); --loss {setup.loss.value} is not what it runs: leave --loss to the trl preset")


# -- the CUDA path of the kernel on fake CPU tensors --------------------------------------------------------------
class _NoAllocKernel:
    """A Triton kernel stand-in: ``kernel[grid](*args)`` writes into tensors that already exist, so it allocates
    nothing; the trace counts bytes, not values."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None


def _addmm_fp32_cuda(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``_addmm_fp32``'s CUDA branch (``chunked_logprob.py:52-62``): an fp32 accumulate with no fp32 copy of 16-bit
    inputs; fp32 inputs take its other branch, where ``.float()`` returns the tensor itself."""
    if a.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


@contextlib.contextmanager
def _cuda_kernel_path(trl_utils, chunked_logprob):
    """Run ``ChunkedLogProbFunction`` and the fused forward as on a CUDA GPU with Triton (see the module docstring)."""
    saved = {(module, name): getattr(module, name, None) for module, name in (
        (trl_utils, "_use_triton"), (chunked_logprob, "_use_triton"), (chunked_logprob, "_forward_kernel"),
        (chunked_logprob, "_backward_kernel"), (chunked_logprob, "_addmm_fp32"), (chunked_logprob, "triton"))}
    kernel = _NoAllocKernel()
    trl_utils._use_triton = chunked_logprob._use_triton = lambda device: True
    chunked_logprob._forward_kernel = chunked_logprob._backward_kernel = kernel
    chunked_logprob._addmm_fp32 = _addmm_fp32_cuda
    if saved[(chunked_logprob, "triton")] is None:
        chunked_logprob.triton = types.SimpleNamespace(cdiv=lambda a, b: -(-a // b))
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            if value is None:
                if hasattr(module, name):
                    delattr(module, name)
            else:
                setattr(module, name, value)


class _AllLabelsValid(TorchDispatchMode):
    """Boolean-mask ops answered for an all-true mask, with the allocation the real op makes for it.

    - ``aten.index.Tensor(x, [mask])`` (``hidden_states[mask]``): a new [mask.numel(), *rest] tensor;
    - ``aten.masked_select(x, mask)`` (``masked_scatter``'s backward): a new 1-D tensor of the broadcast numel;
    - ``aten.nonzero(mask)``: [numel, ndim] int64;
    - ``aten.index_put`` / ``index_put_`` / ``_index_put_impl_`` with a bool index (``index``'s backward writes the
      gradient into zeros of the input's shape): in place, or a new tensor of ``x``'s shape.
    Other ops pass through. The allocations go through the modes below this one (the tracker sees them).
    """

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten.index.Tensor and _bool_index(args[1]):
            x, (mask,) = args[0], [i for i in args[1] if i is not None]
            return torch.empty((mask.numel(), *x.shape[mask.dim():]), dtype=x.dtype, device=x.device)
        if func is aten.masked_select.default:
            x, mask = args[0], args[1]
            numel = torch.broadcast_shapes(x.shape, mask.shape).numel()
            return torch.empty((numel,), dtype=x.dtype, device=x.device)
        if func is aten.nonzero.default:
            mask = args[0]
            return torch.empty((mask.numel(), mask.dim()), dtype=torch.long, device=mask.device)
        if func in (aten.index_put_.default, aten._index_put_impl_.default) and _bool_index(args[1]):
            return args[0]
        if func is aten.index_put.default and _bool_index(args[1]):
            return torch.empty_like(args[0])
        return func(*args, **kwargs)


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None)


# -- SFTTrainer's model preparation and loss ----------------------------------------------------------------------
def cast_qlora_adapters(model: nn.Module) -> list[nn.Parameter]:
    """sft_trainer.py:908-911: on a quantized base, trainable parameters (not DoRA's magnitude) become bf16.
    Returns the parameters whose storage changed."""
    changed = []
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_magnitude_vector" not in name and param.dtype != torch.bfloat16:
            param.data = param.data.to(torch.bfloat16)
            changed.append(param)
    return changed


class SFTLoss:
    """``SFTTrainer.compute_loss`` for ``loss_type="nll"`` (sft_trainer.py:1611-1618, 1640-1642) on the model that
    ``add_fused_lm_head`` patched. ``on_logits`` fires when the backbone returns (the fused head's region): a forward
    hook on the backbone, since lm_head's own forward never runs."""

    def __init__(self, model: nn.Module):
        self.inner = base_model(model)
        self.head = self.inner.get_output_embeddings()
        self._on_logits = None
        backbone = getattr(self.inner, self.inner.base_model_prefix)
        self.hook = backbone.register_forward_hook(self._backbone_done)

    def _backbone_done(self, module, args, output):
        if self._on_logits is not None:
            self._on_logits()

    def __call__(self, forward_module: nn.Module, input_ids: torch.Tensor, on_logits=None, position_ids=None):
        inputs = {"input_ids": input_ids, "labels": input_ids, "use_cache": False}
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        self._on_logits = on_logits
        try:
            outputs = forward_module(**inputs, fused_lm_head=True)
        finally:
            self._on_logits = None
        per_token_loss = -outputs.log_probs  # zero on ignored positions
        num_tokens = outputs.label_mask.sum()
        loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        # the metrics (gather_for_metrics on one process is the identity; .item() is left out)
        outputs.label_mask.sum(), outputs.entropy.detach().sum(), outputs.is_top1.sum()
        del outputs, per_token_loss
        return loss


def prepare_like_trl(model, resolved: ResolvedSetup, tracker, outputs) -> tuple:
    """What TRL's trainers do to the model before the optimizer is built (SFTTrainer, DPOTrainer and GRPOTrainer alike):
    with peft and checkpointing, ``enable_input_require_grads`` (sft_trainer.py:899-900, dpo_trainer.py:717-718);
    QLoRA adapters cast to bf16 (sft_trainer.py:908-911, dpo_trainer.py:727-729); the fused lm_head with the trainer's
    ``outputs`` (sft_trainer.py:1144-1147, dpo_trainer.py:955-960, grpo_trainer.py:1068-1073). Returns the TRL modules
    whose kernels run on the CUDA path (``_cuda_kernel_path``)."""
    _, trl_utils, chunked_logprob = _import_trl()
    setup = resolved.setup
    if hasattr(model, "get_base_model") and setup.grad_ckpt:
        model.enable_input_require_grads()
    if setup.method is Method.QLORA and setup.adapter_dtype is AdapterDtype.BF16:
        tracker.register_weights(cast_qlora_adapters(model))
    trl_utils.add_fused_lm_head(base_model(model), outputs=outputs)
    return trl_utils, chunked_logprob


class SFTStepTracer(StepTracer):
    """The HF step with SFTTrainer's preparation (before the optimizer is built) and ``SFTLoss``."""

    def __init__(self, model, spec, resolved, tracker):
        self._kernel_modules = prepare_like_trl(model, resolved, tracker, SFT_OUTPUTS)
        super().__init__(model, spec, resolved, tracker)

    def _install_loss(self) -> None:
        self.loss = SFTLoss(self.model)
        self.head = self.loss.head
        self._hooks.append(self.loss.hook)

    def run(self, steps: int = 2, progress=None) -> None:
        with _cuda_kernel_path(*self._kernel_modules), _AllLabelsValid():
            super().run(steps, progress)


def trace_trl(spec: ModelSpec, resolved: ResolvedSetup, *, progress=None, gpu=None):
    """``vramcalc.trace(..., stack="trl")``: the HF trace run with ``SFTStepTracer``."""
    from ...estimator import assemble_measured
    from ..engine import run_trace

    trl, _, _ = _import_trl()
    check_traceable(resolved)
    result = run_trace(spec, resolved, progress=progress, tracer_class=SFTStepTracer)
    return assemble_measured(
        spec, resolved, result.terms, result.phase, source="trace (trl)", gpu=gpu, paged_bytes=result.paged_bytes,
        details={"trace_seconds": round(result.seconds, 3), "trace_peak_rss_bytes": result.peak_rss_bytes,
                 "trace_stack": STACK, "trace_stack_version": trl.__version__})


__all__ = ["trace_trl", "SFTStepTracer", "SFTLoss", "cast_qlora_adapters", "prepare_like_trl"]
