"""Read a Hugging Face ``config.json`` (a file, or a folder holding one) into a ModelSpec, without transformers.

Defaults are the transformers v5 config-class defaults (``models/<family>/configuration_<family>.py``); a field
with no default there is required here, and its absence is reported by name.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import VramcalcError
from .model import FAMILIES, SUPPORTED_FAMILIES, ModelSpec

# Config-class defaults that differ from "hidden_size // num_attention_heads" and "untied".
_DEFAULT_HEAD_DIM = {"qwen3": 128, "qwen3_moe": 128, "gemma2": 256}
# Where each family keeps its expert count.
_EXPERTS_KEY = {"mixtral": "num_local_experts", "qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}


def load_config(path: str | Path) -> ModelSpec:
    """A ModelSpec from ``path`` (``config.json`` or its folder). Raises VramcalcError naming what is wrong."""
    path = Path(path).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise VramcalcError(f"no config.json at {str(path)!r}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VramcalcError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise VramcalcError(f"{file} is not a JSON object")
    name = path.name if path.is_dir() else (file.parent.name or file.stem)
    return spec_from_config(config, name=name or "config")


def spec_from_config(config: dict, name: str = "config") -> ModelSpec:
    """A ModelSpec from a parsed config dict."""
    family = config.get("model_type")
    if family is None:
        raise VramcalcError(f"config {name!r} lacks the field 'model_type'")
    if family not in FAMILIES:
        raise VramcalcError(f"unsupported architecture {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    traits = FAMILIES[family]

    def need(key: str) -> int:
        value = config.get(key)
        if value is None:
            raise VramcalcError(f"config {name!r} ({family}) lacks the field {key!r}")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise VramcalcError(f"config {name!r}: field {key!r} must be a positive integer, got {value!r}")
        return value

    def optional(key: str, default):
        value = config.get(key)
        return default if value is None else value

    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    fields = dict(
        name=name,
        family=family,
        hidden_size=hidden,
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=optional("num_key_value_heads", heads),
        head_dim=optional("head_dim", _DEFAULT_HEAD_DIM.get(family, hidden // heads)),
        intermediate_size=need("intermediate_size"),
        vocab_size=need("vocab_size"),
        tie_word_embeddings=bool(optional("tie_word_embeddings", traits.default_tied)),
        max_position_embeddings=config.get("max_position_embeddings"),
        qkv_bias=traits.qkv_bias or bool(config.get("attention_bias", False)),
        o_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=traits.qk_norm,
        sliding_window=config.get("sliding_window") if config.get("use_sliding_window", True) else None,
        hf_repo=str(config.get("_name_or_path", "")),
        source="config.json",
    )
    if traits.moe:
        fields.update(
            num_experts=need(_EXPERTS_KEY[family]),
            experts_per_token=need("num_experts_per_tok"),
            moe_intermediate_size=need("moe_intermediate_size") if family != "mixtral" else 0,
            n_shared_experts=optional("n_shared_experts", 0),
            first_k_dense_replace=optional("first_k_dense_replace", 0),
            decoder_sparse_step=optional("decoder_sparse_step", 1),
            mlp_only_layers=tuple(optional("mlp_only_layers", ())),
        )
    if traits.mla:
        fields.update(
            q_lora_rank=optional("q_lora_rank", 0),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
            head_dim=need("v_head_dim"),
        )
    return ModelSpec(**fields)
