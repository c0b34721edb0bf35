"""Small but real architectures of every supported family: the CI-sized stand-ins for the catalogue's models.

Dimensions keep each family's structure (GQA ratios, head_dim != hidden/heads, biases, q/k norms, softcaps, fused
projections, MoE routing, MLA ranks); only the sizes shrink so a trace runs in well under a second.
"""

from vramcalc.model import ModelSpec

TINY = {
    "llama": ModelSpec(name="tiny-llama", family="llama", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=64, intermediate_size=688, vocab_size=2048, max_position_embeddings=4096),
    "mistral": ModelSpec(name="tiny-mistral", family="mistral", hidden_size=256, num_layers=2, num_heads=8,
                         num_kv_heads=2, head_dim=32, intermediate_size=512, vocab_size=2048),
    "qwen2": ModelSpec(name="tiny-qwen2", family="qwen2", hidden_size=224, num_layers=2, num_heads=7, num_kv_heads=1,
                       head_dim=32, intermediate_size=608, vocab_size=3000, qkv_bias=True),
    "qwen3": ModelSpec(name="tiny-qwen3", family="qwen3", hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                       head_dim=64, intermediate_size=512, vocab_size=2048, qk_norm=True),
    "gemma2": ModelSpec(name="tiny-gemma2", family="gemma2", hidden_size=192, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=64, intermediate_size=512, vocab_size=4096, tie_word_embeddings=True,
                        sliding_window=64),
    "phi3": ModelSpec(name="tiny-phi3", family="phi3", hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=4,
                      head_dim=32, intermediate_size=512, vocab_size=2048),
    "mixtral": ModelSpec(name="tiny-mixtral", family="mixtral", hidden_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=64, intermediate_size=384, vocab_size=2048, num_experts=4,
                         experts_per_token=2),
    "qwen3_moe": ModelSpec(name="tiny-qwen3-moe", family="qwen3_moe", hidden_size=256, num_layers=2, num_heads=8,
                           num_kv_heads=2, head_dim=32, intermediate_size=512, vocab_size=2048, qk_norm=True,
                           num_experts=8, experts_per_token=2, moe_intermediate_size=96),
    "deepseek_v3": ModelSpec(name="tiny-deepseek-v3", family="deepseek_v3", hidden_size=256, num_layers=3,
                             num_heads=4, num_kv_heads=4, head_dim=32, intermediate_size=512, vocab_size=2048,
                             num_experts=8, experts_per_token=2, moe_intermediate_size=64, n_shared_experts=1,
                             first_k_dense_replace=1, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                             qk_rope_head_dim=16, v_head_dim=32),
}


def tiny_teacher_config(family: str) -> str:
    """A ``--teacher`` for ``--task distill``: the family's tiny model twice as deep and wide (same vocabulary),
    written as a config.json vramcalc reads; returns its folder."""
    import dataclasses
    import pathlib
    import tempfile

    from vramcalc.tracing.build import hf_config

    student = TINY[family]
    teacher = dataclasses.replace(student, name=f"{student.name}-teacher", num_layers=2 * student.num_layers,
                                  hidden_size=2 * student.hidden_size,
                                  intermediate_size=2 * student.intermediate_size)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="vramcalc-teacher-"))
    hf_config(teacher).to_json_file(str(folder / "config.json"))
    return str(folder)


def meta_param_count(config) -> int:
    """``sum(p.numel())`` of the model transformers builds on ``meta`` from a ``PretrainedConfig`` (tied weights
    counted once): the exact count every family's parameter inventory is checked against."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def default_config_counts(family: str, folder, **fields) -> tuple[int, int]:
    """(vramcalc's parameter count of transformers' default config of ``family``, with ``fields`` set, written as
    ``folder``/config.json and read back; the count of the model transformers builds from it on ``meta``)."""
    from transformers import AutoConfig

    from vramcalc.hf_config import load_config

    config = AutoConfig.for_model(family, **fields)
    (folder / "config.json").write_text(config.to_json_string())
    return load_config(folder).params, meta_param_count(config)


def tiny_counts(spec: ModelSpec) -> tuple[int, int]:
    """(a tiny spec's parameter count; the count of the model transformers builds from its config on ``meta``)."""
    from vramcalc.tracing.build import hf_config

    return spec.params, meta_param_count(hf_config(spec))


def catalogue_row_and_config(name: str, config: dict, metadata: set[str]):
    """A catalogue row against its published config.json: (the row's fields, the fields read from the config, both
    without ``metadata``; and (the row's count, the config's count, the row's params_exact))."""
    import dataclasses

    from vramcalc import catalogue
    from vramcalc.hf_config import spec_from_config

    row, read = catalogue.get_model(name), spec_from_config(config, name=name)
    fields = [f.name for f in dataclasses.fields(row) if f.name not in metadata]
    return ({f: getattr(row, f) for f in fields}, {f: getattr(read, f) for f in fields},
            (row.params, read.params, row.params_exact))
