"""The catalogues: every model's parameter count, and the facts the issue requires of each GPU row."""

import csv
import re
from pathlib import Path

import pytest

from vramcalc import catalogue

from .tiny_models import catalogue_row_and_config

REQUIRED_MODELS = (
    "llama-2-7b llama-2-13b llama-2-70b llama-3.1-8b llama-3.1-70b llama-3.1-405b llama-3.3-70b mistral-7b "
    "mistral-large-2407 mixtral-8x7b qwen2.5-7b qwen2.5-14b qwen2.5-32b qwen2.5-72b qwen3-8b qwen3-14b qwen3-32b "
    "qwen3-30b-a3b qwen3-235b-a22b gemma-2-2b gemma-2-9b gemma-2-27b phi-4 phi-3-mini deepseek-v3 deepseek-r1 "
    "deepseek-r1-distill-llama-8b deepseek-r1-distill-qwen-32b tinyllama-1.1b smollm2-135m smollm2-360m smollm2-1.7b"
).split()
REQUIRED_GPUS = (
    "h200 h100-sxm h100-pcie a100-40gb a100-80gb l40s a10g l4 rtx-5090 rtx-4090 rtx-3090 rtx-6000-ada b200 mi300x t4 "
    "v100-32gb"
).split()
MODELS = catalogue.models()
DATA = Path(__file__).resolve().parents[1] / "data"  # the source checkout's data/ (the .md files are not in the wheel)


# issue 13: the small models people fine-tune on one consumer GPU, and every R1 distill
ISSUE_13_MODELS = (
    "llama-3.2-1b llama-3.2-3b qwen2.5-0.5b qwen2.5-1.5b qwen2.5-3b qwen3-0.6b qwen3-1.7b qwen3-4b phi-4-mini "
    "mistral-small-24b smollm2-135m smollm2-360m smollm2-1.7b deepseek-r1-distill-qwen-1.5b deepseek-r1-distill-qwen-7b "
    "deepseek-r1-distill-qwen-14b deepseek-r1-distill-qwen-32b deepseek-r1-distill-llama-8b deepseek-r1-distill-llama-70b"
).split()


def test_catalogue_holds_the_issue_13_models():
    assert set(ISSUE_13_MODELS) <= {m.name for m in MODELS}


def test_catalogue_holds_at_least_30_models_including_every_required_one():
    names = {m.name for m in MODELS}
    assert len(MODELS) >= 30
    assert set(REQUIRED_MODELS) <= names


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_parameter_count_equals_the_reference_exact_count(model):
    # params_exact: shared/reference/models_ref.csv "params_computed", which matches the public safetensors counts
    assert model.params == model.params_exact


def _rounding_half_unit(published: int) -> int:
    """Half a unit of the last digit a published figure is written with: 0.05e9 for "0.6B" (600,000,000), 0.5e9 for
    "7B", 0 for an exact count."""
    digits = str(published).rstrip("0")
    return 10 ** (len(str(published)) - len(digits)) // 2


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_parameter_count_is_within_half_a_percent_of_the_published_total(model):
    # within 0.5 %, or, for a figure rounded coarser than that ("0.6B", "7B"), within its rounding
    assert abs(model.params - model.params_published) <= max(0.005 * model.params_published,
                                                               _rounding_half_unit(model.params_published))


def test_rounding_half_unit_reads_the_published_precision():
    assert _rounding_half_unit(600_000_000) == 50_000_000
    assert _rounding_half_unit(7_000_000_000) == 500_000_000
    assert _rounding_half_unit(1_230_000_000) == 5_000_000
    assert _rounding_half_unit(70_426_624) == 0


@pytest.mark.parametrize("model", [m for m in MODELS if m.is_moe], ids=lambda m: m.name)
def test_moe_models_report_active_parameters_near_the_published_figure(model):
    # published active counts are rounded to one or two digits ("3.3B", "22B", "37B"): 2% covers the rounding
    assert model.active_params < model.params
    assert abs(model.active_params - model.active_params_published) / model.active_params_published < 0.02


def test_every_model_row_has_a_licence_and_a_source():
    for model in MODELS:
        assert model.license and model.source, model.name


def test_gpu_catalogue_holds_every_required_gpu_with_sources():
    gpus = {g.name: g for g in catalogue.gpus()}
    assert len(gpus) >= 15
    assert set(REQUIRED_GPUS) <= set(gpus)
    for gpu in gpus.values():
        assert gpu.source, gpu.name
        assert gpu.memory_bytes > 10 * 2**30, gpu.name
        assert gpu.bandwidth_gb_s and gpu.tdp_w, gpu.name


@pytest.mark.parametrize("name", ["t4", "v100-32gb"])
def test_gpus_without_bf16_have_no_bf16_figure(name):
    gpu = catalogue.get_gpu(name)
    assert not gpu.supports_bf16 and gpu.bf16_dense_tflops is None and gpu.fp16_dense_tflops


def test_dense_not_sparse_tflops_for_h100():
    # gpus_ref.csv: 989 dense bf16 (1979 is the 2:4-sparse datasheet figure)
    assert catalogue.get_gpu("h100-sxm").bf16_dense_tflops < 1000


def test_memory_is_what_the_driver_reports():
    # nvidia-smi shows 81559 MiB for an H100 SXM (shared/reference/reference-data.md S26)
    assert catalogue.get_gpu("h100-sxm").memory_bytes == 81559 * 2**20


def test_cloud_prices_carry_their_date():
    for gpu in catalogue.gpus():
        if gpu.cloud_usd_per_gpu_hour is not None:
            assert gpu.cloud_price_date[:4].isdigit(), gpu.name


def test_model_lookup_is_case_insensitive_and_accepts_the_hf_repo_id():
    assert catalogue.get_model("LLAMA-3.1-8B").name == "llama-3.1-8b"
    assert catalogue.get_model("meta-llama/Llama-3.1-8B").name == "llama-3.1-8b"


def test_unknown_gpu_suggests_close_matches():
    with pytest.raises(ValueError, match="h100-sxm"):
        catalogue.get_gpu("h100-sxn")


def _defined_source_ids(sources_file: str) -> set[str]:
    """The ids a sources file defines: the first cell of each table row ("| S19 | ...")."""
    text = (DATA / sources_file).read_text(encoding="utf-8")
    return set(re.findall(r"^\| (S\d+) \|", text, flags=re.MULTILINE))


@pytest.mark.parametrize("catalogue_file, sources_file, columns", [
    ("models.csv", "models_sources.md", ("source",)),
    ("gpus.csv", "gpus_sources.md", ("source", "interconnect_source")),
])
def test_every_cited_source_id_is_defined_in_the_sources_file(catalogue_file, sources_file, columns):
    defined = _defined_source_ids(sources_file)
    with open(DATA / catalogue_file, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cited = {(row["name"], source_id) for row in rows for column in columns
             for source_id in re.findall(r"\bS\d+\b", row[column])}
    assert cited, "no row cites a source"
    assert {(name, source_id) for name, source_id in cited if source_id not in defined} == set()


def test_the_sources_file_every_model_row_points_to_exists():
    for model in MODELS:
        for named in re.findall(r"data/([\w.]+\.md)", model.source):
            assert (DATA / named).is_file(), (model.name, named)


# issue 13 item 6: the 2025 families people fine-tune. Each config below is the published config.json (its text_config
# for the multimodal Gemma 3), trimmed to the keys the reader and transformers look at, from the sources cited in
# data/models_sources.md; params_exact of each row is sum(p.numel()) of the model transformers 5.25 builds on meta from
# it (tests/test_model_inventory.py builds it again).
_GPT_OSS = dict(model_type="gpt_oss", attention_bias=True, head_dim=64, hidden_size=2880, intermediate_size=2880,
                max_position_embeddings=131072, num_attention_heads=64, num_experts_per_tok=4, num_key_value_heads=8,
                sliding_window=128, tie_word_embeddings=False, vocab_size=201088,
                quantization_config={"quant_method": "mxfp4"})
_GRANITE = dict(model_type="granite", embedding_multiplier=12.0, residual_multiplier=0.22, intermediate_size=8192,
                max_position_embeddings=131072, num_attention_heads=32, num_hidden_layers=40, num_key_value_heads=8,
                tie_word_embeddings=True, vocab_size=49159)
_OLMO2 = dict(model_type="olmo2", attention_bias=False, max_position_embeddings=4096, tie_word_embeddings=False,
              vocab_size=100352)
PUBLISHED_CONFIGS = {
    "gpt-oss-20b": {**_GPT_OSS, "num_hidden_layers": 24, "num_local_experts": 32,  # S54
                    "layer_types": ["sliding_attention", "full_attention"] * 12},
    "gpt-oss-120b": {**_GPT_OSS, "num_hidden_layers": 36, "num_local_experts": 128,  # S55
                     "layer_types": ["sliding_attention", "full_attention"] * 18},
    "gemma-3-4b": dict(model_type="gemma3", text_config=dict(  # S56
        model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, sliding_window=1024)),
    "gemma-3-27b": dict(model_type="gemma3", text_config=dict(  # S57
        model_type="gemma3_text", head_dim=128, hidden_size=5376, intermediate_size=21504, num_attention_heads=32,
        num_hidden_layers=62, num_key_value_heads=16, query_pre_attn_scalar=168, sliding_window=1024)),
    "granite-3.3-8b": {**_GRANITE, "hidden_size": 4096, "intermediate_size": 12800},  # S58
    "granite-3.3-2b": {**_GRANITE, "hidden_size": 2048},  # S59
    "olmo-2-1124-7b": {**_OLMO2, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,  # S60
                       "num_hidden_layers": 32, "num_key_value_heads": 32},
    "olmo-2-1124-13b": {**_OLMO2, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,  # S61
                        "num_hidden_layers": 40, "num_key_value_heads": 40},
    "llama-4-scout": dict(model_type="llama4_text", attention_chunk_size=8192, head_dim=128, hidden_size=5120,  # S62
                          interleave_moe_layer_step=1, intermediate_size=8192, intermediate_size_mlp=16384,
                          max_position_embeddings=10485760, no_rope_layers=[1, 1, 1, 0] * 12, num_attention_heads=40,
                          num_experts_per_tok=1, num_hidden_layers=48, num_key_value_heads=8, num_local_experts=16,
                          tie_word_embeddings=False, use_qk_norm=True, vocab_size=202048),
}
# fields of a row that are not read from config.json: catalogue metadata, and the context length the multimodal
# Gemma 3 configs leave to Gemma3TextConfig's default (131072, as gemma-3-12b's row)
_METADATA = {"name", "hf_repo", "license", "source", "notes", "params_published", "active_params_published",
             "params_exact", "max_position_embeddings"}


@pytest.mark.parametrize("name", PUBLISHED_CONFIGS)
def test_issue_13_item_6_rows_hold_what_their_published_config_says(name):
    row_fields, read_fields, (row_params, read_params, exact) = catalogue_row_and_config(
        name, PUBLISHED_CONFIGS[name], _METADATA)
    assert row_fields == read_fields
    assert row_params == read_params == exact


def test_gpt_oss_layer_kinds_alternate_from_a_sliding_first_layer_and_llama4_skips_rope_every_fourth_layer():
    # S54, S55: layer_types; S62: no_rope_layers [1, 1, 1, 0] x 12, chunked attention on the RoPE layers
    for name, layers in (("gpt-oss-20b", 24), ("gpt-oss-120b", 36)):
        kinds = catalogue.get_model(name).layer_types
        assert kinds == ("sliding_attention", "full_attention") * (layers // 2)
    scout = catalogue.get_model("llama-4-scout")
    assert scout.nope_layers == tuple(range(3, 48, 4))
    assert [i for i, kind in enumerate(scout.layer_types) if kind == "full_attention"] == list(scout.nope_layers)


def test_models_family_gpt_oss_lists_both_gpt_oss_models(capsys):
    import json

    from .cli_helpers import run_cli

    code, out, err = run_cli(capsys, "models", "--family", "gpt_oss", "--format", "json")
    assert code == 0, err
    assert [row["name"] for row in json.loads(out)] == ["gpt-oss-20b", "gpt-oss-120b"]


def test_every_data_table_ships_in_the_wheel():
    """The installed package reads its tables from ``vramcalc/data`` (``catalogue.data_dir``), which holds only what
    pyproject's ``force-include`` maps there (a file, or its folder): a table left out works from a checkout and fails
    after ``pip install .`` (``vramcalc estimate ... --gpu`` needs gpu_links.csv and achievable_rates.csv)."""
    import tomllib

    pyproject = tomllib.loads((DATA.parent / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    tables = {f"data/{path.name}" for path in DATA.glob("*.csv")}

    def target(table: str) -> str | None:  # where the wheel puts a table: its own mapping, or its folder's
        folder, name = table.rsplit("/", 1)
        return shipped.get(table) or (shipped[folder] + "/" + name if folder in shipped else None)

    assert tables and all(target(table) == "vramcalc/" + table for table in tables)
