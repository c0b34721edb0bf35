"""Trace litgpt 0.5.13's own single-device fine-tuning step at full size on fake CPU tensors.

What runs is litgpt's and Lightning Fabric's code, in the order ``litgpt/finetune/lora.py`` (``main`` :183-240,
``fit`` :285-366) and ``litgpt/finetune/full.py`` (:153-160, :280-291) run it:

- the model: ``litgpt.lora.GPT`` (LoRA, QLoRA) or ``litgpt.model.GPT`` (full) from a ``Config`` with the ModelSpec
  dims (``LLaMAMLP``, ``RMSNorm``, no bias, an untied ``lm_head``), built in the precision's dtype as
  ``fabric.init_module`` does (Fabric sets the default dtype); LoRA on the fused qkv projection is
  ``LoRAQKVLinear`` with ``lora_query/lora_key/lora_value`` (its ``zero_pad`` scatters the q/k/v slices into the
  fused width), ``lora_projection`` (o), ``lora_mlp`` (the whole MLP), ``lora_head``; ``mark_only_lora_as_trainable``;
- ``fabric.setup_module``: a real ``lightning.Fabric`` on the CPU with ``precision="bf16-true"`` (or ``32-true``), or
  with ``plugins=BitsandbytesPrecision("nf4"|"nf4-dq", bf16)`` for QLoRA (finetune/lora.py:139-150). Its
  ``_FabricModule.forward`` casts the model's outputs to the default dtype after the forward context
  (``lightning/fabric/wrappers.py:133-138``, ``plugins/precision/half.py:62-63``, ``bitsandbytes.py`` ``convert_output``):
  **the bf16 logits chunks come back as fp32 copies**, and ``fit`` keeps that list (``logits``) alive through
  ``fabric.backward`` (finetune/lora.py:355-359);
- QLoRA: Fabric replaces every ``torch.nn.Linear`` (lm_head included) with a bitsandbytes ``Linear4bit`` that quantizes
  an fp16 copy (``bitsandbytes.py`` ``_Linear4bit.quantize``); on CPU the layer is vramcalc's ``FakeLinear4bit``
  (``tracing/qlora.py``: bitsandbytes' own ``quantize_4bit`` shapes, ``Linear4bit.forward`` and ``MatMul4Bit``) with an
  fp16 quantization state. Then the recipe swaps ``transformer.wte`` for a bitsandbytes ``StableEmbedding``
  (finetune/lora.py:218-228), *after* the optimizer was built: the new embedding (and its LayerNorm) require grad but
  are not in the optimizer, so their gradient is computed every step and never freed;
- the optimizer: ``instantiate_torch_optimizer`` (torch AdamW; foreach is what torch picks on CUDA) or, for QLoRA,
  ``instantiate_bnb_optimizer`` = ``bitsandbytes.optim.PagedAdamW`` (utils.py:619-633);
- the step: ``model(input_ids, lm_head_chunk_size=128)``, ``logits[-1] = logits[-1][..., :-1, :]``,
  ``chunked_cross_entropy(logits, targets[..., 1:])`` (utils.py:302-331: cross-entropy per 128-token chunk in the
  logits' dtype), ``fabric.backward(loss / accumulation)``, ``optimizer.step()``, ``optimizer.zero_grad()``; full
  fine-tuning: ``model(input_ids)`` and ``chunked_cross_entropy(logits[..., :-1, :], ...)``.

Not traced: several devices (FSDP/ModelParallelStrategy with per-Block checkpointing), ``validate`` and
``generate_example`` (no-grad passes outside the step), and the CUDA-only quantize-on-construction transients of
Fabric's ``_Linear4bit`` (the trace has no load phase for litgpt). ``--grad-ckpt``: the single-device recipe has
none; the trace wraps each ``Block`` with torch's non-reentrant checkpoint as litgpt's ``parallelize_fn``
(finetune/lora.py:522-530) does on several devices.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import torch
from torch import nn

from ...errors import VramcalcError
from ...model import ModelSpec
from ...options import AdapterDtype, Loss, Method, Phase, Precision, Quant, Term
from ...progress import Progress
from ...training_setup import ResolvedSetup
from ..engine import reset_bnb_overrides
from ..step import PhaseHooks, WrapperRecomputeMarker
from . import _driver

STACK = "litgpt"
VERSION = "0.5.13"
LM_HEAD_CHUNK_SIZE = 128  # finetune/lora.py:355
# the traced steps after the warm start when a step is one micro-batch: the second one's forward runs beside what
# fit() still holds of the first (with accumulation, the second micro-batch of the one step does)
TRACED_STEPS = 2
LEARNING_RATE = 3e-4
_QKV = {"q_proj": "lora_query", "k_proj": "lora_key", "v_proj": "lora_value"}
_MLP = ("gate_proj", "up_proj", "down_proj")


def _import_litgpt():
    try:
        import lightning  # noqa: F401
        import litgpt  # noqa: F401
    except ImportError as err:
        raise VramcalcError(f"the litgpt trace needs litgpt=={VERSION} and lightning (pip install "
                            f"'vramcalc[stacks]'): {err}") from None


def check_traceable(spec: ModelSpec, resolved: ResolvedSetup) -> None:
    setup = resolved.setup
    _driver.check_single_device(resolved, STACK)
    _driver.check_llama_style(spec, STACK, "LLaMAMLP, RMSNorm")
    if setup.method not in (Method.FULL, Method.LORA, Method.QLORA):
        raise VramcalcError(f"the litgpt trace runs full, lora and qlora, not {setup.method.value}")
    _driver.model_dtype(resolved, STACK)
    if setup.method is Method.QLORA:
        if setup.quant is not Quant.NF4:
            raise VramcalcError(f"the litgpt trace runs --quantize bnb.nf4 / bnb.nf4-dq, not {setup.quant.value}")
        if setup.precision not in (Precision.BF16, Precision.BF16_TRUE):
            raise VramcalcError("litgpt's QLoRA is bf16-true with bitsandbytes (finetune/lora.py:141-150)")
        if not getattr(setup, "quantize_lm_head", True):
            raise VramcalcError("litgpt's bitsandbytes plugin quantizes lm_head too (every torch.nn.Linear): "
                                "use --quantize-lm-head")
    if setup.method.uses_lora:
        _lora_flags(resolved)
        if setup.adapter_dtype is AdapterDtype.FP32 and setup.precision is not Precision.FP32:
            raise VramcalcError("litgpt builds the adapters in the model dtype (bf16-true): use --adapter-dtype bf16")
    if setup.loss is not Loss.LITGPT:
        raise VramcalcError("litgpt's step uses its chunked_cross_entropy on fp32 logits (--loss litgpt)")
    if setup.grad_ckpt.caches_ops:
        raise VramcalcError("litgpt checkpoints whole Blocks only")
    for knob in ("activation_offload", "compile", "packing", "optimizer_in_backward"):
        if getattr(setup, knob, False):
            raise VramcalcError(f"litgpt's finetune recipes have no {knob.replace('_', '-')}")


def _lora_flags(resolved: ResolvedSetup) -> dict:
    modules = set(resolved.lora_modules)
    unknown = modules - set(_QKV) - set(_MLP) - {"o_proj", "lm_head"}
    if unknown:
        raise VramcalcError(f"litgpt's LoRA cannot target {', '.join(sorted(unknown))}")
    mlp = modules & set(_MLP)
    if mlp and mlp != set(_MLP):
        raise VramcalcError("litgpt applies LoRA to the whole MLP or none of it (lora_mlp): targets "
                            f"{', '.join(sorted(mlp))} cannot be stated")
    flags = {flag: name in modules for name, flag in _QKV.items()}
    flags.update(lora_projection="o_proj" in modules, lora_mlp=bool(mlp), lora_head="lm_head" in modules)
    return flags


def _config(spec: ModelSpec, resolved: ResolvedSetup):
    import litgpt
    import litgpt.lora

    setup = resolved.setup
    fields = dict(name=spec.name, block_size=spec.max_position_embeddings or 4096, vocab_size=spec.vocab_size,
                  padded_vocab_size=spec.vocab_size, n_layer=spec.num_layers, n_head=spec.num_heads,
                  n_embd=spec.hidden_size, n_query_groups=spec.num_kv_heads, head_size=spec.head_dim,
                  intermediate_size=spec.intermediate_size, rotary_percentage=1.0, parallel_residual=False,
                  bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", norm_eps=1e-5)
    if not setup.method.uses_lora:
        return litgpt.Config(**fields)
    return litgpt.lora.Config(**fields, lora_r=setup.lora_rank, lora_alpha=2 * setup.lora_rank,
                              lora_dropout=setup.lora_dropout, **_lora_flags(resolved))


def _fabric(resolved: ResolvedSetup):
    """The Fabric of finetune/lora.py:139-170 on one CPU device. Fabric's connector refuses the bitsandbytes plugin
    without a CUDA accelerator (connector.py ``_check_and_init_precision``), so for QLoRA the plugin is put in
    place of the bf16-true one after construction: the strategy's and Fabric's precision are that plugin, as on a GPU.
    """
    import lightning as L

    setup = resolved.setup
    precision = {Precision.BF16: "bf16-true", Precision.BF16_TRUE: "bf16-true", Precision.FP32: "32-true"}[setup.precision]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if setup.method is Method.QLORA:
            from lightning.fabric.plugins import BitsandbytesPrecision

            mode = "nf4-dq" if setup.double_quant else "nf4"
            fabric = L.Fabric(accelerator="cpu", devices=1, precision="bf16-true")
            plugin = BitsandbytesPrecision(mode, torch.bfloat16)
            fabric._strategy.precision = plugin
            fabric._precision = plugin
            return fabric
        return L.Fabric(accelerator="cpu", devices=1, precision=precision)


def _quantize_linears(model: nn.Module, resolved: ResolvedSetup) -> None:
    """Every ``torch.nn.Linear`` becomes a bitsandbytes 4-bit layer, as Fabric's class replacement inside
    ``init_module`` does (lm_head included); its quantization state is fp16 (Fabric quantizes an fp16 copy)."""
    from ..qlora import _quantized_template, fake_linear4bit_class

    setup = resolved.setup
    linear4bit = fake_linear4bit_class()
    state_dtype = _quant_state_dtype(resolved)
    templates = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                key = tuple(child.weight.shape)
                if key not in templates:
                    templates[key] = _quantized_template(key, state_dtype, "nf4", setup.double_quant)
                layer = linear4bit(child, templates[key], "nf4", setup.double_quant, torch.bfloat16)
                # bitsandbytes <= 0.43 (litgpt 0.4.x pinned 0.42.0): MatMul4Bit keeps its input (tracing/qlora.py)
                layer.holds_input = bool(getattr(setup, "quant_saves_input", False))
                setattr(parent, name, layer)


def _quant_state_dtype(resolved: ResolvedSetup) -> torch.dtype:
    word = getattr(getattr(resolved.setup, "quant_state_dtype", None), "value", "auto")
    return {"bf16": torch.bfloat16, "fp32": torch.float32}.get(word, torch.float16)


def _checkpoint_blocks(model: nn.Module) -> None:
    """litgpt's ``parallelize_fn`` (finetune/lora.py:522-530) checkpoints each ``Block`` with torch's
    ``checkpoint_wrapper``; the single-device recipe does not: used only when the setup asks for it."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = model.transformer.h
    for index, block in enumerate(list(blocks)):
        blocks[index] = checkpoint_wrapper(block)


def run_trace(spec: ModelSpec, resolved: ResolvedSetup, *, steps: int | None = None, warm: bool = True,
              progress: bool | None = None) -> _driver.StackTrace:
    """Build litgpt's model, set it up with Fabric and run ``steps`` steps of ``fit`` under the tracker (after the
    optimizer's warm start unless ``warm=False``; by default two steps of one micro-batch, else one)."""
    _import_litgpt()
    check_traceable(spec, resolved)
    if steps is None:
        steps = TRACED_STEPS if resolved.setup.grad_accum == 1 else 1
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..build import _materialise
    from ..tracker import AllocationTracker

    setup = resolved.setup
    dtype = _driver.model_dtype(resolved, STACK)
    started = time.perf_counter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = AllocationTracker()
    bar = Progress(1 + steps * setup.grad_accum * 2 * spec.num_layers, f"trace {spec.name} ({STACK})",
                   "layer passes", enabled=progress, leave=False)
    bar.set_note("building the model")
    hooks, markers = None, []
    quantized = setup.method is Method.QLORA
    try:
        fabric = _fabric(resolved)
        config = _config(spec, resolved)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # fabric.init_module: the precision's tensor_init_context
        try:
            with torch.device("meta"):
                if setup.method.uses_lora:
                    from litgpt.lora import GPT, mark_only_lora_as_trainable

                    model = GPT(config)
                    mark_only_lora_as_trainable(model)
                else:
                    from litgpt.model import GPT

                    model = GPT(config)
                if quantized:
                    _quantize_linears(model, resolved)
        finally:
            torch.set_default_dtype(default_dtype)
        if setup.grad_ckpt:
            _checkpoint_blocks(model)
        with fake_mode:
            _materialise(model, "cpu")
            if quantized:
                from ..qlora import materialise_quant_states

                materialise_quant_states(model, "cpu")
            with _default_dtype(dtype):
                model.max_seq_length = setup.seq_len  # fit(): the longest sequence; rebuilds the RoPE cache
            module = _setup_module(fabric, model)
            optimizer = _make_optimizer(model, resolved, tracker)
            if quantized and setup.stable_embedding:
                _stable_embedding(model)  # finetune/lora.py:218-228, after the optimizer (litgpt >= 0.4.13)
            optimizer = fabric.setup_optimizers(optimizer)
        weights = list(model.parameters()) + list(model.buffers())
        if quantized:
            from ..qlora import quant_state_tensors

            weights += quant_state_tensors(model)
        tracker.register_weights(weights)
        tracker.phase = Phase.FORWARD
        model.train()
        bar.update(1, note=f"step 1 of {steps}")
        blocks = [getattr(block, "_checkpoint_wrapped_module", block) for block in model.transformer.h]
        hooks = PhaseHooks(tracker, list(model.transformer.h), [model.lm_head], model.parameters(),
                                   tick=lambda: bar.update(1))
        for block in model.transformer.h:
            if hasattr(block, "checkpoint_fn"):
                markers.append(WrapperRecomputeMarker(block, tracker))
        del blocks
        accumulation = setup.grad_accum
        logits = None
        with fake_mode, tracker, _driver.cuda_kernels(bnb=quantized):
            if warm:
                _driver.warm_start(tracker, [(optimizer.optimizer, list(model.parameters()))])
            for step in range(1 if warm else 0, steps + (1 if warm else 0)):
                tracker.step = step
                for micro_batch in range(accumulation):
                    tracker.phase = Phase.FORWARD
                    # fit() rebinds ``logits`` only when the model call returns (finetune/lora.py:355-366): the
                    # previous micro-batch's list, and the graph its grad_fn chain reaches, live through this forward
                    tracker.after_previous = logits is not None
                    input_ids = torch.zeros(setup.batch_size, setup.seq_len, dtype=torch.long)
                    targets = torch.zeros(setup.batch_size, setup.seq_len, dtype=torch.long)
                    if setup.method.uses_lora:  # finetune/lora.py:355-359
                        logits = module(input_ids, lm_head_chunk_size=LM_HEAD_CHUNK_SIZE)
                        tracker.after_previous = False
                        logits[-1] = logits[-1][..., :-1, :]
                        loss = _chunked_cross_entropy(logits, targets[..., 1:])
                    else:  # finetune/full.py:282-285
                        logits = module(input_ids)
                        tracker.after_previous = False
                        loss = _chunked_cross_entropy(logits[..., :-1, :], targets[..., 1:])
                    tracker.in_logits = False
                    tracker.end_forward()
                    tracker.phase = Phase.BACKWARD_START
                    tracker.in_logits = True
                    fabric.backward(loss / accumulation)
                    tracker.in_logits = False
                    tracker.mark_gradients(model.parameters())
                    if micro_batch < accumulation - 1:
                        loss = None  # fit() logs every iteration (log_interval 1): ``loss`` becomes a float
                tracker.phase = Phase.OPTIMIZER_STEP
                tracker.in_optimizer = True
                optimizer.step()
                tracker.in_optimizer = False
                tracker.mark_optimizer_states(optimizer.optimizer)
                optimizer.zero_grad()
                loss = None  # the iteration's logging, after the step (finetune/lora.py:376-377)
            del logits
        traced = _driver.result(tracker, started, None, _NOT_TRACED)
    finally:
        bar.close()
        if hooks is not None:
            hooks.remove()
        for marker in markers:
            marker.remove()
        reset_bnb_overrides()
    return traced


_NOT_TRACED = ("load phase (Fabric's _Linear4bit quantizes on construction on CUDA only)",)


def _setup_module(fabric, model: nn.Module):
    """``fabric.setup_module`` on one device (fabric.py ``setup_module``): ``precision.convert_module``, the move to
    the device, ``strategy.setup_module``, then the ``_FabricModule`` wrapper. The model is already in the precision's
    dtype and on the device, so the conversions are no-ops in a real run; on fake tensors ``Module.to`` tries to swap
    every parameter and fails, so they are skipped. bitsandbytes' ``convert_module`` only sets each 4-bit layer's
    ``compute_dtype`` (bf16), which ``FakeLinear4bit`` already has."""
    from lightning.fabric.wrappers import _FabricModule

    fabric._models_setup += 1
    return _FabricModule(model, fabric._strategy, original_module=model)


def _chunked_cross_entropy(logits, targets):
    from litgpt.utils import chunked_cross_entropy

    return chunked_cross_entropy(logits, targets)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _make_optimizer(model: nn.Module, resolved: ResolvedSetup, tracker):
    """finetune/lora.py:218-231: PagedAdamW over ``model.parameters()`` when quantized, else the configured torch
    optimizer (AdamW by default)."""
    setup = resolved.setup
    return _driver.make_optimizer(model.parameters(), setup.optimizer, tracker, stack=STACK, lr=LEARNING_RATE,
                                  adamw_fused=True)


def _stable_embedding(model: nn.Module) -> None:
    """finetune/lora.py:221-228: ``transformer.wte`` becomes a bitsandbytes ``StableEmbedding`` (built in fp32 on
    the host, then copied and moved in the model dtype). Its weight and LayerNorm require grad (a new module, after
    ``mark_only_lora_as_trainable``) and are not in the optimizer built before the swap."""
    from bitsandbytes.nn import StableEmbedding

    old_embedding = model.transformer.wte
    with torch.device("cpu"):
        new = StableEmbedding(old_embedding.num_embeddings, old_embedding.embedding_dim)
    with torch.no_grad():
        new.weight.copy_(old_embedding.weight)
    # ``new.to(device, dtype)``: Module.to cannot swap fake parameters, so each is re-made in the model dtype
    dtype = old_embedding.weight.dtype
    for module in new.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
    model.transformer.wte = new


def trace_litgpt(spec: ModelSpec, resolved: ResolvedSetup, *, progress: bool | None = None, gpu=None):
    """litgpt's traced step as a ``MemoryBreakdown`` (same terms and type as ``vramcalc.trace``)."""
    traced = run_trace(spec, resolved, progress=progress)
    return _driver.breakdown(spec, resolved, traced, STACK, gpu=gpu)
