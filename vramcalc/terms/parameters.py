"""What the training step stores per parameter tensor: its dtype, whether it trains, how it is quantized.

One ``StoredTensor`` stands for ``count`` tensors of one shape. The list is the shared input of the weights,
gradients and optimizer-state terms (and of the trace's cross-checks): it is built once per (model, setup).

Dtype rules (transformers v5, peft 0.21, bitsandbytes 0.50):
- the model loads in the precision's parameter dtype; ``_keep_in_fp32_modules_strict`` tensors stay fp32;
- QLoRA replaces every decoder nn.Linear by a 4-bit ``Linear4bit``: packed 4-bit codes (``ceil(n/2)`` uint8), the
  absmax per 64-block (fp32, or uint8 with double quantization plus an fp32 absmax per 256 blocks, a 256-entry fp32
  code and an fp32 offset) and a 16-entry fp32 code (``bitsandbytes/functional.py::quantize_4bit``). Embeddings,
  norms, lm_head, routers and v5's 3-D experts are not nn.Linear and stay unquantized (bitsandbytes #1849), except
  under ``quantize_experts``: transformers 4.x built each expert's projections as ``nn.Linear`` modules
  (modeling_mixtral.py ``MixtralBlockSparseTop2MLP`` w1/w2/w3 in a ``ModuleList``), which bitsandbytes quantizes, so
  the experts store 4-bit codes with one absmax per 64 weights, as the v5 tensor's blocks would;
  with ``mixed-*`` precision ``peft.prepare_model_for_kbit_training`` casts them to fp32;
- LoRA adds A [r, in] and B [out, r] per targeted module, in fp32 (peft ``autocast_adapter_dtype=True``) or in the
  model's 16-bit dtype; prompt tuning adds one [virtual_tokens, h] embedding. LoRA on ``lm_head`` is a Linear
  adapter (A [r, h], B [V, r]); on ``embed_tokens`` peft's ``Embedding`` LoRA layer, ``lora_embedding_A`` [r, V] and
  ``lora_embedding_B`` [h, r] (peft ``tuners/lora/layer.py::Embedding.update_layer``);
- ``quant=int8`` (bitsandbytes LLM.int8, ``load_in_8bit``): every decoder nn.Linear becomes a ``Linear8bitLt`` whose
  ``Int8Params`` hold the int8 weight (CB, 1 byte per weight) and one fp32 absmax per output row (SCB)
  (``bitsandbytes/nn/modules.py::Int8Params._quantize``, ``Linear8bitLt.init_8bit_state``);
- ``modules_to_save`` (peft ``LoraConfig(modules_to_save=[...])``, peft 0.21.2 ``utils/other.py:598-667``
  ``ModulesToSaveWrapper``): each listed module stays, frozen (``original_module.requires_grad_(False)``, :661), and
  ``copy.deepcopy(self.original_module)`` (:653) becomes the trained module, in the original's dtype (peft's
  ``cast_adapter_dtype``, ``tuners/tuners_utils.py:2705-2745``, casts only ``BaseTunerLayer`` adapters, not this
  wrapper). A tied lm_head is the embedding's ``nn.Linear`` sharing its weight: its deepcopy is a new [V, h] weight,
  so the trained copies are untied from each other and from the frozen weight the other module keeps (peft's
  ``ensure_weight_tying=False`` default: ``tuners_utils.py:1417-1470`` only warns);
- ``quantize_lm_head``: lm_head is quantized like the decoder Linears (Lightning's bitsandbytes plugin replaces every
  ``torch.nn.Linear``, Lightning@71aed751 ``src/lightning/fabric/plugins/precision/bitsandbytes.py:97,130``); a tied
  lm_head gets its own quantized weight (the replacement unties it) while the embedding stays 16-bit.
"""

from __future__ import annotations

import functools
import math

from .. import facts
from . import moe_lora, peft_methods
from .stack_layers import built_model
from ..facts import BNB_4BIT_CODE_ENTRIES, BNB_BLOCKSIZE, BNB_DQ_BLOCKSIZE, BNB_DQ_CODE_ENTRIES
from ..model import ModelSpec, ParamKind, reward_spec
from ..options import Method, Precision, Task
from ..training_setup import ResolvedSetup
from ..units import round_up
from .stored_tensor import StoredTensor
from . import gptq
from ..gptq import expert_linears, is_gptq
from .tensor_parallel import sequence_parallel, vocab_sharded
from .expert_parallel import experts_sharded  # --ep: n/E experts per rank


def quantized_metadata_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of a 4-bit weight's quantization state, each tensor rounded to 512 B as the allocator does."""
    blocks = -(-numel // BNB_BLOCKSIZE)
    code = round_up(4 * BNB_4BIT_CODE_ENTRIES)
    if not double_quant:
        return round_up(4 * blocks) + code
    outer_blocks = -(-blocks // BNB_DQ_BLOCKSIZE)
    return round_up(blocks) + round_up(4 * outer_blocks) + round_up(4 * BNB_DQ_CODE_ENTRIES) + round_up(4) + code


@functools.lru_cache(maxsize=4096)
def stored_tensors(model: ModelSpec, resolved: ResolvedSetup) -> tuple[StoredTensor, ...]:
    """``parameter_tensors`` for a resolved setup (the values it reads, each normalised to a fixed value where the
    method ignores it, so that setups differing only in batch shape, optimizer or the like share one inventory)."""
    model = built_model(model, resolved.setup.stack)  # litgpt unties a tied lm_head (stack_layers.built_model)
    if resolved.setup.task is Task.REWARD:  # a sequence classifier (model.reward_spec, terms/tasks.py)
        model = reward_spec(model)
        out = parameter_tensors(model, *parameter_key(resolved))
        return out + ((reward_score_copy(model, adapter_bits(resolved)),) if resolved.setup.method.uses_lora else ())
    out = parameter_tensors(model, *parameter_key(resolved))
    if model.vision is not None:  # a vision-language model's tower and projector (terms/vision.py)
        from . import vision

        out = out + vision.stored(model, resolved)
    # --tp: the embedding's and lm_head's vocabulary rows are sharded (``tensor_parallel.vocab_sharded``)
    return experts_sharded(vocab_sharded(out, getattr(resolved.setup, "tp", 1), sequence_parallel(resolved.setup)),
                           getattr(resolved.setup, "ep", 1))


def parameter_key(resolved: ResolvedSetup) -> tuple:
    """(method, precision, double_quant, lora_modules, lora_rank, adapter_bits, virtual_tokens, int8,
    quantize_lm_head, gptq_group_size, modules_to_save, quantize_experts): what the stored tensors depend on. Values
    a method does not read are normalised (no LoRA: no modules, rank 0; no prompt: 0 virtual tokens; no QLoRA: no
    double quantization, no int8, no 4-bit lm_head, no GPTQ group, no quantized experts)."""
    setup = resolved.setup
    method = setup.method
    lora = method.uses_lora or method.peft_facts is not None  # LoRA's or a peft method's targets and size knob
    qlora = method is Method.QLORA
    int8 = qlora and quant_is_int8(setup)
    return (method, setup.precision, setup.double_quant if qlora and not int8 else False,
            resolved.lora_modules if lora else (), setup.lora_rank if lora else 0,
            adapter_bits(resolved) if lora or method is Method.PROMPT else 0,
            setup.virtual_tokens if method.prepends_tokens or method is Method.PREFIX else 0,
            int8, qlora and bool(getattr(setup, "quantize_lm_head", False)),
            setup.gptq_group_size if qlora and is_gptq(setup) else 0, setup.modules_to_save,
            qlora and bool(getattr(setup, "quantize_experts", False)))


def quant_is_int8(setup) -> bool:
    """``--quant int8``: bitsandbytes LLM.int8 (``Quant.INT8`` once the option exists)."""
    return getattr(setup.quant, "value", setup.quant) == "int8"


def int8_metadata_bytes(out_features: int) -> int:
    """Int8Params.SCB: one fp32 absmax per output row, rounded to 512 B as the allocator does."""
    return round_up(facts.BNB_INT8_SCB_BITS // 8 * out_features)


@functools.lru_cache(maxsize=4096)
def parameter_tensors(model: ModelSpec, method: Method, precision: Precision, double_quant: bool,
                      lora_modules: tuple[str, ...], lora_rank: int, adapter_bits: int,
                      virtual_tokens: int, int8: bool = False,
                      quantize_lm_head: bool = False, gptq_group_size: int = 0,
                      modules_to_save: tuple[str, ...] = (),
                      quantize_experts: bool = False) -> tuple[StoredTensor, ...]:
    """Every parameter tensor the step stores, with its dtype, trainability and quantization state.

    Base weights in the precision's parameter dtype (fp32 where ``keep_fp32``; under QLoRA
    ``facts.qlora_unquantized_bits``); QLoRA stores each decoder nn.Linear weight as 4-bit codes plus ``quantized_metadata_bytes``;
    LoRA adds A [r, in] and B [out, r] per module in ``lora_modules`` at ``adapter_bits``; prompt tuning one
    [virtual_tokens, h] embedding. Only full fine-tuning trains the base. ``int8``: the quantized Linears are int8
    (1 byte per weight plus ``int8_metadata_bytes``) instead of 4-bit; ``quantize_lm_head``: lm_head's weight is
    quantized too (a tied one gets its own). ``gptq_group_size`` (non-zero: ``--quant int4-gptq``): each decoder
    Linear is auto-gptq's QuantLinear instead, its bias inside it, and so is every expert projection of a mixture of
    experts (``vramcalc.gptq.expert_linears``: a GPTQ checkpoint is 4.x's per-expert Linears); ``modules_to_save``:
    a trained
    copy of each listed module (``module_copies``). Sources: module docstring.
    """
    base_bits = facts.qlora_unquantized_bits(precision) if method is Method.QLORA else precision.param_dtype.bits
    # transformers' replace_with_bnb_linear takes ``type(module) is nn.Linear`` (integrations/bitsandbytes.py L189):
    # Falcon's FalconLinear subclass stays in the load dtype (model.FamilyTraits.bnb_quantizable)
    quantized_linears = method is Method.QLORA and model.bnb_quantizable
    linear_names = {module.name for module in model.inventory.linears}
    full = method is Method.FULL
    out = []
    for tensor in model.inventory.tensors:
        bits = 32 if tensor.keep_fp32 else base_bits
        module = tensor.name.rsplit(".", 1)[0]
        is_linear_weight = tensor.kind is ParamKind.LINEAR and tensor.name.endswith(".weight") and module in linear_names
        is_head_weight = tensor.kind is ParamKind.LM_HEAD and tensor.name.endswith(".weight")
        if quantized_linears and gptq_group_size:  # auto-gptq QuantLinear: weight and bias in its buffers
            if is_linear_weight:
                out.append(gptq.stored_linear(tensor.name, tensor.shape, tensor.count, gptq_group_size,
                                              base_bits // 8, tensor.scope))
            if tensor.kind is ParamKind.LINEAR and module in linear_names:
                continue
        if quantized_linears and gptq_group_size and tensor.kind is ParamKind.EXPERTS and len(tensor.shape) == 3:
            # a GPTQ checkpoint of a 4.x MoE: one QuantLinear per expert projection (expert_linears)
            for name, shape, per_layer in expert_linears(tensor.name, tensor.shape):
                out.append(gptq.stored_linear(name, shape, tensor.count * per_layer, gptq_group_size,
                                              base_bits // 8, tensor.scope))
            continue
        if quantized_linears and quantize_experts and tensor.kind is ParamKind.EXPERTS and len(tensor.shape) == 3:
            # one quantized Linear per expert: E per layer
            out.append(_quantized(tensor.name, tensor.shape[1:], tensor.count * tensor.shape[0], int8, double_quant,
                                  tensor.scope))
            continue
        if quantized_linears and (is_linear_weight or (quantize_lm_head and is_head_weight)):
            out.append(_quantized(tensor.name, tensor.shape, tensor.count, int8, double_quant, tensor.scope))
            continue
        out.append(StoredTensor(tensor.name, tensor.kind.value, tensor.shape, tensor.count, bits, full,
                                scope=tensor.scope))
    if quantized_linears and quantize_lm_head and model.tie_word_embeddings:
        out.append(_quantized("lm_head.weight", (model.vocab_size, model.hidden_size), 1, int8, double_quant, "model"))
    if method.uses_lora:
        linears = {module.name: module for module in model.inventory.linears}
        # peft 0.21 moves gate/up/down_proj (mixtral w1/w3/w2) and gate onto the fused experts (terms/moe_lora.py)
        for name, shape_a, shape_b in moe_lora.expert_adapter_shapes(model, lora_modules, lora_rank):
            out.append(StoredTensor(f"mlp.experts.{name}.lora_A", "adapter", shape_a, model.num_moe_layers,
                                    adapter_bits, True, scope="moe"))
            out.append(StoredTensor(f"mlp.experts.{name}.lora_B", "adapter", shape_b, model.num_moe_layers,
                                    adapter_bits, True, scope="moe"))
        for name in moe_lora.linear_targets(model.family, lora_modules):
            if name in HEAD_TARGETS:
                out += head_adapter_tensors(model, name, lora_rank, adapter_bits)
                continue
            module = linears[name]
            out.append(StoredTensor(f"{name}.lora_A", "adapter", (lora_rank, module.in_features), module.count,
                                    adapter_bits, True, scope=module.scope))
            out.append(StoredTensor(f"{name}.lora_B", "adapter", (module.out_features, lora_rank), module.count,
                                    adapter_bits, True, scope=module.scope))
            if method is Method.DORA:  # peft lora/dora.py:130, the magnitude [out] (terms/peft_methods.py)
                out.append(StoredTensor(f"{name}.lora_magnitude_vector", "adapter", (module.out_features,),
                                        module.count, adapter_bits, True, scope=module.scope))
    if method.peft_facts is not None and not method.uses_lora:  # terms/peft_methods.py
        out += peft_methods.method_tensors(model, method, lora_modules, lora_rank, adapter_bits, virtual_tokens)
    if method is Method.PROMPT:
        out.append(StoredTensor("prompt_encoder.embedding", "prompt", (virtual_tokens, model.hidden_size), 1,
                                adapter_bits, True))
    return tuple(out) + module_copies(model, tuple(out), modules_to_save)


COPY_INFIX = ".modules_to_save."  # peft's wrapper keeps the trained copy at <module>.modules_to_save.<adapter>


def module_copies(model: ModelSpec, base: tuple[StoredTensor, ...],
                  modules_to_save: tuple[str, ...]) -> tuple[StoredTensor, ...]:
    """The trained copies peft's ``ModulesToSaveWrapper`` makes of ``modules_to_save`` (module docstring): for
    ``embed_tokens`` the embedding [V, h], for ``lm_head`` its weight [V, h] (and bias [V]), each with the bits of the
    frozen original in ``base`` (after QLoRA's kbit-prep cast: peft wraps the prepared model); a tied lm_head's copy
    has the embedding's. Weights: 2 copies of V·h, so the step trains V·h more parameters per module."""
    out = []
    for name in modules_to_save:
        kind = "embedding" if name == "embed_tokens" else "lm_head"
        originals = [t for t in base if t.kind == kind]
        if not originals:  # a tied lm_head: the embedding's weight, through an nn.Linear
            originals = [t for t in base if t.kind == "embedding"][:1]
        for t in originals:
            leaf = t.name.rsplit(".", 1)[-1]
            out.append(StoredTensor(f"{name}{COPY_INFIX}{leaf}", kind, t.shape, t.count, t.bits, True, scope="model"))
    return tuple(out)


def _quantized(name: str, shape: tuple[int, ...], count: int, int8: bool, double_quant: bool,
               scope: str) -> StoredTensor:
    """A frozen quantized weight: 4-bit codes plus their quantization state, or int8 plus SCB."""
    numel = math.prod(shape)
    if int8:
        return StoredTensor(name, "quantized", shape, count, 8, False, int8_metadata_bytes(shape[0]), scope)
    return StoredTensor(name, "quantized", shape, count, 4, False, quantized_metadata_bytes(numel, double_quant), scope)


# LoRA targets outside the decoder layers (peft supports both): lm_head as a Linear adapter, embed_tokens as peft's
# Embedding LoRA layer
HEAD_TARGETS = ("lm_head", "embed_tokens")


def head_adapter_tensors(model: ModelSpec, name: str, lora_rank: int, adapter_bits: int) -> list[StoredTensor]:
    """LoRA on lm_head: A [r, h], B [V, r] (peft ``lora/layer.py::Linear``); on embed_tokens: ``lora_embedding_A``
    [r, V] and ``lora_embedding_B`` [h, r] (peft ``lora/layer.py::Embedding.update_layer``: ``torch.randn((r,
    self.in_features))``, ``(self.out_features, r)`` with in = num_embeddings, out = embedding_dim)."""
    V, h, r = model.vocab_size, model.hidden_size, lora_rank
    if name == "lm_head":
        return [StoredTensor("lm_head.lora_A", "adapter", (r, h), 1, adapter_bits, True),
                StoredTensor("lm_head.lora_B", "adapter", (V, r), 1, adapter_bits, True)]
    return [StoredTensor("embed_tokens.lora_embedding_A", "adapter", (r, V), 1, adapter_bits, True),
            StoredTensor("embed_tokens.lora_embedding_B", "adapter", (h, r), 1, adapter_bits, True)]


def adapter_bits(resolved: ResolvedSetup) -> int:
    """fp32 adapters (peft default), or the model's 16-bit dtype (``facts.adapter_bits``)."""
    setup = resolved.setup
    return facts.adapter_bits(setup.method, setup.precision, setup.adapter_dtype)


def trainable(tensors: tuple[StoredTensor, ...]) -> list[StoredTensor]:
    return [t for t in tensors if t.trainable]


def reward_score_copy(model: ModelSpec, adapter_bits: int) -> StoredTensor:
    """peft with ``task_type="SEQ_CLS"`` adds ``score`` to ``modules_to_save`` (peft 0.21.2 ``peft_model.py:1830-1836``,
    ``PeftModelForSequenceClassification``; TRL's docstring asks for it, ``reward_trainer.py:326``): a trainable
    copy [num_labels, h] beside the frozen original (``ModulesToSaveWrapper``), cast as the adapters are."""
    return StoredTensor("score.modules_to_save", "adapter", (model.score_labels, model.hidden_size), 1, adapter_bits,
                        True)
