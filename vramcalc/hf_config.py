"""Read a Hugging Face ``config.json`` (a file, or a folder holding one) into a ModelSpec, without transformers.

Defaults are the transformers v5 config-class defaults (``models/<family>/configuration_<family>.py``); a field
with no default there is required here, and its absence is reported by name.

Every field read is checked for its JSON type and range, and a bad one is reported in one line that names it:
``config.json field 'num_key_value_heads' must be an integer, got '8'``. Integer fields accept JSON integers and
floats with an integral value (``64.0``, as some exporters write them); bools, strings, ``NaN``, infinities, lists and
objects are refused. Sizes are bounded by ``model.MAX_SIZES`` (about 64 times the largest published model, so that
a mistyped ``10**12`` layers is refused at once instead of hanging the estimate). Architecture invariants (kv heads
dividing heads, experts per token at most the experts) are checked by ``ModelSpec`` itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .errors import VramcalcError
from .model import FAMILIES, MAX_SIZES, SUPPORTED_FAMILIES, ModelSpec, default_layer_types

# Config-class defaults that differ from "hidden_size // num_attention_heads" and "untied".
_DEFAULT_HEAD_DIM = {"qwen3": 128, "qwen3_moe": 128, "gemma2": 256,
                     "gemma": 256,  # models/gemma/configuration_gemma.py L72: head_dim = 256
                     "gemma3_text": 256,  # models/gemma3/configuration_gemma3.py L79
                     "glm4": 128,  # models/glm4/configuration_glm4.py L61
                     "ernie4_5": 128}  # models/ernie4_5/configuration_ernie4_5.py L80
# Where each family keeps its expert count.
_EXPERTS_KEY = {"mixtral": "num_local_experts", "qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts",
                "qwen2_moe": "num_experts", "deepseek_v2": "n_routed_experts", "gpt_oss": "num_local_experts",
                "llama4_text": "num_local_experts"}
# A real config.json is a few kB (DeepSeek-V3's, the largest in the catalogue, is 1.7 kB); refuse anything that
# could not be one before reading it into memory.
MAX_CONFIG_BYTES = 16 * 2**20
_MAX_POSITIONS = 2**40  # max_position_embeddings / sliding_window: only compared with the sequence length

# The fields each family reads (besides model_type): what ``spec_from_config`` looks at, for tests and docs.
COMMON_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "head_dim",
                 "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
                 "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "_name_or_path")
MOE_FIELDS = ("num_experts_per_tok", "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace",
              "decoder_sparse_step", "mlp_only_layers")
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
# Fields of the families whose layout is not Llama's (read by ``_layout_fields``)
LAYOUT_FIELDS = {
    "phi": ("partial_rotary_factor", "rope_parameters", "qk_layernorm"),
    "gpt_neox": ("rotary_pct", "rope_parameters", "use_parallel_residual"),
    "falcon": ("num_kv_heads", "n_head_kv", "n_head", "n_layer", "n_embed", "new_decoder_architecture", "multi_query",
               "parallel_attn", "alibi", "bias", "ffn_hidden_size", "num_ln_in_parallel_attn"),
    "qwen": ("kv_channels", "rotary_pct", "no_bias"),
    "starcoder2": ("use_bias",),
    "smollm3": ("no_rope_layers", "no_rope_layer_interval", "layer_types"),
    "gemma3_text": ("layer_types", "sliding_window_pattern", "final_logit_softcapping", "attn_logit_softcapping",
                    "use_bidirectional_attention"),
    "glm4": ("rope_parameters", "partial_rotary_factor"),
    "cohere2": ("layer_types", "sliding_window_pattern"),
    "ernie4_5": ("use_bias",),
    "qwen2_moe": ("qkv_bias", "shared_expert_intermediate_size"),
    "gpt_oss": ("layer_types", "quantization_config"),
    "llama4_text": ("intermediate_size_mlp", "interleave_moe_layer_step", "moe_layers", "use_qk_norm", "no_rope_layers",
                    "no_rope_layer_interval", "attention_chunk_size", "layer_types"),
    "opt": ("ffn_dim", "enable_bias", "do_layer_norm_before", "word_embed_proj_dim", "layer_norm_elementwise_affine",
            "_remove_final_layer_norm", "activation_function"),
    "bloom": ("n_layer", "n_head", "n_embed", "apply_residual_connection_post_layernorm", "pretraining_tp",
              "slow_but_exact"),
    "gptj": ("n_layer", "n_head", "n_embd", "n_positions", "n_inner", "rotary_dim", "activation_function"),
    "lfm2": ("layer_types", "full_attn_idxs", "conv_L_cache", "conv_bias", "block_ff_dim", "block_auto_adjust_ff_dim",
             "block_ffn_dim_multiplier", "block_multiple_of", "tie_embedding"),
    "bert": ("type_vocab_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
             "classifier_dropout", "position_embedding_type", "is_decoder", "add_cross_attention", "num_labels",
             "id2label"),
}
_LAYER_TYPES = ("sliding_attention", "full_attention")
# Config-class defaults of fields read as required elsewhere, for families whose published configs omit them:
# Gemma-3 multimodal checkpoints nest a text_config with only the fields that differ from Gemma3TextConfig's
# defaults (transformers 5.25 configuration_gemma3.py L73-77)
_CLASS_DEFAULTS = {"gemma3_text": {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
                                   "num_hidden_layers": 26, "num_attention_heads": 8}}
# Legacy key names that the config classes map onto the standard ones (``attribute_map``)
_ALIASES = {"falcon": {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "hidden_size": "n_embed"},
            "opt": {"intermediate_size": "ffn_dim"},
            # BloomConfig.attribute_map (configuration_bloom.py) and its n_embed kwarg (BloomConfig.__post_init__)
            "bloom": {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "hidden_size": "n_embed"},
            # GPTJConfig.attribute_map (configuration_gptj.py L45-50)
            "gptj": {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "hidden_size": "n_embd",
                     "max_position_embeddings": "n_positions"}}


def config_fields(family: str) -> tuple[str, ...]:
    """Every config.json field ``spec_from_config`` reads for ``family``."""
    traits = FAMILIES[family]
    out = ("model_type",) + COMMON_FIELDS
    if traits.moe:
        out += (_EXPERTS_KEY[family],) + MOE_FIELDS
    if traits.mla:
        out += MLA_FIELDS
    return out + LAYOUT_FIELDS.get(family, ())


def load_config(path: str | Path, *, name: str | None = None, hf_repo: str | None = None) -> ModelSpec:
    """A ModelSpec from ``path`` (``config.json`` or its folder). Raises VramcalcError naming what is wrong.
    ``name`` and ``hf_repo`` override the folder name and the config's ``_name_or_path`` (a Hub download)."""
    path = Path(path).expanduser()
    shown = _short(str(path))
    try:
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise VramcalcError(f"no config.json at {shown}")
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise VramcalcError(f"{shown} is {file.stat().st_size:,} bytes: too large for a config.json "
                                f"(at most {MAX_CONFIG_BYTES:,})")
        text = file.read_text(encoding="utf-8")
    except OSError as err:  # unreadable, a name too long (ENAMETOOLONG), a folder that vanished
        raise VramcalcError(f"cannot read {shown}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise VramcalcError(f"{shown} is not a text file (not UTF-8); a config.json is JSON text") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise VramcalcError(f"{shown} is not valid JSON: {err}") from None
    except RecursionError:
        raise VramcalcError(f"{shown} nests JSON too deeply to be a config.json") from None
    if not isinstance(config, dict):
        raise VramcalcError(f"{shown} is not a JSON object (it is a JSON {type(config).__name__})")
    if hf_repo:
        config = {**config, "_name_or_path": hf_repo}
    name = name or (path.name if path.is_dir() else (file.parent.name or file.stem))
    return spec_from_config(config, name=name or "config")


def _short(text: str) -> str:
    return repr(text) if len(text) <= 80 else repr(text[:77] + "...")


def _describe(value) -> str:
    if isinstance(value, str):
        return _short(value)
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Typed, bounded access to one config dict; every error names the field."""

    def __init__(self, config: dict, name: str, family: str):
        self.config, self.name, self.family = config, name, family

    def _bad(self, key: str, wanted: str, value) -> VramcalcError:
        return VramcalcError(f"config.json field {key!r} must be {wanted}, got {_describe(value)}")

    def integer(self, key: str, default=None, *, minimum: int = 1, maximum: int | None = None,
                required: bool = False) -> int | None:
        """An integer field (a float with an integral value counts); ``None``/absent gives ``default``."""
        value = self.config.get(key)
        if value is None:
            if required:
                raise VramcalcError(f"config {self.name!r} ({self.family}) lacks the field {key!r}")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, "an integer", value)
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                raise self._bad(key, "an integer", value)
            value = int(value)
        limit = maximum if maximum is not None else MAX_SIZES.get(key, _MAX_POSITIONS)
        if value < minimum or value > limit:
            raise self._bad(key, f"an integer from {minimum:,} to {limit:,}", value)
        return value

    def need(self, key: str) -> int:
        return self.integer(key, required=True)

    def fraction(self, key: str, default: float, container: dict | None = None) -> float:
        """A number in (0, 1] (a rotary fraction); ``container`` is a nested dict such as rope_parameters."""
        value = (self.config if container is None else container).get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 < value <= 1:
            raise self._bad(key, "a number in (0, 1]", value)
        return float(value)

    def probability(self, key: str, default: float) -> float:
        """A dropout probability in [0, 1)."""
        value = self.config.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 <= value < 1:
            raise self._bad(key, "a number in [0, 1)", value)
        return float(value)

    def mapping(self, key: str) -> dict:
        value = self.config.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._bad(key, "an object", value)
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def layer_list(self, key: str, num_layers: int) -> tuple[int, ...]:
        value = self.config.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self._bad(key, "a list of layer indices", value)
        out = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not (
                    isinstance(item, int) or (math.isfinite(item) and item == int(item))) \
                    or not 0 <= item < num_layers:
                raise self._bad(key, f"a list of layer indices from 0 to {num_layers - 1}", value)
            out.append(int(item))
        return tuple(out)


def spec_from_config(config: dict, name: str = "config") -> ModelSpec:
    """A ModelSpec from a parsed config dict."""
    if not isinstance(config, dict):
        raise VramcalcError(f"config {name!r} is not a JSON object")
    family = config.get("model_type")
    if family is None:
        raise VramcalcError(f"config {name!r} lacks the field 'model_type'")
    if not isinstance(family, str):
        raise VramcalcError(f"config.json field 'model_type' must be a string, got {_describe(family)}")
    if family == "qwen2_5_vl":  # Qwen2.5-VL: a Qwen2 language model, flat or nested (vision_qwen.py)
        from .vision_qwen import qwen_text_config

        return _with_vision(spec_from_config(qwen_text_config(config), name=name), config)
    if family == "mllama":  # Llama-3.2-Vision: cross-attention layers and a tiled tower (vision_mllama.py)
        from .vision_mllama import mllama_parts

        llama, vision, notes = mllama_parts(config)
        return dataclasses.replace(spec_from_config(llama, name=name), vision=vision, tie_word_embeddings=False,
                                   notes=notes)
    if family not in FAMILIES:
        nested = _text_config(config)
        if nested is not None:
            return _with_vision(spec_from_config(nested, name=name), config)
        raise UnsupportedArchitecture(_unsupported(family, config), family, config, name)
    traits = FAMILIES[family]
    defaults = {key: value for key, value in _CLASS_DEFAULTS.get(family, {}).items() if config.get(key) is None}
    if defaults:
        config = {**config, **defaults}
    for key, alias in _ALIASES.get(family, {}).items():  # FalconConfig.attribute_map: n_layer, n_head, n_embed
        if config.get(key) is None and config.get(alias) is not None:
            config = {**config, key: config[alias]}
    f = _Fields(config, name, family)

    hidden = f.need("hidden_size")
    heads = f.need("num_attention_heads")
    layers = f.need("num_hidden_layers")
    attention_bias = f.flag("attention_bias", False)
    use_sliding_window = f.flag("use_sliding_window", True)
    # Qwen2MoeConfig writes sliding_window 0 when use_sliding_window is off (configuration_qwen2_moe.py L109)
    sliding_window = f.integer("sliding_window", minimum=0 if family == "qwen2_moe" else 1) or None
    repo = config.get("_name_or_path")
    fields = dict(
        name=name,
        family=family,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=f.integer("num_key_value_heads", heads),
        head_dim=f.integer("head_dim", _DEFAULT_HEAD_DIM.get(family, hidden // heads)),
        # falcon: ffn_hidden_size; lfm2: block_ff_dim or intermediate_size, adjusted (``_lfm2_fields``)
        # bloom: 4h; gptj: n_inner or 4h (``_layout_fields``)
        intermediate_size=f.need("intermediate_size") if family not in ("falcon", "lfm2", "bloom", "gptj") else 1,
        vocab_size=f.need("vocab_size"),
        tie_word_embeddings=f.flag("tie_word_embeddings", traits.default_tied),
        max_position_embeddings=f.integer("max_position_embeddings"),
        qkv_bias=traits.qkv_bias or attention_bias,
        o_bias=attention_bias,
        mlp_bias=f.flag("mlp_bias", False),
        qk_norm=traits.qk_norm,
        sliding_window=sliding_window if use_sliding_window else None,
        hf_repo=repo if isinstance(repo, str) and len(repo) <= 200 else "",
        source="config.json",
        notes=config["_notes"] if isinstance(config.get("_notes"), str) else "",
    )
    if traits.moe:
        fields.update(
            num_experts=f.need(_EXPERTS_KEY[family]),
            experts_per_token=f.need("num_experts_per_tok"),
            moe_intermediate_size=f.need("moe_intermediate_size") if family not in ("mixtral", "gpt_oss",
                                                                                      "llama4_text") else 0,
            n_shared_experts=f.integer("n_shared_experts", 0, minimum=0),
            first_k_dense_replace=f.integer("first_k_dense_replace", 0, minimum=0, maximum=layers),
            decoder_sparse_step=f.integer("decoder_sparse_step", 1, maximum=layers),
            mlp_only_layers=f.layer_list("mlp_only_layers", layers),
        )
    if family in LAYOUT_FIELDS or family == "gemma":
        fields.update(_layout_fields(f, family, fields))
    if traits.mla:
        fields.update(
            q_lora_rank=f.integer("q_lora_rank", 0, minimum=0),
            kv_lora_rank=f.need("kv_lora_rank"),
            qk_nope_head_dim=f.need("qk_nope_head_dim"),
            qk_rope_head_dim=f.need("qk_rope_head_dim"),
            v_head_dim=f.need("v_head_dim"),
        )
        fields["head_dim"] = fields["v_head_dim"]
    return ModelSpec(**fields)


def _text_config(config: dict) -> dict | None:
    """The language model of a config that nests it (``text_config``: llava, mistral3, gemma3, Qwen2.5-VL...), when
    its ``model_type`` is a supported family; else None. The nested dict is the text model's whole config
    (transformers ``PretrainedConfig.get_text_config``), so it is read as is; the outer ``_name_or_path`` names it.
    For the VLM families of ``vision.VISION_FAMILIES`` the caller adds the vision tower and projector
    (``_with_vision``); for the others only the language model is counted, and the note says so."""
    nested = config.get("text_config")
    if not isinstance(nested, dict) or nested.get("model_type") not in FAMILIES:
        return None
    notes = f"language model ({nested['model_type']}) of a {config.get('model_type')} config; vision tower not counted"
    return {**nested, "_name_or_path": config.get("_name_or_path", nested.get("_name_or_path")), "_notes": notes}


def _with_vision(spec: ModelSpec, config: dict) -> ModelSpec:
    """The language model read from ``text_config`` plus, for a VLM family vramcalc models (``vision.VISION_FAMILIES``),
    its vision tower and projector, and the outer config's ``tie_word_embeddings``, which is the one transformers 5.25
    ties by (checked on meta-built SmolVLM and Gemma-3: the text_config's value is ignored)."""
    from .vision import vision_from_config, vlm_tied

    try:
        vision = vision_from_config(config, spec.hidden_size)
    except VramcalcError as error:  # a tower transformers could build but not run (e.g. a pool that does not divide)
        return dataclasses.replace(spec, notes=f"{spec.notes}; vision tower not counted: {error}".lstrip("; "))
    if vision is None:
        return spec
    notes = f"language model ({spec.family}) and vision tower of a {vision.family} config"
    return dataclasses.replace(spec, vision=vision, tie_word_embeddings=vlm_tied(config), notes=notes)


class UnsupportedArchitecture(VramcalcError):
    """A config.json whose model_type vramcalc has no formulas for; it carries the config, so ``vramcalc trace`` can
    still build the model transformers builds from it (``tracing/generic.py``)."""

    def __init__(self, message: str, family: str, config: dict, name: str) -> None:
        super().__init__(message)
        self.family, self.config, self.name = family, config, name


def _unsupported(family: str, config: dict) -> str:
    """The one line for a model_type with no formulas: what it is, what is supported, and what to do instead."""
    nested = config.get("text_config")
    inner = nested.get("model_type") if isinstance(nested, dict) else None
    shown = _short(family) + (f" (language model {_short(inner)})" if isinstance(inner, str) else "")
    return (f"unsupported architecture {shown}; supported: {', '.join(SUPPORTED_FAMILIES)}; vramcalc has no formulas "
            f"for this family: {trace_hint()}, or size a supported model of similar shape (vramcalc models --max-params N "
            "lists them)")


def trace_hint(command: str = "vramcalc trace MODEL") -> str:
    """What to run instead of the estimate for a family with no formulas: the trace when torch, transformers and
    peft are installed, else the extra that installs them (``pip install 'vramcalc[trace]'``, as ``vramcalc.trace``
    says when they are missing)."""
    import importlib.util

    if all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers", "peft")):
        return f"trace it instead ({command} builds it with transformers and traces every term)"
    return f"{command} can trace it once the trace extra is installed: pip install 'vramcalc[trace]'"


def _layout_fields(f: _Fields, family: str, fields: dict) -> dict:
    """The fields of gemma, phi, gpt_neox, falcon and Qwen v1 that differ from Llama's reading, with their config-class
    defaults (transformers 5.24 ``models/<family>/configuration_<family>.py``; Qwen v1: the remote
    ``configuration_qwen.py`` of Qwen/Qwen-7B). Layouts the estimate does not model are refused by name."""
    hidden, heads = fields["hidden_size"], fields["num_heads"]
    out: dict = {}
    if family == "gemma":
        return out  # Llama's fields; head_dim 256 and tied embeddings are the config defaults
    rope = f.mapping("rope_parameters")
    if family == "phi":
        # PhiConfig: no num_key_value_heads default (= heads), head_dim = h / a unless set (PhiAttention L159),
        # partial_rotary_factor 0.5 (configuration_phi.py L87), all Linears with bias (modeling_phi.py L164-167,
        # L243-244), tie_word_embeddings False (L76)
        if f.flag("qk_layernorm", False):
            raise VramcalcError("phi with qk_layernorm is not supported (the estimate does not model its q/k norms)")
        factor = f.fraction("partial_rotary_factor", f.fraction("partial_rotary_factor", 0.5, rope))
        head_dim = fields["head_dim"]  # getattr(config, "head_dim", h // a): a config.json head_dim is used
        out.update(rotary_dim=int(head_dim * factor), qkv_bias=True, o_bias=True, mlp_bias=True)
    elif family == "gpt_neox":
        # GPTNeoXConfig: rotary_pct 0.25 (configuration_gpt_neox.py L98), use_parallel_residual True (L78),
        # attention_bias True (L80) on query_key_value and dense; the MLP's Linears always have a bias (L41-42)
        if not f.flag("use_parallel_residual", True):
            raise VramcalcError("gpt_neox with use_parallel_residual false is not supported (only the parallel "
                                "residual layout is modelled)")
        factor = f.fraction("rotary_pct", f.fraction("partial_rotary_factor", 0.25, rope))
        head_dim = hidden // heads
        bias = f.flag("attention_bias", True)
        out.update(num_kv_heads=heads, head_dim=head_dim, rotary_dim=int(head_dim * factor), qkv_bias=bias,
                   o_bias=bias, mlp_bias=True)
    elif family == "falcon":
        # FalconConfig: new_decoder_architecture False, multi_query True, parallel_attn True, alibi False, bias False
        # (configuration_falcon.py L75-80), ffn_hidden_size 4h (L95-96), head_dim = h / a (L101), tied (L88);
        # kv heads: num_kv_heads with the new layout, 1 for multi-query, else a (modeling_falcon.py L241)
        if f.flag("alibi", False):
            raise VramcalcError("falcon with alibi is not supported (only rotary Falcon models are modelled)")
        if not f.flag("parallel_attn", True):
            raise VramcalcError("falcon with parallel_attn false is not supported (only the parallel layout is "
                                "modelled)")
        new = f.flag("new_decoder_architecture", False)
        if new and f.integer("num_ln_in_parallel_attn", 2, maximum=2) != 2:
            raise VramcalcError("falcon with new_decoder_architecture and num_ln_in_parallel_attn 1 is not supported")
        kv_heads = f.integer("num_kv_heads", f.integer("n_head_kv", heads, maximum=MAX_SIZES["num_key_value_heads"]),
                             maximum=MAX_SIZES["num_key_value_heads"])
        if not new:
            kv_heads = 1 if f.flag("multi_query", True) else heads
        bias = f.flag("bias", False)
        out.update(num_kv_heads=kv_heads, head_dim=hidden // heads,
                   intermediate_size=f.integer("ffn_hidden_size", 4 * hidden,
                                               maximum=MAX_SIZES["intermediate_size"]),
                   qkv_bias=bias, o_bias=bias, mlp_bias=bias, new_decoder_architecture=new)
    elif family == "qwen":
        # QWenConfig (remote configuration_qwen.py): kv_channels 128 (the head dim), rotary_pct 1.0, no_bias True
        # (c_attn always has a bias), tie_word_embeddings False; no grouped-query attention
        head_dim = f.integer("kv_channels", 128, maximum=MAX_SIZES["head_dim"])
        factor = f.fraction("rotary_pct", 1.0)
        bias = not f.flag("no_bias", True)
        out.update(num_kv_heads=heads, head_dim=head_dim, rotary_dim=int(head_dim * factor), o_bias=bias,
                   mlp_bias=bias)
        if fields["intermediate_size"] < 2:
            raise VramcalcError("config.json field 'intermediate_size' must be at least 2 for qwen (w1 and w2 are "
                                "intermediate_size / 2 wide)")
    elif family == "starcoder2":
        # Starcoder2Config: num_key_value_heads 2, use_bias True on every Linear but lm_head
        # (configuration_starcoder2.py L65, L79; modeling_starcoder2.py L57-58, L153-156)
        bias = f.flag("use_bias", True)
        out.update(num_kv_heads=f.integer("num_key_value_heads", 2), qkv_bias=bias, o_bias=bias, mlp_bias=bias)
    elif family == "smollm3":
        # SmolLM3Config: num_key_value_heads 4, use_sliding_window False (configuration_smollm3.py L76, L86); with
        # it, only the NoPE layers slide (L105-112), a per-layer mix the estimate does not model
        if f.flag("use_sliding_window", False) and f.integer("sliding_window") is not None:
            raise VramcalcError("smollm3 with use_sliding_window is not supported (its NoPE layers slide and the "
                                "others do not; the estimate models one window for every layer)")
        out.update(num_kv_heads=f.integer("num_key_value_heads", 4), sliding_window=None)
    elif family == "gemma3_text":
        out.update(_gemma3_fields(f, fields["num_layers"]))
    elif family == "glm4":
        # Glm4Config: attention_bias True on q/k/v (o_proj never has one), partial_rotary_factor 0.5
        # (configuration_glm4.py L73, L76; modeling_glm4.py L211-220); rotary_dim stays set at factor 1 too: q and k
        # are concatenated back into new tensors whatever the factor (apply_rotary_pos_emb L192-194)
        factor = f.fraction("partial_rotary_factor", f.fraction("partial_rotary_factor", 0.5, rope))
        out.update(qkv_bias=f.flag("attention_bias", True), o_bias=False,
                   rotary_dim=int(fields["head_dim"] * factor))
        return out
    elif family == "cohere2":
        # Cohere2Config: num_key_value_heads = heads, head_dim = h / a (a config.json head_dim, set after
        # __post_init__, wins), sliding_window 4096, every 4th layer full (configuration_cohere2.py L84, L88-101);
        # attention_bias on q/k/v/o (modeling_cohere2.py L192-203)
        types = _layer_types(f, fields["num_layers"], 4)
        window = f.integer("sliding_window", 4096)
        out.update(layer_types=types,
                   sliding_window=window if "sliding_attention" in types else None)
        return out
    elif family == "ernie4_5":
        # Ernie4_5Config: use_bias False on every Linear but lm_head (configuration_ernie4_5.py L79;
        # modeling_ernie4_5.py L97-99, L199-202)
        bias = f.flag("use_bias", False)
        out.update(qkv_bias=bias, o_bias=bias, mlp_bias=bias)
    elif family == "qwen2_moe":
        # Qwen2MoeConfig (transformers 5.25 configuration_qwen2_moe.py): num_key_value_heads 16 = heads (L79-80),
        # qkv_bias True (L101), shared_expert_intermediate_size 5632 (L94); use_sliding_window False (L88): with it,
        # the first max_window_layers layers alternate sliding and full (L110-116), a per-layer mix not modelled
        if f.flag("use_sliding_window", False):
            raise VramcalcError("qwen2_moe with use_sliding_window is not supported (its layers alternate sliding "
                                "and full attention; the estimate models one window for every layer)")
        shared = f.integer("shared_expert_intermediate_size", 5632, minimum=0)
        out.update(qkv_bias=f.flag("qkv_bias", True), sliding_window=None, shared_expert_intermediate_size=shared,
                   n_shared_experts=1 if shared else 0)
    elif family == "gpt_oss":
        out.update(_gpt_oss_fields(f, fields["num_layers"]))
    elif family == "llama4_text":
        out.update(_llama4_text_fields(f, fields))
    elif family == "lfm2":
        out.update(_lfm2_fields(f, fields["num_layers"]))
    elif family in ("opt", "bloom", "gptj"):
        out.update(_legacy_fields(f, family, hidden, heads))
    elif family == "bert":
        out.update(_encoder_fields(f, hidden, heads))
    if out.get("rotary_dim") == out.get("head_dim"):
        out["rotary_dim"] = 0
    return out


def _legacy_fields(f: _Fields, family: str, hidden: int, heads: int) -> dict:
    """OPT, BLOOM and GPT-J (multi-head attention, head_dim = h / a in each), with their config-class defaults
    (transformers 5.25 ``configuration_opt.py``, ``configuration_bloom.py``, ``configuration_gptj.py``). Layouts the
    estimate does not model are refused by name."""
    if hidden % heads:
        raise VramcalcError(f"{family}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    head_dim = hidden // heads
    out = dict(num_kv_heads=heads, head_dim=head_dim)
    activation = f.config.get("activation_function")
    if family == "opt":
        # OPTConfig: enable_bias True, do_layer_norm_before True, word_embed_proj_dim = hidden_size,
        # layer_norm_elementwise_affine True, _remove_final_layer_norm False, activation_function "relu",
        # max_position_embeddings 2048 (configuration_opt.py L57-74)
        if not f.flag("do_layer_norm_before", True) or f.integer("word_embed_proj_dim", hidden) != hidden:
            raise VramcalcError("opt with do_layer_norm_before false or word_embed_proj_dim unlike hidden_size is not "
                                "supported (facebook/opt-350m's post-norm layout with project_in/project_out)")
        if not f.flag("layer_norm_elementwise_affine", True) or f.flag("_remove_final_layer_norm", False):
            raise VramcalcError("opt without LayerNorm weights or without its final layer norm is not supported")
        if activation not in (None, "relu"):
            raise VramcalcError(f"opt with activation_function {_describe(activation)} is not supported (only relu)")
        bias = f.flag("enable_bias", True)
        out.update(qkv_bias=bias, o_bias=bias, mlp_bias=bias,
                   max_position_embeddings=f.integer("max_position_embeddings", 2048))
    elif family == "bloom":
        # BloomConfig: apply_residual_connection_post_layernorm False, pretraining_tp 1, slow_but_exact False
        # (configuration_bloom.py L67-71); every Linear but lm_head has a bias, the MLP is 4h wide
        # (modeling_bloom.py L197-198, L319-321); ALiBi, no position limit
        if f.flag("apply_residual_connection_post_layernorm", False):
            raise VramcalcError("bloom with apply_residual_connection_post_layernorm is not supported")
        if f.flag("slow_but_exact", False) and f.integer("pretraining_tp", 1) > 1:
            raise VramcalcError("bloom with slow_but_exact and pretraining_tp > 1 is not supported (its sliced "
                                "dense matmuls are not modelled)")
        out.update(intermediate_size=4 * hidden, qkv_bias=True, o_bias=True, mlp_bias=True,
                   max_position_embeddings=None)
    else:
        # GPTJConfig: n_inner None (4h), rotary_dim 64 (None: all of head_dim), activation_function "gelu_new",
        # n_positions 2048 (configuration_gptj.py L67-74); q/k/v/out_proj without bias, fc_in/fc_out with
        if activation not in (None, "gelu_new"):
            raise VramcalcError(f"gptj with activation_function {_describe(activation)} is not supported "
                                "(only gelu_new)")
        full = "rotary_dim" in f.config and f.config["rotary_dim"] is None
        rotary = head_dim if full else f.integer("rotary_dim", 64, maximum=MAX_SIZES["head_dim"])
        if rotary > head_dim or rotary % 2:
            raise VramcalcError(f"config.json field 'rotary_dim' must be an even width of at most head_dim "
                                f"({head_dim}), got {rotary}")
        out.update(intermediate_size=f.integer("n_inner", 4 * hidden, maximum=MAX_SIZES["intermediate_size"]),
                   rotary_dim=rotary, qkv_bias=False, o_bias=False, mlp_bias=True,
                   max_position_embeddings=f.integer("max_position_embeddings", 2048))
    return out


# AutoModelForSequenceClassification's labels when a config names none: PretrainedConfig builds id2label for
# num_labels=2 (transformers 5.25 configuration_utils.py L450-454)
DEFAULT_NUM_LABELS = 2
# BertConfig's defaults of the fields a ModelSpec keeps (transformers 5.25 configuration_bert.py L50-53), which the
# catalogue's BERT rows take (their config.json files set the same values)
ENCODER_DEFAULTS = {"type_vocab_size": 2, "hidden_dropout": 0.1, "attention_dropout": 0.1,
                    "score_labels": DEFAULT_NUM_LABELS}


def _encoder_fields(f: _Fields, hidden: int, heads: int) -> dict:
    """BERT (``BertConfig``, transformers 5.25 configuration_bert.py L44-63): hidden_act "gelu",
    hidden_dropout_prob 0.1, attention_probs_dropout_prob 0.1, max_position_embeddings 512, type_vocab_size 2,
    classifier_dropout None (the hidden dropout, on [b, h] only: not read), is_decoder and add_cross_attention
    False; every Linear has a bias (modeling_bert.py L155-157, L286, L330, L345); multi-head attention with
    head_dim h / a (L148-150). The sequence classifier's num_labels: the config's, else its id2label's length, else 2.
    Its tie_word_embeddings ties BertForMaskedLM's decoder, which a sequence classifier does not have. Layouts the
    estimate does not model are refused by name."""
    if hidden % heads:
        raise VramcalcError(f"bert: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    if f.flag("is_decoder", False) or f.flag("add_cross_attention", False):
        raise VramcalcError("bert with is_decoder or add_cross_attention is not supported (a causal BERT decoder; "
                            "vramcalc models the bidirectional encoder's sequence classifier)")
    position = f.config.get("position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        raise VramcalcError(f"bert with position_embedding_type {_describe(position)} is not supported (only "
                            "absolute positions)")
    activation = f.config.get("hidden_act")
    if activation not in (None, "gelu"):
        raise VramcalcError(f"bert with hidden_act {_describe(activation)} is not supported (only gelu)")
    labels = f.config.get("id2label")
    default_labels = len(labels) if isinstance(labels, dict) and labels else DEFAULT_NUM_LABELS
    return dict(num_kv_heads=heads, head_dim=hidden // heads, qkv_bias=True, o_bias=True, mlp_bias=True,
                tie_word_embeddings=False, max_position_embeddings=f.integer("max_position_embeddings", 512),
                type_vocab_size=f.integer("type_vocab_size", ENCODER_DEFAULTS["type_vocab_size"],
                                          maximum=MAX_SIZES["vocab_size"]),
                hidden_dropout=f.probability("hidden_dropout_prob", ENCODER_DEFAULTS["hidden_dropout"]),
                attention_dropout=f.probability("attention_probs_dropout_prob", ENCODER_DEFAULTS["attention_dropout"]),
                score_labels=f.integer("num_labels", default_labels, maximum=MAX_SIZES["vocab_size"]))


def _gpt_oss_fields(f: _Fields, layers: int) -> dict:
    """GptOssConfig (transformers 5.25 configuration_gpt_oss.py): num_key_value_heads 8, head_dim 64,
    sliding_window 128 (L56-59), attention_bias True (L77), layer_types alternating sliding and full from layer 0
    (L84-87); expert width = intermediate_size (GptOssExperts, modeling_gpt_oss.py L71). An MXFP4 checkpoint
    (quantization_config.quant_method "mxfp4") is counted as the bf16 model transformers trains (``MXFP4_NOTE``)."""
    types = f.config.get("layer_types")
    if types is None:
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in _LAYER_TYPES for t in types):
        raise f._bad("layer_types", f"a list of {layers} of {' or '.join(map(repr, _LAYER_TYPES))}", types)
    bias = f.flag("attention_bias", True)
    window = f.integer("sliding_window", 128)
    quant = f.mapping("quantization_config").get("quant_method")
    out = dict(num_kv_heads=f.integer("num_key_value_heads", 8), head_dim=f.integer("head_dim", 64), qkv_bias=bias,
               o_bias=bias, layer_types=tuple(types), sliding_window=window if "sliding_attention" in types else None)
    if quant == "mxfp4":
        out["notes"] = MXFP4_NOTE
    return out


def _llama4_text_fields(f: _Fields, fields: dict) -> dict:
    """Llama4TextConfig (transformers 5.25 configuration_llama4.py L51-112): intermediate_size is the experts' and
    the shared expert's width, intermediate_size_mlp (16384) the dense layers'; num_key_value_heads 8, head_dim 128;
    MoE layers every interleave_moe_layer_step-th (from step - 1) unless moe_layers lists them; use_qk_norm True;
    no_rope_layers: every no_rope_layer_interval-th layer (4) is NoPE; layer_types chunked_attention for RoPE layers
    when attention_chunk_size (8192) is set, full_attention for the NoPE ones. The chunk size acts as a sliding
    window for the mask decision (masking_utils._ignore_causal_mask_sdpa skips it while kv_length < chunk)."""
    layers = fields["num_layers"]
    expert_width = fields["intermediate_size"]
    step = f.integer("interleave_moe_layer_step", 1, maximum=layers)
    moe_layers = f.layer_list("moe_layers", layers) if f.config.get("moe_layers") is not None else None
    if moe_layers is None:
        sparse_step, dense_layers = step, ()
    else:
        sparse_step, dense_layers = 1, tuple(i for i in range(layers) if i not in moe_layers)
    interval = f.integer("no_rope_layer_interval", 4, maximum=MAX_SIZES["num_hidden_layers"])
    no_rope = f.config.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    chunk = f.integer("attention_chunk_size") if "attention_chunk_size" in f.config else 8192  # null: no chunks
    types = f.config.get("layer_types")
    if types is None:
        types = ["chunked_attention" if use_rope and chunk is not None else "full_attention" for use_rope in no_rope]
    if not isinstance(types, list) or len(types) != layers or any(
            t not in ("chunked_attention", "full_attention") for t in types):
        raise f._bad("layer_types", f"a list of {layers} of 'chunked_attention' or 'full_attention'", types)
    return dict(num_kv_heads=f.integer("num_key_value_heads", 8), head_dim=f.integer("head_dim", 128),
                intermediate_size=f.integer("intermediate_size_mlp", 16384), moe_intermediate_size=expert_width,
                n_shared_experts=1, decoder_sparse_step=sparse_step, mlp_only_layers=dense_layers,
                qk_norm=f.flag("use_qk_norm", True), layer_types=tuple(types),
                nope_layers=tuple(i for i, use_rope in enumerate(no_rope) if not use_rope),
                sliding_window=chunk if "chunked_attention" in types else None)


# What transformers 5.25 does with gpt-oss's MXFP4 checkpoint when one trains it, and so what the estimate counts
MXFP4_NOTE = (
    "MXFP4 checkpoint: transformers cannot train MXFP4 experts (Mxfp4HfQuantizer.is_trainable is False, "
    "quantizers/quantizer_mxfp4.py L191-195; Trainer refuses it, trainer_utils.py L102-140), so training loads it "
    "with Mxfp4Config(dequantize=True), as transformers itself does without a GPU of compute capability >= 7.5, "
    "triton or the kernels package (L94-120): the experts are dequantized to bf16 at load "
    "(integrations/mxfp4.py Mxfp4Dequantize) and the quantization config removed (quantizers/base.py L220-221); "
    "the estimate counts that bf16 model")


def _gemma3_fields(f: _Fields, layers: int) -> dict:
    """Gemma3TextConfig (transformers 5.25 configuration_gemma3.py): num_key_value_heads 4 (L78), sliding_window
    4096 (L93), layer_types from the config or, every sliding_window_pattern-th layer (6) full, the rest sliding
    (L104-111). Soft-capping and bidirectional attention (off by default, L95-97) are refused by name."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if f.config.get(key) is not None:
            raise VramcalcError(f"gemma3_text with {key} is not supported (the estimate models Gemma-3 without "
                                "soft-capping)")
    if f.flag("use_bidirectional_attention", False):
        raise VramcalcError("gemma3_text with use_bidirectional_attention is not supported")
    types = _layer_types(f, layers, 6)
    window = f.integer("sliding_window", 4096)
    return dict(num_kv_heads=f.integer("num_key_value_heads", 4), layer_types=types,
                sliding_window=window if "sliding_attention" in types else None)


def _layer_types(f: _Fields, layers: int, pattern: int) -> tuple[str, ...]:
    """``layer_types`` from the config or, when absent, every ``sliding_window_pattern``-th layer full and the rest
    sliding (the config classes' rule; the pattern's default is the family's)."""
    types = f.config.get("layer_types")
    if types is None:
        pattern = f.integer("sliding_window_pattern", pattern, maximum=MAX_SIZES["num_hidden_layers"])
        types = list(default_layer_types(f.family, layers, pattern))
    if not isinstance(types, list) or len(types) != layers or any(t not in _LAYER_TYPES for t in types):
        raise f._bad("layer_types", f"a list of {layers} of {' or '.join(map(repr, _LAYER_TYPES))}", types)
    return tuple(types)


def _lfm2_fields(f: _Fields, layers: int) -> dict:
    """Lfm2Config (transformers 5.25 configuration_lfm2.py): num_key_value_heads 8 (L63), intermediate_size 12288
    (L60; a ``block_ff_dim`` key wins, L91), tied (L71; a ``tie_embedding`` key wins, L90), conv_bias False,
    conv_L_cache 3 (L73-74); layer_types from the config or, when absent, "full_attention" on the layers of
    full_attn_idxs (default: every layer) and "conv" on the others (L82-88). Lfm2MLP's width (modeling_lfm2.py
    L114-122): with block_auto_adjust_ff_dim (default True) int(2·I/3), times block_ffn_dim_multiplier (1.0) when
    set, rounded up to a multiple of block_multiple_of (256); else I as is."""
    width = f.integer("block_ff_dim", f.integer("intermediate_size", 12288))
    if f.flag("block_auto_adjust_ff_dim", True):
        width = int(2 * width / 3)
        multiplier = f.config.get("block_ffn_dim_multiplier", 1.0)
        if multiplier is not None:
            if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not math.isfinite(
                    multiplier) or multiplier <= 0:
                raise f._bad("block_ffn_dim_multiplier", "a positive number", multiplier)
            multiple = f.integer("block_multiple_of", 256, maximum=MAX_SIZES["intermediate_size"])
            width = multiple * ((int(multiplier * width) + multiple - 1) // multiple)
        if not 1 <= width <= MAX_SIZES["intermediate_size"]:
            raise f._bad("block_ff_dim", "a width whose adjusted MLP size is at least 1", width)
    types = f.config.get("layer_types")
    if types is None:
        attention = f.layer_list("full_attn_idxs", layers) if f.config.get("full_attn_idxs") is not None \
            else tuple(range(layers))
        types = ["full_attention" if i in attention else "conv" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in ("full_attention", "conv") for t in types):
        raise f._bad("layer_types", f"a list of {layers} of 'full_attention' or 'conv'", types)
    tied = f.flag("tie_embedding", f.flag("tie_word_embeddings", True))
    return dict(num_kv_heads=f.integer("num_key_value_heads", 8), intermediate_size=width, layer_types=tuple(types),
                conv_kernel=f.integer("conv_L_cache", 3, maximum=MAX_SIZES["conv_L_cache"]),
                conv_bias=f.flag("conv_bias", False), tie_word_embeddings=tied, sliding_window=None)
