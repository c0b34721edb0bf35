"""Trace torchtune 0.6.1's own single-device training step at full size on fake CPU tensors.

What runs is torchtune's code, in the order its recipes run it (``recipes/lora_finetune_single_device.py`` and
``recipes/full_finetune_single_device.py`` of the 0.6.1 wheel; line numbers below are of those files):

- the model: ``torchtune.models.llama3_1._component_builders.llama3_1`` / ``lora_llama3_1`` (``llama3_2`` /
  ``lora_llama3_2`` when the embedding is tied: ``TiedLinear``) from the ModelSpec dims, built under
  ``training.set_default_dtype(dtype)`` on the device (lora recipe :431-432), so every parameter, the LoRA adapters
  included, is in the model dtype. QLoRA is ``quantize_base=True``: each ``LoRALinear`` turns its base weight into a
  torchao ``NF4Tensor`` with ``to_nf4`` as it is built (``torchtune/modules/peft/lora.py``), and its forward is
  ``linear_nf4`` (dequantize to the input dtype, then ``F.linear``). The build runs under the tracker in the ``load``
  phase, so the 16-bit weight that ``to_nf4`` quantizes, and its scratch, are seen.
- ``get_adapter_params`` + ``set_trainable_params`` (lora recipe :439-441);
- ``training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})`` (:446-449): torch's
  non-reentrant ``CheckpointWrapper`` around every decoder layer;
- the loss of the 0.6.1 configs, ``CEWithChunkedOutputLoss`` (8 chunks) with ``model.set_num_output_chunks(8)``
  (:300-302): the output head runs per chunk and *all* chunks' 16-bit logits are returned as a list; each chunk is
  upcast to fp32 inside the loss (``--loss chunked``). ``--loss hf`` is the un-chunked path (``TransformerDecoder.unembed``:
  ``self.output(h).float()``, then ``torch.nn.CrossEntropyLoss``). ``--loss torchtune-2024`` runs that model with the
  loop of the April-July 2024 recipes (``lora_finetune_single_device.py@0217d44c2:460-469``): ``logits =
  logits[..., :-1, :].contiguous()``, ``transpose(1, 2)``, ``CrossEntropyLoss``, ``running_loss += loss``,
  ``loss.backward()``, the step, and no ``del logits``: two steps are traced (one with accumulation), so the next
  forward runs beside the previous micro-batch's logits (phase ``next-forward``);
- ``--no-norm-fp32-product``: every RMSNorm runs torchtune's code of before 2024-11-25 (``_rms_norm_2024``);
- ``compile: True`` (``_compile``): ``training.compile_model`` compiles each ``TransformerSelfAttentionLayer``
  (inside its checkpoint wrapper), run through AOTAutograd's partitioner (``tracing/compiled.compile_layer``), and
  ``training.compile_loss``'s result where the recipe keeps it (``TrainingSetup.compile_loss``, which the stack
  resolves: the full recipes drop it for a plain ``CrossEntropyLoss``);
- ``_loss_step`` and ``train`` (:639-660, :690-718): labels shifted with ``hstack`` of an ignore-index column,
  ``loss * num_tokens``, ``backward()``, ``training.scale_grads(model, 1 / num_tokens)``, ``optimizer.step()``,
  ``zero_grad(set_to_none=True)``;
- optimizer in backward (full recipe :468-483): one optimizer per parameter and
  ``training.register_optim_in_bwd_hooks`` (a post-accumulate-grad hook that steps and zeroes it);
  ``training.create_optim_in_bwd_wrapper`` is only for checkpoint save/load and allocates nothing.

Not traced (the call raises a ``VramcalcError`` naming it): ``OffloadActivations`` (``--activation-offload``) uses CUDA
streams and ``.to("cuda")`` in its pack/unpack hooks (``torchtune/training/_activation_offloading.py:93-97,169,220``),
which a CPU-only torch cannot run; packing (flex-attention block masks); several GPUs.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from ...errors import VramcalcError
from ...model import ModelSpec
from ...options import AdapterDtype, Loss, Method, Phase, Quant, Term
from ...progress import Progress
from ...training_setup import ResolvedSetup
from ..engine import reset_bnb_overrides
from ..step import PhaseHooks, WrapperRecomputeMarker
from . import _driver

STACK = "torchtune"
VERSION = "0.6.1"
LEARNING_RATE = 3e-4  # 8B_lora_single_device.yaml
WEIGHT_DECAY = 0.01  # 8B_lora_single_device.yaml
NUM_OUTPUT_CHUNKS = 8  # CEWithChunkedOutputLoss(num_output_chunks=8), torchtune/modules/loss/ce_chunked_output_loss.py
IGNORE_INDEX = -100

# vramcalc's (peft) target names -> torchtune's lora_attn_modules; the MLP is all or nothing (apply_lora_to_mlp)
_ATTN_TARGETS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def _import_torchtune():
    try:
        from ._compat import install

        install()
        import torchtune  # noqa: F401
    except ImportError as err:
        raise VramcalcError(f"the torchtune trace needs torchtune=={VERSION} (pip install 'vramcalc[stacks]'): "
                            f"{err}") from None


def check_traceable(spec: ModelSpec, resolved: ResolvedSetup) -> None:
    """Refuse, with one sentence, what torchtune 0.6.1's single-device recipes cannot run or the trace cannot run."""
    setup = resolved.setup
    _driver.check_single_device(resolved, STACK)
    _driver.check_llama_style(spec, STACK, "llama3_1 builders")
    if spec.head_dim * spec.num_heads != spec.hidden_size:
        raise VramcalcError("torchtune's llama builders derive head_dim = hidden_size / num_heads; "
                            f"{spec.name} has head_dim {spec.head_dim}")
    if setup.method not in (Method.FULL, Method.LORA, Method.QLORA):
        raise VramcalcError(f"the torchtune trace runs full, lora and qlora, not {setup.method.value}")
    _driver.model_dtype(resolved, STACK)
    if setup.method is Method.QLORA:
        if setup.quant is not Quant.NF4:
            raise VramcalcError("torchtune's QLoRA is torchao NF4 only (quantize_base=True), not "
                                f"{setup.quant.value}")
        if not setup.double_quant:
            raise VramcalcError("torchtune's NF4Tensor always quantizes its scalers (double quantization): "
                                "use --double-quant")
    if setup.method.uses_lora and setup.adapter_dtype is AdapterDtype.FP32 and setup.precision.value != "fp32":
        raise VramcalcError("torchtune builds the adapters in the model dtype (set_default_dtype): "
                            "use --adapter-dtype bf16")
    if setup.method.uses_lora:
        _lora_arguments(resolved)
    if setup.loss not in (Loss.TORCHTUNE, Loss.HF, Loss.TORCHTUNE_2024):
        raise VramcalcError(f"torchtune 0.6.1's recipes use CEWithChunkedOutputLoss (--loss torchtune) or "
                            f"CrossEntropyLoss (--loss hf; --loss torchtune-2024 in the 2024 recipes' loop), "
                            f"not {setup.loss.value}")
    if setup.grad_ckpt.caches_ops:
        raise VramcalcError("torchtune 0.6.1's single-device recipes checkpoint whole layers only "
                            "(enable_activation_checkpointing); selective checkpointing is not traced")
    if getattr(setup, "activation_offload", False):
        raise VramcalcError("torchtune's OffloadActivations needs CUDA streams and .to('cuda') "
                            "(torchtune/training/_activation_offloading.py:93-97,169,220): not traceable on CPU; "
                            "use vramcalc estimate for --activation-offload")
    if getattr(setup, "packing", False):
        raise VramcalcError("the torchtune trace runs unpacked batches; use vramcalc estimate for --packing")
    if getattr(setup, "kernels", None) is not None and getattr(setup.kernels, "value", "none") != "none":
        raise VramcalcError("torchtune does not use Liger kernels")
    if getattr(setup, "optimizer_in_backward", False) and setup.grad_accum > 1:
        raise VramcalcError("torchtune refuses optimizer_in_bwd with gradient_accumulation_steps > 1 "
                            "(recipes/full_finetune_single_device.py:147-156)")


def _lora_arguments(resolved: ResolvedSetup) -> dict:
    """lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output of the builder for the setup's targets."""
    modules = set(resolved.lora_modules)
    unknown = modules - set(_ATTN_TARGETS) - set(_MLP_TARGETS) - {"lm_head"}
    if unknown:
        raise VramcalcError(f"torchtune's LoRA builders cannot target {', '.join(sorted(unknown))}")
    mlp = modules & set(_MLP_TARGETS)
    if mlp and mlp != set(_MLP_TARGETS):
        raise VramcalcError("torchtune applies LoRA to the whole MLP or none of it (apply_lora_to_mlp): "
                            f"targets {', '.join(sorted(mlp))} cannot be stated")
    attn = [name for key, name in _ATTN_TARGETS.items() if key in modules]
    return dict(lora_attn_modules=attn, apply_lora_to_mlp=bool(mlp), apply_lora_to_output="lm_head" in modules)


@contextlib.contextmanager
def _real_rope(fake_mode):
    """torchtune's RoPE modules build their cache in ``__init__`` with data-dependent Python (``Llama3ScaledRoPE
    .apply_scaling`` loops over the frequencies): run ``rope_init`` on real CPU tensors, then hand its buffers
    (``theta`` and the fp32 ``cache`` of shape [max_seq_len, head_dim/2, 2]) to the fake mode."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
    from torchtune.modules.position_embeddings import RotaryPositionalEmbeddings

    originals = {cls: cls.rope_init for cls in (Llama3ScaledRoPE, RotaryPositionalEmbeddings)}

    def patched(original):
        def rope_init(self):
            with unset_fake_temporarily(), torch.device("cpu"):
                original(self)
            for name, buffer in list(self._buffers.items()):
                if buffer is not None:
                    self._buffers[name] = fake_mode.from_tensor(buffer)

        return rope_init

    for cls, original in originals.items():
        cls.rope_init = patched(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.rope_init = original


@contextlib.contextmanager
def _swap_by_assignment():
    """``FrozenNF4Linear.__init__`` (torchtune/modules/low_precision/nf4_linear.py:44-53) re-registers its weight
    with ``torch.utils.swap_tensors(self.weight, Parameter(nf4_weight))``, which refuses a fake tensor that the
    fake mode's converter holds a weak reference to. Inside the build, a refused swap is done as the assignment
    ``module.weight = Parameter(nf4_weight)`` on the module being built: the same parameter in the same slot and the
    same bf16 weight dropped, so the same bytes."""
    from torchtune.modules.low_precision.nf4_linear import FrozenNF4Linear

    original_init = FrozenNF4Linear.__init__
    original_swap = torch.utils.swap_tensors
    building: list[nn.Module] = []

    def swap(t1, t2):
        try:
            return original_swap(t1, t2)
        except RuntimeError:
            module = building[-1] if building else None
            if module is None or module._parameters.get("weight") is not t1:
                raise
            module._parameters["weight"] = t2

    def init(self, *args, **kwargs):
        building.append(self)
        try:
            original_init(self, *args, **kwargs)
        finally:
            building.pop()

    FrozenNF4Linear.__init__ = init
    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        FrozenNF4Linear.__init__ = original_init
        torch.utils.swap_tensors = original_swap


@contextlib.contextmanager
def _one_nf4_chunk_per_length():
    """torchao's ``NF4Tensor.convert_to_norm_float_weight`` (torchao 0.18
    ``quantization/quantize_/workflows/nf4/nf4_tensor.py:815-851``; the same loop since torchao 0.2, ``CHUNK_SIZE =
    1024**2`` at :84) turns a weight's scaled blocks into NF4 codes in chunks of 2^20 elements: each chunk's
    ``quantize_tensor_nearest`` scratch (the [n, 16] distances to the 16 levels, their ``abs``, ``min``'s values and
    indices, the uint8 cast) is freed before the next chunk, whose codes go into one uint8 buffer allocated before the
    loop. On fake tensors a chunk costs only the dispatch of its ops: a 70B model has about 65,000 chunks, and its
    QLoRA trace took 138 s with them, 47 s without (benchmarks/accuracy.md, "Recent knobs"; 2 shared cores, about 40%
    of the samples of a sampling profile in ``to_nf4``). Inside the build, on fake tensors, the loop runs one
    full-length chunk and the last chunk (the only two lengths a weight's chunks have): the same allocations at the
    same sizes beside the same live set as every other chunk, so the same load-phase peak and the same weights; real
    tensors take torchao's own loop."""
    import math

    from torch._subclasses.fake_tensor import FakeTensor
    from torchao.dtypes import nf4tensor

    NF4Tensor = nf4tensor.NF4Tensor
    original = NF4Tensor.__dict__["convert_to_norm_float_weight"]

    def convert(input_tensor, n_blocks, block_size, nf4):
        if not isinstance(input_tensor, FakeTensor):
            return original.__func__(input_tensor, n_blocks, block_size, nf4)
        # torchao's body (nf4_tensor.py:820-851), the chunk loop over distinct chunk lengths only
        flattened_tensor = input_tensor.flatten()
        numel = input_tensor.numel()
        assert numel % 2 == 0, "Number of elements must be even just to not have to think about the end"
        blocks = flattened_tensor.view(n_blocks, block_size)
        scalers = nf4tensor.get_block_absmax(input_tensor.flatten(), block_size)
        scales = scalers.unsqueeze(-1).expand(n_blocks, block_size)
        scaled_blocks = blocks / scales
        quantized_blocks = torch.empty(numel, dtype=torch.uint8, device=input_tensor.device)
        flattened = scaled_blocks.flatten()
        chunk = nf4tensor.CHUNK_SIZE
        for chunk_num in sorted({0, math.ceil(numel / chunk) - 1}):
            start = chunk_num * chunk
            end = min(start + chunk, numel)
            quantized_blocks[start:end] = NF4Tensor.quantize_tensor_nearest(flattened[start:end], nf4).to(torch.uint8)
        combined_blocks = quantized_blocks[::2] << 4 | quantized_blocks[1::2]
        return combined_blocks.to(torch.uint8)

    NF4Tensor.convert_to_norm_float_weight = staticmethod(convert)
    try:
        yield
    finally:
        NF4Tensor.convert_to_norm_float_weight = original


def build_model(spec: ModelSpec, resolved: ResolvedSetup, fake_mode) -> nn.Module:
    """torchtune's own decoder for the spec, built as the recipe builds it (on the device, in the model dtype)."""
    from torchtune import training
    from torchtune.models.llama3_1 import _component_builders as llama3_1
    from torchtune.models.llama3_2 import _component_builders as llama3_2

    setup = resolved.setup
    dtype = _driver.model_dtype(resolved, STACK)
    common = dict(vocab_size=spec.vocab_size, num_layers=spec.num_layers, num_heads=spec.num_heads,
                  num_kv_heads=spec.num_kv_heads, embed_dim=spec.hidden_size,
                  max_seq_len=spec.max_position_embeddings or 4096, intermediate_dim=spec.intermediate_size)
    builders = llama3_2 if spec.tie_word_embeddings else llama3_1
    with _real_rope(fake_mode), _swap_by_assignment(), _one_nf4_chunk_per_length(), \
            training.set_default_dtype(dtype), torch.device("cpu"):
        if setup.method.uses_lora:
            model = (builders.lora_llama3_2 if spec.tie_word_embeddings else builders.lora_llama3_1)(
                **_lora_arguments(resolved), **common, lora_rank=setup.lora_rank, lora_alpha=2 * setup.lora_rank,
                lora_dropout=setup.lora_dropout, quantize_base=setup.method is Method.QLORA)
        else:
            model = (builders.llama3_2 if spec.tie_word_embeddings else builders.llama3_1)(**common)
    return model


def _rms_norm_2024(self, x: torch.Tensor) -> torch.Tensor:
    """torchtune's RMSNorm before #2054 (1450d6126, 2024-11-25), ``modules/rms_norm.py:38-42`` @1814feb17: the weight
    multiplies the normed input after its cast back to the model dtype (``--no-norm-fp32-product``)."""
    x_fp32 = x.float()
    x_normed = (x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
    return x_normed * self.scale


def _use_2024_rms_norm(model: nn.Module) -> None:
    """Every RMSNorm of the model runs ``_rms_norm_2024`` (an instance attribute, so nothing global changes)."""
    import types

    from torchtune.modules import RMSNorm

    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.forward = types.MethodType(_rms_norm_2024, module)


def _nf4_inner_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The plain tensors inside every NF4Tensor weight (quantized data, scalers and their quantization state)."""
    out = []
    for param in model.parameters():
        inner_names = getattr(param, "__tensor_flatten__", None)
        if inner_names is not None and type(param).__name__ == "NF4Tensor":
            names, _ = param.__tensor_flatten__()
            out += [getattr(param, name) for name in names]
    return out


def run_trace(spec: ModelSpec, resolved: ResolvedSetup, *, steps: int | None = None, warm: bool = True,
              progress: bool | None = None) -> _driver.StackTrace:
    """Build torchtune's model and run ``steps`` recipe steps under the tracker (after the optimizer's warm start
    unless ``warm=False``: then ``steps`` cold steps, as the HF trace runs them). By default one step; two of one
    micro-batch under ``--loss torchtune-2024``, whose next forward runs beside the logits the loop still holds."""
    _import_torchtune()
    check_traceable(spec, resolved)
    held_logits = resolved.setup.loss is Loss.TORCHTUNE_2024
    if steps is None:
        steps = 2 if held_logits and resolved.setup.grad_accum == 1 else _driver.TRACE_STEPS
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torchtune import modules, training
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from ..tracker import AllocationTracker

    setup = resolved.setup
    started = time.perf_counter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = AllocationTracker()
    micro_steps = steps * setup.grad_accum
    bar = Progress(1 + micro_steps * 2 * spec.num_layers, f"trace {spec.name} ({STACK})", "layer passes",
                   enabled=progress, leave=False)
    bar.set_note("building the model")
    hooks, markers = None, []
    in_backward_optimizers = {}
    try:
        # -- _setup_model (lora recipe :431-449): built on the device, under the tracker: the load phase
        tracker.phase = Phase.LOAD
        with fake_mode, tracker:
            model = build_model(spec, resolved, fake_mode)
        tracker.register_weights(list(model.parameters()) + list(model.buffers()) + _nf4_inner_tensors(model))
        load = _driver.close_load_phase(tracker)
        if setup.method.uses_lora:
            set_trainable_params(model, get_adapter_params(model))
        else:
            model.requires_grad_(True)
        if not getattr(setup, "norm_fp32_product", True):
            _use_2024_rms_norm(model)
        if setup.grad_ckpt:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        model.train()
        bar.update(1, note=f"step 1 of {steps}")
        if setup.loss is Loss.TORCHTUNE:
            loss_fn = CEWithChunkedOutputLoss(num_output_chunks=NUM_OUTPUT_CHUNKS, ignore_index=IGNORE_INDEX)
            model.set_num_output_chunks(loss_fn.num_output_chunks)
        else:
            loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        if getattr(setup, "compile", False):
            loss_fn = _compile(model, loss_fn, setup)
        ignore_index = IGNORE_INDEX

        with fake_mode:
            # -- _setup_optimizer
            optimizer = None
            hooks = PhaseHooks(tracker, model.layers, [_head_module(model)], model.parameters(),
                                       tick=lambda: bar.update(1))
            if getattr(setup, "optimizer_in_backward", False):
                in_backward_optimizers = _register_optimizer_in_backward(model, setup, tracker)
            else:
                optimizer = _driver.make_optimizer(model.parameters(), setup.optimizer, tracker, stack=STACK,
                                                   lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, adamw_fused=True)
            for layer in model.layers:
                if hasattr(layer, "checkpoint_fn"):
                    markers.append(WrapperRecomputeMarker(layer, tracker))

            with tracker, _driver.cuda_kernels():
                if warm:
                    _driver.warm_start(tracker, [(optimizer, list(model.parameters()))] if optimizer is not None
                                       else [(o, [p]) for p, o in in_backward_optimizers.items()])
                ignore_labels_cache = torch.full((setup.batch_size, 1), ignore_index)  # recipe :351-353
                logits = None
                for step in range(1 if warm else 0, steps + (1 if warm else 0)):
                    tracker.step = step
                    running_loss, num_tokens = 0, 0
                    for _ in range(setup.grad_accum):
                        tokens = torch.zeros(setup.batch_size, setup.seq_len, dtype=torch.long)
                        batch_labels = torch.zeros(setup.batch_size, setup.seq_len, dtype=torch.long)
                        tracker.phase = Phase.FORWARD
                        if held_logits:  # the 2024 loop (module docstring): ``logits`` rebound when the call returns
                            tracker.after_previous = logits is not None
                            logits = model(tokens)
                            tracker.after_previous = False
                            logits = logits[..., :-1, :].contiguous().transpose(1, 2)
                            labels = batch_labels[..., 1:].contiguous()
                            loss = loss_fn(logits, labels) / setup.grad_accum
                            running_loss = running_loss + loss  # the recipe's sum keeps the graph until the log
                        else:  # _loss_step (:639-660)
                            current_num_tokens = (batch_labels != ignore_index).sum()
                            num_tokens = num_tokens + current_num_tokens
                            logits = model(tokens)
                            labels = torch.hstack((batch_labels[..., 1:],
                                                   ignore_labels_cache[: batch_labels.shape[0]]))
                            if not isinstance(logits, list):
                                labels = labels.reshape(-1)
                                logits = logits.reshape(-1, logits.size(-1))
                            loss = loss_fn(logits, labels) * current_num_tokens
                            logits = None
                            running_loss = running_loss + loss.detach()
                        tracker.in_logits = False
                        tracker.end_forward()
                        tracker.phase = Phase.BACKWARD_START
                        tracker.in_logits = True
                        loss.backward()
                        del loss
                        tracker.in_logits = False
                        tracker.mark_gradients(model.parameters())
                    if optimizer is not None:
                        tracker.phase = Phase.OPTIMIZER_STEP
                        tracker.in_optimizer = True
                        if not held_logits:  # the 2024 recipes divide the loss by the accumulation instead
                            training.scale_grads(model, 1 / num_tokens)
                        optimizer.step()
                        tracker.in_optimizer = False
                        tracker.mark_optimizer_states(optimizer)
                        optimizer.zero_grad(set_to_none=True)
                logits = None
        traced = _driver.result(tracker, started, load)
    finally:
        bar.close()
        if hooks is not None:
            hooks.remove()
        for marker in markers:
            marker.remove()
        reset_bnb_overrides()
    return traced


def _compile(model: nn.Module, loss_fn, setup):
    """``compile: True`` (recipes :266-296 @1814feb17): ``training.compile_model`` compiles every
    ``TransformerSelfAttentionLayer`` in place (``training/_compile.py:53-57`` @1814feb17: ``m.compile()``, inside
    the activation-checkpointing wrapper), each run here through AOTAutograd's partitioner (``compiled.compile_layer``);
    ``training.compile_loss`` compiles ``CEWithChunkedOutputLoss.compute_cross_entropy`` in place and any other loss
    as a new module, which only ``lora_finetune_single_device`` keeps (``TrainingSetup.compile_loss``, resolved by
    the stack: ``training_setup._torchtune_loss_uncompiled``)."""
    from torchtune import modules

    from ..compiled import compile_layer, compiled_function

    graphs: dict = {}
    for module in reversed(list(model.modules())):
        if isinstance(module, modules.TransformerSelfAttentionLayer):
            compile_layer(module, graphs)
    if not getattr(setup, "compile_loss", True) or setup.loss is Loss.TORCHTUNE_2024:
        return loss_fn  # (the 2024 recipes had no compile_loss: their loop's loss ran eagerly)
    if setup.loss is Loss.TORCHTUNE:
        loss_fn.compute_cross_entropy = compiled_function(loss_fn.compute_cross_entropy)
        return loss_fn
    return compiled_function(loss_fn)


def _head_module(model: nn.Module) -> nn.Module:
    output = model.output
    return output if isinstance(output, nn.Module) else model.norm  # TiedLinear is not a Module: mark after the norm


def _register_optimizer_in_backward(model: nn.Module, setup, tracker):
    """full recipe :468-483: ``{p: optimizer([p])}`` and ``training.register_optim_in_bwd_hooks``. Two hooks of ours
    bracket torchtune's (post-accumulate-grad hooks run in registration order): the optimizer flag before, the states
    as optimizer states after."""
    from torchtune import training

    optim_dict = {p: _driver.make_optimizer([p], setup.optimizer, tracker, stack=STACK, lr=LEARNING_RATE,
                                            weight_decay=WEIGHT_DECAY, adamw_fused=True)
                  for p in model.parameters()}

    def before(param):
        tracker.in_optimizer = True

    def after(param):
        tracker.in_optimizer = False
        tracker.mark_optimizer_states(optim_dict[param])

    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(before)
    training.register_optim_in_bwd_hooks(model=model, optim_dict=optim_dict)
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(after)
    training.create_optim_in_bwd_wrapper(model=model, optim_dict=optim_dict)
    return optim_dict


def trace_torchtune(spec: ModelSpec, resolved: ResolvedSetup, *, progress: bool | None = None, gpu=None):
    """torchtune's traced step as a ``MemoryBreakdown`` (same terms and type as ``vramcalc.trace``)."""
    traced = run_trace(spec, resolved, progress=progress)
    return _driver.breakdown(spec, resolved, traced, STACK, gpu=gpu)
