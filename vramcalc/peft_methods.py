"""Every peft method vramcalc accepts for a causal LM: the one table of method facts (standard library only).

A method is peft's own ``PeftType`` in lower case with hyphens (``PeftType.LN_TUNING`` -> ``ln-tuning``; ``dora`` is
``LoraConfig(use_dora=True)``; ``prefix`` and ``p-tuning`` are peft's ``PREFIX_TUNING`` and ``P_TUNING``). Each row
says which peft config class builds it and how vramcalc's options become that class's arguments, so the trace
(``tracing/build.py::_apply_peft``) builds every method with real peft and no per-method code:

- ``--lora-rank`` is the method's size knob (``size_kwarg``: ``r`` for most, ``oft_block_size`` for OFT,
  ``n_frequency`` for FourierFT, ``block_size`` for C3A, ``init_r`` for AdaLoRA);
  left out it takes peft's own default for that argument (``size_default``), not LoRA's 8;
- ``--lora-targets`` is ``target_modules`` (qv, all-linear or module names, resolved per family as for LoRA);
- ``--virtual-tokens`` is ``num_virtual_tokens`` (``adapter_len`` for adaption-prompt);
- ``--lora-dropout`` is the method's dropout argument where it has one (``dropout_kwarg``);
- ``--quant nf4|fp4|int8`` puts the method on a bitsandbytes-quantized base (every decoder nn.Linear, as for QLoRA);
  given only where peft ships a bitsandbytes layer for the method (``peft/tuners/<method>/bnb.py``: lora (and so
  dora), adalora, ia3, hira, pvera, randlora, road) or where the method does not wrap the Linears at all (prompt
  methods, ln-tuning). Without ``--quant`` the base is 16-bit (``qlora`` keeps meaning LoRA on an NF4 base).

Not accepted: peft methods whose own code reads tensor values while it builds the adapter (the trace has shapes,
not values): ``boft`` (``boft/layer.py:395-450``: ``block_butterfly_perm`` permutes index tensors by index tensors and
``perm2mat`` sets ``perm_mat[i, idx] = 1`` with each idx a tensor value, at build time; rechecked with peft 0.21.2),
``shira``
and ``waveft`` (``nonzero`` of the initial weights), ``unilora`` (``bincount``), ``frod`` (copies initial values),
``cpt`` (reads its token ids); and the ones that need more than a causal LM and these options: ``xlora`` (trained
adapters), ``poly`` and ``multitask-prompt-tuning`` (task ids), ``trainable-tokens`` (token indices), ``adamss``
(scikit-learn), ``shadow`` (does not run in peft 0.21.2). ``c3a`` and ``vblora`` need target widths divisible by
their block size and vector length (256 by default).

Init choices (PiSSA, OLoRA, rsLoRA, LoftQ, EVA) change the adapters' values, not their shapes or what forward saves:
they do not change memory beyond a one-off SVD at load and are not options. Source of every row: peft 0.21.2
``peft/mapping.py::PEFT_TYPE_TO_CONFIG_MAPPING`` and the config class named.
"""

from __future__ import annotations

from dataclasses import dataclass

PEFT_VERSION = "0.21.2"  # the peft the rows and the trace were checked with


@dataclass(frozen=True)
class PeftMethodFacts:
    word: str  # vramcalc's --method word
    peft_type: str  # peft.PeftType member
    config_class: str  # peft config class that builds it
    trains: str  # the trainable parameters, from the config class and its layer's update_layer
    size_kwarg: str | None = None  # the config argument --lora-rank sets
    size_default: int | None = None  # peft's default for it
    targets: bool = True  # takes target_modules (--lora-targets)
    virtual_kwarg: str | None = None  # the config argument --virtual-tokens sets
    dropout_kwarg: str | None = None  # the config argument --lora-dropout sets
    fixed: tuple[tuple[str, object], ...] = ()  # other config arguments, fixed
    quant_base: bool = False  # may sit on a bitsandbytes-quantized base (--quant)
    formulas: bool = False  # the estimate has formulas for it (else: use vramcalc trace)

    @property
    def options(self) -> tuple[str, ...]:
        """The TrainingSetup options this method accepts (beyond the method-independent ones)."""
        out = []
        if self.size_kwarg:
            out.append("lora_rank")
        if self.targets:
            out.append("lora_targets")
        if self.dropout_kwarg:
            out.append("lora_dropout")
        if self.virtual_kwarg:
            out.append("virtual_tokens")
        out.append("adapter_dtype")
        if self.targets:  # a tuner's config: modules_to_save (peft 0.21.2 ``tuners/tuners_utils.py:1144``
            out.append("modules_to_save")  # ``set_additional_trainable_modules``; training_setup.MODULES_TO_SAVE)
        if self.quant_base:  # peft's prepare_model_for_kbit_training takes any model on a bitsandbytes base
            out += ["quant", "double_quant", "compute_dtype", "kbit_prep", "quant_saves_input"]
        return tuple(out)


_F = PeftMethodFacts
# one row per accepted method; ``trains`` per target Linear [out, in] unless said otherwise
PEFT_METHODS: tuple[PeftMethodFacts, ...] = (
    _F("dora", "LORA", "LoraConfig", "A [r, in], B [out, r] and magnitude [out] (lora_magnitude_vector)",
       "r", 8, dropout_kwarg="lora_dropout", fixed=(("use_dora", True),), quant_base=True, formulas=True),
    _F("adalora", "ADALORA", "AdaLoraConfig", "A [r, in], E [r, 1], B [out, r] (SVD-form; r = init_r, pruned to "
       "target_r by masking, shapes fixed)", "init_r", 12, dropout_kwarg="lora_dropout",
       fixed=(("total_step", 1000),), quant_base=True, formulas=True),
    _F("ia3", "IA3", "IA3Config", "ia3_l: [out, 1] per target, [1, in] per feed-forward target (down projection)",
       quant_base=True, formulas=True),
    _F("vera", "VERA", "VeraConfig", "lambda_d [r] and lambda_b [out] per target; shared frozen vera_A [r, max in], "
       "vera_B [max out, r] buffers", "r", 256, dropout_kwarg="vera_dropout", formulas=True),
    _F("loha", "LOHA", "LoHaConfig", "hada_w1_a [out, r], hada_w1_b [r, in], hada_w2_a [out, r], hada_w2_b [r, in]",
       "r", 8, dropout_kwarg="module_dropout", formulas=True),
    _F("lokr", "LOKR", "LoKrConfig", "lokr_w1 [o1, i1] and lokr_w2_a [o2, r], lokr_w2_b [r, i2] (Kronecker factors "
       "of out x in)", "r", 8, dropout_kwarg="module_dropout", formulas=True),
    _F("oft", "OFT", "OFTConfig", "oft_R: in/b blocks of b(b-1)/2 skew-symmetric entries (b = oft_block_size)",
       "oft_block_size", 32, dropout_kwarg="module_dropout", fixed=(("r", 0),), formulas=True),
    _F("ln-tuning", "LN_TUNING", "LNTuningConfig", "a trainable copy of every norm layer's weight (input_layernorm, "
       "post_attention_layernorm, norm)", targets=False, formulas=True),
    _F("prefix", "PREFIX_TUNING", "PrefixTuningConfig", "embedding [n, L x 2 x kv_heads x head_dim]: a key and value "
       "prefix per layer", targets=False, virtual_kwarg="num_virtual_tokens", formulas=True),
    _F("p-tuning", "P_TUNING", "PromptEncoderConfig", "embedding [n, h] and an MLP encoder h -> h -> h -> h "
       "(encoder_hidden_size = h)", targets=False, virtual_kwarg="num_virtual_tokens", formulas=True),
    _F("adaption-prompt", "ADAPTION_PROMPT", "AdaptionPromptConfig", "adaption_prompt [1, n, h] and a gate [1] in "
       "each of the top adapter_layers (1 here) attention blocks", targets=False, virtual_kwarg="adapter_len",
       fixed=(("adapter_layers", 1),)),
    _F("hra", "HRA", "HRAConfig", "hra_u [in, r] (r Householder reflections)", "r", 8),
    _F("fourierft", "FOURIERFT", "FourierFTConfig", "spectrum [n] (n = n_frequency) per target; frozen indices",
       "n_frequency", 1000),
    _F("miss", "MISS", "MissConfig", "miss_block [r, out] per target", "r", 64, dropout_kwarg="miss_dropout"),
    _F("randlora", "RANDLORA", "RandLoraConfig", "lambda and gamma scalings per target over shared frozen random "
       "bases", "r", 32, dropout_kwarg="randlora_dropout", quant_base=True),
    _F("c3a", "C3A", "C3AConfig", "c3a_kernel [out/b, in/b, b] circulant blocks (b = block_size)", "block_size", 256),
    _F("vblora", "VBLORA", "VBLoRAConfig", "a shared vector bank and per-target top-k logits", "r", 4,
       dropout_kwarg="vblora_dropout"),
    _F("hira", "HIRA", "HiraConfig", "A [r, in], B [out, r] (Hadamard product with the frozen weight)", "r", 32,
       dropout_kwarg="hira_dropout", quant_base=True),
    _F("pvera", "PVERA", "PveraConfig", "lambda_d [r], lambda_b [out] over shared frozen projections", "r", 256,
       dropout_kwarg="pvera_dropout", quant_base=True),
    _F("road", "ROAD", "RoadConfig", "road_alpha, road_theta: 2 x out rotation parameters per target", quant_base=True),
    _F("delora", "DELORA", "DeloraConfig", "A [r, in], B [out, r] and a norm scale lambda", "r", 8,
       dropout_kwarg="module_dropout"),
    _F("gralora", "GRALORA", "GraloraConfig", "granular blocks of A and B (r x (in + out) in all)", "r", 32,
       dropout_kwarg="gralora_dropout"),
    _F("glora", "GLORA", "GloraConfig", "generalized LoRA factors A, B, C, D, E per target", "r", 8),
    _F("tinylora", "TINYLORA", "TinyLoraConfig", "a tiny shared vector projected through frozen SVD factors", "r", 2,
       dropout_kwarg="tinylora_dropout"),
    _F("lily", "LILY", "LilyConfig", "low-rank A per layer and shared high-dimensional B experts", "r", 32),
    _F("psoft", "PSOFT", "PsoftConfig", "an r x r orthogonal core in the principal subspace", "r", 32,
       dropout_kwarg="psoft_dropout"),
    _F("supertuning", "SUPERTUNING", "SupertuningConfig", "low-rank factors over super-weights",
       dropout_kwarg="lora_dropout"),
    _F("peanut", "PEANUT", "PeanutConfig", "low-rank factors with nonlinear mixing", "r", 32),
    _F("deft", "DEFT", "DeftConfig", "low-rank factors of a decomposed update", "r", 8, dropout_kwarg="deft_dropout"),
    _F("beft", "BEFT", "BeftConfig", "a bias vector per target"),
    _F("osf", "OSF", "OSFConfig", "the minor singular directions of each target (orthogonal subspace)"),
    _F("cartridge", "CARTRIDGE", "CartridgeConfig", "a trainable key/value prefix per layer (the KV cartridge)",
       targets=False, virtual_kwarg="num_virtual_tokens"),
)
del _F

_BY_WORD = {facts.word: facts for facts in PEFT_METHODS}

# IA3's feed-forward targets (scaled on their input, [1, in]): the MLP's down projection, as peft's
# TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING says for llama-style models ("down_proj")
IA3_FEEDFORWARD = ("down_proj", "w2", "dense_4h_to_h", "fc2")
# LN tuning's targets are peft's per-family mapping (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING,
# peft/utils/constants.py): the estimate covers the families whose list is input_layernorm, post_attention_layernorm
# and the final norm; the others (qwen2/qwen3: post_attention_layernorm only; families without a row) are traced
LN_TUNING_ESTIMATED_FAMILIES = ("llama", "mistral")


def peft_method(word: str) -> PeftMethodFacts | None:
    """The row of a --method word, or None for full/lora/qlora/prompt."""
    return _BY_WORD.get(word)


# the four historic words, in the same terms (peft's config class; full fine-tuning uses none)
_CORE_ROWS = (
    ("full", "-", "every parameter of the model", "", ""),
    ("lora", "LoraConfig", "A [r, in] and B [out, r] per target Linear", "r (--lora-rank)", "targets, dropout"),
    ("qlora", "LoraConfig", "A [r, in] and B [out, r] per target Linear, on an NF4 (or --quant) base",
     "r (--lora-rank)", "targets, dropout, quant"),
    ("prompt", "PromptTuningConfig", "embedding [n, h] of n virtual tokens", "", "virtual tokens"),
)


def method_rows() -> list[dict]:
    """``vramcalc methods``: every --method word, the peft config class that builds it, what it trains, what
    ``--lora-rank`` sets, the other options it takes, and whether the estimate has formulas (else: trace)."""
    rows = [{"method": word, "peft_config": config, "trains": trains, "lora_rank_sets": size, "options": options,
             "estimate": "formulas"} for word, config, trains, size, options in _CORE_ROWS]
    for facts in PEFT_METHODS:
        others = [name for name, flag in (("targets", facts.targets), ("dropout", facts.dropout_kwarg),
                                          ("virtual tokens", facts.virtual_kwarg), ("quant", facts.quant_base)) if flag]
        size = f"{facts.size_kwarg} (default {facts.size_default})" if facts.size_kwarg else ""
        rows.append({"method": facts.word, "peft_config": facts.config_class, "trains": facts.trains,
                     "lora_rank_sets": size, "options": ", ".join(others),
                     "estimate": "formulas" if facts.formulas else "trace only"})
    return rows
