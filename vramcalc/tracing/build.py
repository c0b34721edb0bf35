"""Build the real transformers model of a ModelSpec at full size on fake tensors, and apply the method with the
real libraries (peft for LoRA and prompt tuning, bitsandbytes' own 4-bit quantization and matmul for QLoRA).

The model is built on the ``meta`` device (no init kernels), then ``to_empty`` materialises it as fake CPU
tensors inside a ``FakeTensorMode``: shapes and dtypes without data. A CPU-only torch cannot run autograd on fake
CUDA tensors, so every tensor is a fake *CPU* tensor; CUDA-only effects are left to the calibration harness.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..errors import VramcalcError
from ..model import ModelSpec
from .. import facts
from ..terms.activations import checkpoint_mode
from ..options import AdapterDtype, Attention, GradCkpt, Method, Precision, Quant, TpPlan
from ..training_setup import ResolvedSetup

TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# transformers attn_implementation for each setup word. FA2 needs the flash-attn CUDA package; on fake CPU tensors
# the SDPA flash path saves the same tensors (q, k, v, out, logsumexp), so "flash" is traced through SDPA.
_ATTN_IMPLEMENTATION = {Attention.SDPA: "sdpa", Attention.FLASH: "sdpa", Attention.EAGER: "eager"}


def hf_config(spec: ModelSpec):
    """A transformers config object for the spec (no hub access)."""
    from transformers import AutoConfig

    fields = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings or 4096,
        tie_word_embeddings=spec.tie_word_embeddings,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    family = spec.family
    if not spec.traits.traceable:
        raise VramcalcError(f"{spec.name} ({family}) cannot be traced: transformers has no class for it (its "
                            "modeling code is remote code on the Hub); use vramcalc estimate")
    if family in _LAYOUT_CONFIG:
        with _quiet():
            return AutoConfig.for_model(family, **_LAYOUT_CONFIG[family](spec, fields))
    if family not in ("phi3", "qwen2", "deepseek_v3"):
        fields["head_dim"] = spec.head_dim
    if family in ("llama", "qwen3", "qwen3_moe", "gemma2", "deepseek_v3", "olmo2", "granite", "smollm3"):
        fields["attention_bias"] = spec.o_bias
    if family in ("llama", "granite", "smollm3"):
        fields["mlp_bias"] = spec.mlp_bias
    if spec.sliding_window and family in ("gemma2", "mistral", "mixtral", "phi3"):
        fields["sliding_window"] = spec.sliding_window
    if family == "mixtral":
        fields.update(num_local_experts=spec.num_experts, num_experts_per_tok=spec.experts_per_token)
    elif family == "qwen3_moe":
        fields.update(
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.experts_per_token,
            moe_intermediate_size=spec.moe_intermediate_size,
            decoder_sparse_step=spec.decoder_sparse_step,
            mlp_only_layers=list(spec.mlp_only_layers),
            norm_topk_prob=True,
        )
    elif family == "deepseek_v3":
        groups = 8 if spec.num_experts % 8 == 0 and spec.num_experts >= 32 else 1
        fields.update(
            n_routed_experts=spec.num_experts,
            num_experts_per_tok=spec.experts_per_token,
            moe_intermediate_size=spec.moe_intermediate_size,
            n_shared_experts=spec.n_shared_experts,
            first_k_dense_replace=spec.first_k_dense_replace,
            q_lora_rank=spec.q_lora_rank or None,
            kv_lora_rank=spec.kv_lora_rank,
            qk_nope_head_dim=spec.qk_nope_head_dim,
            qk_rope_head_dim=spec.qk_rope_head_dim,
            v_head_dim=spec.v_head_dim,
            n_group=groups,
            topk_group=min(4, groups),
            rope_scaling=None,
        )
    with _quiet():
        return AutoConfig.for_model(family, **fields)


def _phi_config(spec: ModelSpec, fields: dict) -> dict:
    fields = dict(fields, head_dim=spec.head_dim, partial_rotary_factor=spec.rope_dim / spec.head_dim, resid_pdrop=0.0,
                  embd_pdrop=0.0)
    return fields


def _gpt_neox_config(spec: ModelSpec, fields: dict) -> dict:
    fields = {k: v for k, v in fields.items() if k != "num_key_value_heads"}
    return dict(fields, rotary_pct=spec.rope_dim / spec.head_dim, attention_bias=spec.qkv_bias,
                use_parallel_residual=True, hidden_dropout=0.0)


def _falcon_config(spec: ModelSpec, fields: dict) -> dict:
    fields = {k: v for k, v in fields.items() if k not in ("num_key_value_heads", "intermediate_size")}
    new = spec.new_decoder_architecture
    return dict(fields, ffn_hidden_size=spec.intermediate_size, new_decoder_architecture=new,
                multi_query=not new and spec.num_kv_heads == 1, num_kv_heads=spec.num_kv_heads, parallel_attn=True,
                alibi=False, bias=spec.qkv_bias, hidden_dropout=0.0, attention_dropout=0.0)


def _gemma_config(spec: ModelSpec, fields: dict) -> dict:
    return dict(fields, head_dim=spec.head_dim, attention_bias=spec.o_bias)


def _starcoder2_config(spec: ModelSpec, fields: dict) -> dict:
    return dict(fields, head_dim=spec.head_dim, use_bias=spec.qkv_bias, sliding_window=spec.sliding_window,
                residual_dropout=0.0, embedding_dropout=0.0, attention_dropout=0.0)


def _qwen2_moe_config(spec: ModelSpec, fields: dict) -> dict:
    return dict(fields, head_dim=spec.head_dim, qkv_bias=spec.qkv_bias, num_experts=spec.num_experts,
                num_experts_per_tok=spec.experts_per_token, moe_intermediate_size=spec.moe_intermediate_size,
                shared_expert_intermediate_size=spec.shared_expert_width, decoder_sparse_step=spec.decoder_sparse_step,
                mlp_only_layers=list(spec.mlp_only_layers), use_sliding_window=False)


def _deepseek_v2_config(spec: ModelSpec, fields: dict) -> dict:
    return dict(fields, attention_bias=spec.o_bias, mlp_bias=spec.mlp_bias, n_routed_experts=spec.num_experts,
                num_experts_per_tok=spec.experts_per_token, moe_intermediate_size=spec.moe_intermediate_size,
                n_shared_experts=spec.n_shared_experts, first_k_dense_replace=spec.first_k_dense_replace,
                q_lora_rank=spec.q_lora_rank or None, kv_lora_rank=spec.kv_lora_rank,
                qk_nope_head_dim=spec.qk_nope_head_dim, qk_rope_head_dim=spec.qk_rope_head_dim,
                v_head_dim=spec.v_head_dim, topk_method="greedy", rope_scaling=None)


def _gpt_oss_config(spec: ModelSpec, fields: dict) -> dict:
    types = list(spec.layer_types) or ["full_attention"] * spec.num_layers
    return dict(fields, head_dim=spec.head_dim, attention_bias=spec.o_bias, layer_types=types,
                sliding_window=spec.sliding_window or 128, num_local_experts=spec.num_experts,
                num_experts_per_tok=spec.experts_per_token)


def _llama4_text_config(spec: ModelSpec, fields: dict) -> dict:
    moe_layers = [i for i in range(spec.num_layers) if spec.is_moe_layer(i)]
    return dict(fields, head_dim=spec.head_dim, attention_bias=spec.o_bias, intermediate_size=spec.expert_width,
                intermediate_size_mlp=spec.intermediate_size, num_local_experts=spec.num_experts,
                num_experts_per_tok=spec.experts_per_token, moe_layers=moe_layers, use_qk_norm=spec.qk_norm,
                attention_chunk_size=spec.sliding_window or 8192,
                layer_types=list(spec.layer_types) or ["full_attention"] * spec.num_layers,
                no_rope_layers=[int(i not in spec.nope_layers) for i in range(spec.num_layers)])


def _gemma3_text_config(spec: ModelSpec, fields: dict) -> dict:
    types = list(spec.layer_types) or ["full_attention"] * spec.num_layers
    return dict(fields, head_dim=spec.head_dim, attention_bias=spec.o_bias, layer_types=types,
                sliding_window=spec.sliding_window, query_pre_attn_scalar=spec.head_dim)


def _glm4_config(spec: ModelSpec, fields: dict) -> dict:
    return dict(fields, head_dim=spec.head_dim, attention_bias=spec.qkv_bias,
                partial_rotary_factor=spec.rope_dim / spec.head_dim)


def _cohere2_config(spec: ModelSpec, fields: dict) -> dict:
    types = list(spec.layer_types) or ["full_attention"] * spec.num_layers
    return dict(fields, attention_bias=spec.qkv_bias, layer_types=types, sliding_window=spec.sliding_window)


def _ernie4_5_config(spec: ModelSpec, fields: dict) -> dict:
    return dict(fields, head_dim=spec.head_dim, use_bias=spec.qkv_bias)


def _lfm2_config(spec: ModelSpec, fields: dict) -> dict:
    types = list(spec.layer_types) or ["full_attention"] * spec.num_layers
    return dict(fields, head_dim=spec.head_dim, layer_types=types, conv_L_cache=spec.conv_kernel or 3,
                conv_bias=spec.conv_bias, block_auto_adjust_ff_dim=False)  # the spec's width is Lfm2MLP's own


def _opt_config(spec: ModelSpec, fields: dict) -> dict:
    fields = {k: v for k, v in fields.items() if k not in ("num_key_value_heads", "intermediate_size")}
    # model dropouts 0, as for phi and gpt_neox: the estimate does not model them (OPT's configs set dropout 0.1)
    return dict(fields, ffn_dim=spec.intermediate_size, enable_bias=spec.qkv_bias, word_embed_proj_dim=spec.hidden_size,
                do_layer_norm_before=True, activation_function="relu", dropout=0.0, attention_dropout=0.0,
                max_position_embeddings=spec.max_position_embeddings or 2048)


def _bloom_config(spec: ModelSpec, fields: dict) -> dict:
    fields = {k: v for k, v in fields.items()
              if k not in ("num_key_value_heads", "intermediate_size", "max_position_embeddings")}
    return dict(fields, hidden_dropout=0.0, attention_dropout=0.0, apply_residual_connection_post_layernorm=False,
                pretraining_tp=1, slow_but_exact=False)


def _gptj_config(spec: ModelSpec, fields: dict) -> dict:
    fields = {k: v for k, v in fields.items() if k not in ("num_key_value_heads", "intermediate_size")}
    return dict(fields, n_inner=spec.intermediate_size, rotary_dim=spec.rope_dim, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0)


def _bert_config(spec: ModelSpec, fields: dict) -> dict:
    """BERT as its config sets it, dropouts included (the estimate models them: ``terms/encoder.py``); the sequence
    classifier's labels are set by ``build_model``."""
    fields = {k: v for k, v in fields.items() if k not in ("num_key_value_heads", "bos_token_id", "eos_token_id")}
    return dict(fields, type_vocab_size=spec.type_vocab_size, hidden_act="gelu",
                hidden_dropout_prob=spec.hidden_dropout, attention_probs_dropout_prob=spec.attention_dropout,
                max_position_embeddings=spec.max_position_embeddings or 512, is_decoder=False,
                add_cross_attention=False, num_labels=spec.score_labels or 2)


# model_type -> the config keys of the families whose layout is not Llama's (phi, gpt_neox, falcon, gemma, starcoder2,
# gemma3_text, glm4, cohere2, ernie4_5, qwen2_moe, deepseek_v2, gpt_oss, llama4_text)
_LAYOUT_CONFIG = {"phi": _phi_config, "gpt_neox": _gpt_neox_config, "falcon": _falcon_config, "gemma": _gemma_config,
                  "starcoder2": _starcoder2_config, "gemma3_text": _gemma3_text_config, "glm4": _glm4_config,
                  "cohere2": _cohere2_config, "ernie4_5": _ernie4_5_config, "qwen2_moe": _qwen2_moe_config,
                  "deepseek_v2": _deepseek_v2_config, "gpt_oss": _gpt_oss_config, "llama4_text": _llama4_text_config,
                  "lfm2": _lfm2_config, "opt": _opt_config, "bloom": _bloom_config, "gptj": _gptj_config,
                  "bert": _bert_config}


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _sdpa_dropped_class(auto_class, config, attn_implementation: str):
    """The class that says ``_supports_sdpa = False`` for a model built on SDPA, or None: a family the installed
    transformers no longer runs on SDPA (``FamilyTraits.sdpa_dropped_in``), built as the releases before ran it."""
    model_class = auto_class._model_mapping.get(type(config), None) if attn_implementation == "sdpa" else None
    owner = next((c for c in model_class.__mro__ if "_supports_sdpa" in vars(c)), None) if model_class else None
    return owner if owner is not None and not owner._supports_sdpa else None


@contextlib.contextmanager
def _sdpa_supported(owner):
    """``owner._supports_sdpa`` True while the model is built. Gemma-2's modeling code of 5.20 (SDPA) and 5.25 differ
    only in that flag, and in 5.25's ``sdpa_attention_forward`` refusing the ``softcap`` that 5.20's ignored
    (``_without_attention_softcap``)."""
    if owner is None:
        yield
        return
    owner._supports_sdpa = True
    try:
        yield
    finally:
        owner._supports_sdpa = False


def _without_attention_softcap(model: nn.Module) -> None:
    """SDPA has no attention softcap: transformers <= 5.20 passed it to ``sdpa_attention_forward``, which ignored it."""
    for module in model.modules():
        if getattr(module, "attn_logit_softcapping", None) is not None:
            module.attn_logit_softcapping = None


def half_dtype(precision: Precision) -> torch.dtype:
    """The 16-bit dtype a precision computes in: fp16 for fp16 and mixed-fp16, else bf16."""
    return TORCH_DTYPE[facts.half_dtype(precision).value]


def base_dtype(resolved: ResolvedSetup) -> torch.dtype:
    """Dtype the model is loaded in: fp32 for fp32 and mixed precision, else 16-bit."""
    return TORCH_DTYPE[resolved.setup.precision.param_dtype.value]


def build_model(spec: ModelSpec, resolved: ResolvedSetup, fake_mode, device: str = "cpu", config=None) -> nn.Module:
    """The causal-LM model with the setup's method applied, on fake CPU tensors (or real, uninitialised ones on
    ``device`` if fake_mode is None). ``config``: the transformers config to build instead of the spec's (a family
    with no formulas: ``generic.py``)."""
    from transformers import AutoModelForCausalLM

    setup = resolved.setup
    try:
        config = hf_config(spec) if config is None else config
        auto_class = AutoModelForCausalLM
        if setup.task.value == "reward":  # RewardTrainer's sequence classifier (model.reward_spec)
            from transformers import AutoModelForSequenceClassification as auto_class

            config.num_labels, config.pad_token_id = 1, 0  # reward_trainer.py:396, 571-572
        elif setup.task.value == "classify":  # an encoder's sequence classifier (BertForSequenceClassification)
            from transformers import AutoModelForSequenceClassification as auto_class
        attn_implementation = _ATTN_IMPLEMENTATION[resolved.attn_used]
        dropped_sdpa = _sdpa_dropped_class(auto_class, config, attn_implementation)
        with _quiet(), torch.device("meta"), _sdpa_supported(dropped_sdpa):
            model = auto_class.from_config(config, dtype=_load_dtype(resolved), attn_implementation=attn_implementation)
            if dropped_sdpa is not None:
                _without_attention_softcap(model)
            _restore_fp32_modules(model)
            if getattr(setup, "tp", 1) > 1 and setup.tp_plan is TpPlan.TORCHTITAN:  # torchtitan's apply_tp
                from .tensor_parallel import distribute_torchtitan

                model = distribute_torchtitan(model, setup.tp)
            elif getattr(setup, "tp", 1) > 1:  # from_pretrained(tp_plan="auto") shards before peft (tensor_parallel.py)
                from .tensor_parallel import distribute

                model = distribute(model, setup.tp)
            if getattr(setup, "ep", 1) > 1:  # transformers' expert plan, before peft (expert_parallel.py)
                from .expert_parallel import distribute as distribute_experts

                model = distribute_experts(model, setup.ep, setup.num_gpus)
            if setup.precision is Precision.FP8:
                _convert_to_float8(model)
            if quantized_base(setup) and setup.quant is Quant.INT4_GPTQ:  # auto-gptq's QuantLinear (gptq.py)
                from .gptq import quantize_linears_gptq

                quantize_linears_gptq(model, setup)
            elif quantized_base(setup):
                from .qlora import quantize_linears

                quantize_linears(model, setup)
                if setup.method.peft_facts is not None:  # as a 4-bit from_pretrained marks it: peft's bnb layers
                    _mark_quantized(model, setup)
                if getattr(setup, "kbit_prep", False):
                    _prepare_for_kbit_training_as_called(model, setup)
                elif setup.precision.is_mixed:
                    _prepare_for_kbit_training(model)
            if setup.method.peft_facts is not None:
                model = _apply_peft(model, resolved)
            elif setup.method.uses_lora:
                model = apply_lora(model, resolved)
                if getattr(setup, "tp", 1) > 1:  # peft's rowwise lora_A width (tensor_parallel.py)
                    from .tensor_parallel import fix_rowwise_lora_width

                    fix_rowwise_lora_width(model)
            elif setup.method is Method.PROMPT:
                model = _apply_prompt_tuning(model, spec, resolved)
            else:
                model.requires_grad_(True)
    except VramcalcError:
        raise
    except ImportError:
        raise
    except Exception as err:  # transformers and peft raise many types for configs they cannot build
        raise VramcalcError(f"transformers cannot build {spec.name} ({spec.family}): {err}".splitlines()[0]) from None
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        _materialise(model, device)
        for adapter, tokens in getattr(model, "prompt_tokens", {}).items():
            # peft keeps the virtual token ids as a plain tensor attribute, which to_empty leaves on meta
            model.prompt_tokens[adapter] = torch.arange(tokens.numel(), device=device).long()
        if quantized_base(setup) and setup.quant is Quant.INT4_GPTQ:
            from .gptq import materialise_gptq

            materialise_gptq(model, device)
        elif quantized_base(setup):
            from .qlora import materialise_quant_states

            materialise_quant_states(model, device)
    if checkpoint_mode(setup.grad_ckpt) is GradCkpt.WRAPPER:
        wrap_decoder_layers(model)
    elif setup.grad_ckpt:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        kwargs = {"use_reentrant": checkpoint_mode(setup.grad_ckpt) is GradCkpt.REENTRANT}
        enable = getattr(inner, "activation_checkpointing_enable", None)  # transformers >= 5.18
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return model


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = base_model(model).base_model  # the attribute named by base_model_prefix: model, gpt_neox, transformer
    if not hasattr(inner, "layers") and hasattr(inner, "model"):  # Llama4ForCausalLM: prefix "language_model"
        inner = inner.model
    if hasattr(inner, "layers"):
        return inner.layers
    if hasattr(inner, "h"):  # FalconModel.h
        return inner.h
    # a family with no formulas (generic.py): the longest ModuleList (MPT's blocks, OPT's decoder.layers)
    lists = [module for module in inner.modules() if isinstance(module, nn.ModuleList)]
    if not lists:
        raise VramcalcError(f"no decoder layers found in {type(inner).__name__}")
    return max(lists, key=len)


def wrap_decoder_layers(model: nn.Module) -> None:
    """``--grad-ckpt wrapper``: torch's own ``apply_activation_checkpointing`` with a non-reentrant
    ``checkpoint_wrapper`` around every decoder layer, picked by its class, as llama-recipes does
    (``policies/activation_checkpointing_functions.py`` @71fdc4920: ``check_fn = lambda submodule:
    isinstance(submodule, LlamaDecoderLayer)``) and accelerate's FSDP plugin (``accelerator.py:1944-1958``,
    ``CheckpointImpl.NO_REENTRANT``). transformers' gradient checkpointing stays off, so the model keeps the
    ``use_cache`` it is called with (``activations.runs_with_cache``: the trace's loss passes True)."""
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)

    layer_classes = tuple({type(layer) for layer in decoder_layers(model)})
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda module: isinstance(module, layer_classes))


def _convert_to_float8(model: nn.Module) -> None:
    """``--precision fp8``: torchao's float8 training recipe (``terms/float8.py``): every decoder ``nn.Linear`` whose
    in and out features are multiples of 16 becomes a ``Float8Linear`` with the default tensorwise dynamic scaling;
    lm_head stays bf16 (torchtitan's ``filter_fqns=["output"]``). Runs on the meta model before peft wraps it."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise VramcalcError("trace --precision fp8 needs torchao (torchao.float8): pip install torchao") from None
    from ..terms.float8 import FP8_ALIGNMENT

    def convertible(module: nn.Module, fqn: str) -> bool:
        return (isinstance(module, nn.Linear) and not fqn.endswith("lm_head")
                and module.in_features % FP8_ALIGNMENT == 0 and module.out_features % FP8_ALIGNMENT == 0)

    with _quiet():
        convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=convertible)


def _materialise(model: nn.Module, device: str) -> None:
    """Give every meta parameter and buffer uninitialised storage on ``device`` (fake inside a FakeTensorMode).

    Unlike ``Module.to_empty``, each tensor is replaced once even when reachable from two modules (tied lm_head and
    embedding; peft's ``word_embeddings`` alias of the embedding), so sharing survives.
    """
    replaced: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for slots, make in ((module._parameters, _empty_parameter), (module._buffers, _empty_buffer)):
            for name, tensor in list(slots.items()):
                if tensor is not None and tensor.device.type == "meta":
                    if id(tensor) not in replaced:
                        replaced[id(tensor)] = make(tensor, device)
                    slots[name] = replaced[id(tensor)]


def _empty_parameter(param: torch.Tensor, device: str) -> nn.Parameter:
    return nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)


def _empty_buffer(buffer: torch.Tensor, device: str) -> torch.Tensor:
    return torch.empty_like(buffer, device=device)


def _load_dtype(resolved: ResolvedSetup) -> torch.dtype:
    """The dtype from_pretrained loads in: QLoRA quantizes from the 16-bit checkpoint even when
    prepare_model_for_kbit_training later casts the rest to fp32 (``mixed-*``); an fp32 QLoRA model is loaded in
    fp32."""
    setup = resolved.setup
    if setup.method is Method.QLORA and setup.precision is not Precision.FP32:
        return half_dtype(setup.precision)
    return base_dtype(resolved)


def _restore_fp32_modules(model: nn.Module) -> None:
    """``_keep_in_fp32_modules_strict`` (DeepSeek-V3 router weight and bias) stay fp32 in a 16-bit model, as
    ``from_pretrained`` keeps them; ``from_config(dtype=...)`` alone would not."""
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or []
    for name, param in list(model.named_parameters()) + list(model.named_buffers()):
        if any(name.endswith(key) or f".{key}" in name for key in keep) and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


def _prepare_for_kbit_training(model: nn.Module) -> None:
    """peft.prepare_model_for_kbit_training's dtype effect: every non-4-bit 16-bit parameter becomes fp32
    (``peft/utils/other.py``). Its gradient-checkpointing switch is the setup's own ``grad_ckpt``."""
    from peft import prepare_model_for_kbit_training

    with _keeping_4bit_storage(model):
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


@contextlib.contextmanager
def _keeping_4bit_storage(model: nn.Module):
    """peft casts every 16-bit parameter to fp32 except a ``Params4bit`` (``peft/utils/other.py:206-209``, by class
    name); the trace's 4-bit weights are plain Parameters, so packed codes in a 16-bit storage (``--quant-storage
    bf16``) get their dtype back afterwards (on the meta device: nothing is allocated)."""
    from .qlora import _bnb

    linear4bit = _bnb().nn.Linear4bit
    kept = [(module.weight, module.weight.dtype) for module in model.modules() if isinstance(module, linear4bit)]
    try:
        yield
    finally:
        for weight, dtype in kept:
            if weight.dtype != dtype:
                weight.data = weight.data.to(dtype)


def _prepare_for_kbit_training_as_called(model: nn.Module, setup) -> None:
    """``--kbit-prep``: peft.prepare_model_for_kbit_training as a user calls it, on a model that says it is loaded
    in 4 or 8 bits (transformers sets ``is_loaded_in_4bit``/``is_loaded_in_8bit``): non-4-bit 16-bit parameters to
    fp32 and, with checkpointing, ``enable_input_require_grads`` (the embedding output requires grad). Its own
    checkpointing switch is replaced afterwards by the setup's (``build_model``)."""
    from peft import prepare_model_for_kbit_training

    if getattr(setup.quant, "value", setup.quant) == "int8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    with _keeping_4bit_storage(model):
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(setup.grad_ckpt))


def peft_targets(resolved: ResolvedSetup, family: str | None) -> str | list[str]:
    """``LoraConfig(target_modules=...)`` as the user writes it: the string ``"all-linear"`` for ``--lora-targets
    all-linear`` on the stacks that pass it to peft (``training_setup.peft_resolves_all_linear``), so that peft
    resolves it itself (``_maybe_include_all_linear_layers``; on the MoE families it converts,
    ``_resolve_string_target_modules`` adds the experts and the router: terms/moe_lora.py), else the resolved
    module names. The estimate's ``resolved.lora_modules`` is then checked against peft, not handed to it."""
    from ..training_setup import peft_resolves_all_linear

    if peft_resolves_all_linear(resolved.setup, family):
        return "all-linear"
    return list(resolved.lora_modules)


def apply_lora(model: nn.Module, resolved: ResolvedSetup) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    setup = resolved.setup
    config = LoraConfig(
        r=setup.lora_rank,
        lora_alpha=setup.lora_rank,
        lora_dropout=setup.lora_dropout,
        target_modules=peft_targets(resolved, getattr(model.config, "model_type", None)),
        modules_to_save=_modules_to_save(getattr(model.config, "model_type", None), setup),
        bias="none",
        task_type="SEQ_CLS" if setup.task.value == "reward" else "CAUSAL_LM",  # SEQ_CLS: score in modules_to_save
    )
    if setup.quant is Quant.INT4_GPTQ and setup.method is Method.QLORA:  # peft's GPTQLoraLinear (gptq.py)
        from .gptq import register_gptq_lora

        config.target_modules = list(resolved.lora_modules)  # "all-linear" finds nn.Linear only
        register_gptq_lora(config, setup.gptq_desc_act)
    with _quiet():
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=setup.adapter_dtype is AdapterDtype.FP32)
    _cast_adapters(peft_model, resolved)
    return peft_model


def _modules_to_save(family: str | None, setup) -> list[str] | None:
    """``--modules-to-save`` in the family's module names (``training_setup.peft_modules_to_save``), or None."""
    from ..model import FAMILIES, FamilyTraits
    from ..training_setup import peft_modules_to_save

    return peft_modules_to_save(FAMILIES.get(family, FamilyTraits()), setup.modules_to_save)


def _cast_adapters(model: nn.Module, resolved: ResolvedSetup) -> None:
    """Adapters in fp32 (peft's ``autocast_adapter_dtype=True``) or in the model's 16-bit dtype (peft moves new
    adapters to the base layer's dtype; TRL's ``peft_module_casting_to_bf16`` does it for 4-bit bases). The trained
    copies of ``--modules-to-save`` keep their original's dtype: peft's ``cast_adapter_dtype`` casts only
    ``BaseTunerLayer`` adapters (``tuners/tuners_utils.py:2729-2731``), not the ``ModulesToSaveWrapper``."""
    setup = resolved.setup
    if facts.adapter_bits(setup.method, setup.precision, setup.adapter_dtype) == 32:
        dtype = torch.float32
    else:
        dtype = half_dtype(setup.precision)
    copies = set()
    if setup.modules_to_save:
        from peft.utils.other import ModulesToSaveWrapper

        copies = {id(p) for module in model.modules() if isinstance(module, ModulesToSaveWrapper)
                  for p in module.modules_to_save.parameters()}
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype and id(param) not in copies:
            param.data = param.data.to(dtype)


def quantized_base(setup) -> bool:
    """A bitsandbytes-quantized base: qlora, or a peft method given ``--quant`` (``peft_methods``)."""
    if setup.method is Method.QLORA:
        return True
    return setup.method.peft_facts is not None and setup.quant is not Quant.NONE


def _mark_quantized(model: nn.Module, setup) -> None:
    """What ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` sets on the model and
    peft reads to pick its bitsandbytes layers (``peft/tuners/<method>/model.py``: ``loaded_in_4bit``)."""
    if setup.quant is Quant.INT8:
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    model.is_quantized = True


def peft_config(resolved: ResolvedSetup, spec: ModelSpec | None = None, family: str | None = None):
    """The method's own peft config, built from the setup's options by its row in ``peft_methods`` (no per-method
    code): ``--lora-rank`` -> the size argument, ``--lora-targets`` -> target_modules (the family's resolved names),
    ``--virtual-tokens`` -> the virtual-token argument, ``--lora-dropout`` -> the dropout argument, plus the row's
    fixed arguments. IA3's feed-forward targets are the MLP's down projection among the targets (peft's llama
    mapping ``TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING``)."""
    import peft

    setup = resolved.setup
    facts = setup.method.peft_facts
    kwargs = {"task_type": "CAUSAL_LM", **dict(facts.fixed)}
    if facts.size_kwarg:
        kwargs[facts.size_kwarg] = setup.lora_rank
    if facts.targets:
        kwargs["target_modules"] = (peft_targets(resolved, family) if facts.config_class == "LoraConfig"
                                    else list(resolved.lora_modules))
    if facts.virtual_kwarg:
        kwargs[facts.virtual_kwarg] = setup.virtual_tokens
    if facts.dropout_kwarg:
        kwargs[facts.dropout_kwarg] = setup.lora_dropout
    if facts.config_class == "LoraConfig":
        kwargs.update(lora_alpha=setup.lora_rank, bias="none")
    if setup.modules_to_save:  # training_setup.MODULES_TO_SAVE
        kwargs["modules_to_save"] = _modules_to_save(family, setup)
    if facts.config_class == "IA3Config":
        from ..peft_methods import IA3_FEEDFORWARD

        kwargs["feedforward_modules"] = [name for name in resolved.lora_modules
                                         if name.split(".")[-1] in IA3_FEEDFORWARD]
    return getattr(peft, facts.config_class)(**kwargs)


def _apply_peft(model: nn.Module, resolved: ResolvedSetup) -> nn.Module:
    """Any peft method of ``peft_methods``: ``get_peft_model`` with its config (``peft_config``)."""
    from peft import get_peft_model

    setup = resolved.setup
    config = peft_config(resolved, family=getattr(model.config, "model_type", None))
    with _quiet():
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=setup.adapter_dtype is AdapterDtype.FP32)
    _cast_adapters(peft_model, resolved)
    return peft_model


def _apply_prompt_tuning(model: nn.Module, spec: ModelSpec, resolved: ResolvedSetup) -> nn.Module:
    from peft import PromptTuningConfig, get_peft_model

    setup = resolved.setup
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=setup.virtual_tokens, token_dim=spec.hidden_size)
    with _quiet():
        peft_model = get_peft_model(model, config)
    _cast_adapters(peft_model, resolved)
    return peft_model
