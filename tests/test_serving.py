"""Serving estimates (``vramcalc.infer``): KV-cache bytes per family from the models' published configs, the engine
rules, the search answers, bad input. Standard library only; the trace checks are in test_serving_trace.py."""

import pytest

import vramcalc
from vramcalc.catalogue import get_gpu, get_model
from vramcalc.errors import VramcalcError
from vramcalc.serving import InferenceTerm, max_concurrency, max_context, serve_plan
from vramcalc.serving.kv_cache import hf_cache_bytes, kv_bytes_per_token, layer_is_sliding, paged_bytes_per_request
from vramcalc.serving.weights import _matrix_bytes, weight_bytes
from vramcalc.serving.terms import Weights

GIB = 2**30


# -- KV bytes per token, hand-derived: 2 (K and V) x layers x kv_heads x head_dim x bytes ---------------------------
@pytest.mark.parametrize("name, expected", [
    # meta-llama/Llama-3.1-8B config.json: num_hidden_layers 32, num_key_value_heads 8, hidden 4096 / 32 heads = 128
    ("llama-3.1-8b", 2 * 32 * 8 * 128 * 2),
    # meta-llama/Llama-3.1-70B config.json: 80 layers, 8 KV heads, 8192 / 64 = 128
    ("llama-3.1-70b", 2 * 80 * 8 * 128 * 2),
    # meta-llama/Llama-2-7b-hf config.json: 32 layers, 32 KV heads (MHA), 128
    ("llama-2-7b", 2 * 32 * 32 * 128 * 2),
    # Qwen/Qwen3-30B-A3B config.json: 48 layers, 4 KV heads, head_dim 128
    ("qwen3-30b-a3b", 2 * 48 * 4 * 128 * 2),
    # Qwen/Qwen3-14B config.json: 40 layers, 8 KV heads, head_dim 128
    ("qwen3-14b", 2 * 40 * 8 * 128 * 2),
])
def test_kv_bytes_per_token_gqa(name, expected):
    assert kv_bytes_per_token(get_model(name)) == expected


def test_kv_bytes_per_token_mla_is_the_latent():
    # deepseek-ai/DeepSeek-V3 config.json: 61 layers, kv_lora_rank 512, qk_rope_head_dim 64: the compressed latent and
    # the shared rope key, 576 values per layer and token (DeepSeek-V2 paper 2.1.2), not 128 heads x (192 + 128)
    assert kv_bytes_per_token(get_model("deepseek-v3")) == 61 * (512 + 64) * 2
    # MLA is not split by heads: tensor parallelism does not divide it
    assert kv_bytes_per_token(get_model("deepseek-v3"), tp=8) == 61 * (512 + 64) * 2


def test_tensor_parallel_splits_kv_heads_and_replicates_past_them():
    spec = get_model("llama-3.1-70b")  # 8 KV heads
    assert kv_bytes_per_token(spec, tp=4) == 2 * 80 * 2 * 128 * 2
    assert kv_bytes_per_token(spec, tp=16) == 2 * 80 * 1 * 128 * 2  # a head per GPU at least (replicated)


def test_fp8_kv_halves_the_cache():
    spec = get_model("llama-3.1-8b")
    assert kv_bytes_per_token(spec, element_bytes=1) * 2 == kv_bytes_per_token(spec)


def test_gemma2_alternates_sliding_layers():
    # google/gemma-2-9b config.json: 42 layers, sliding_window 4096, layer_types alternate from sliding (layer 0)
    spec = get_model("gemma-2-9b")
    assert [layer_is_sliding(spec, i) for i in range(4)] == [True, False, True, False]
    # after 10,000 tokens of decode a sliding layer holds the window, a full layer everything: 8 KV heads, 256 wide
    per_token_layer = 2 * 8 * 256 * 2
    expected = 21 * 10_000 * per_token_layer + 21 * 4096 * per_token_layer
    assert hf_cache_bytes(spec, 1, 10_000, last_input=1) == expected


def test_hf_static_cache_holds_max_cache_len():
    spec = get_model("llama-3.1-8b")
    # StaticLayer: [batch, kv_heads, max_cache_len, head_dim] zeros per K and V, whatever was seen
    assert hf_cache_bytes(spec, 2, 10, last_input=10, static_len=1000) == 32 * 2 * (2 * 8 * 1000 * 128 * 2)


def test_paged_request_rounds_to_blocks():
    spec = get_model("llama-3.1-8b")
    # 1000 tokens take ceil(1000 / 16) = 63 blocks of 16 tokens
    assert paged_bytes_per_request(spec, 1000, element_bytes=2, block_size=16) == 63 * 16 * 131072


# -- weights ----------------------------------------------------------------------------------------------------------
def test_awq_matrix_bytes_hand_derived():
    # a [4096, 4096] AWQ GEMM linear: qweight int32 [4096, 512] = 8 MiB, qzeros int32 [32, 512] = 64 KiB,
    # scales fp16 [32, 4096] = 256 KiB (AutoAWQ WQLinear_GEMM, group 128)
    assert _matrix_bytes(4096, 4096, Weights.INT4_AWQ) == 8 * 2**20 + 64 * 1024 + 256 * 1024


def test_quantized_weights_shrink_in_order():
    spec = get_model("llama-3.1-8b")
    sizes = [weight_bytes(spec, Weights(w)) for w in ("bf16", "fp8", "int4-awq")]
    assert sizes[0] > sizes[1] > sizes[2]
    # bf16: every parameter 2 bytes (Llama-3.1-8B: 8,030,261,248 parameters, HF safetensors metadata)
    assert abs(sizes[0] - 2 * 8_030_261_248) < 2**20


# -- breakdown, engines -----------------------------------------------------------------------------------------------
def test_infer_returns_a_breakdown_with_the_inference_terms():
    b = vramcalc.infer("llama-3.1-8b", context=8192, concurrency=4, engine="hf", gpu="h100-sxm")
    assert list(b.terms()) == [t.value for t in InferenceTerm]
    assert sum(b.terms().values()) == b.total_bytes
    # the prefill of 4 prompts of context - 2 = 8190 tokens holds the peak (its MLP transients, 3 x [32760, 14336]
    # bf16 = 2.6 GiB, outweigh the decode step's); its DynamicCache then holds exactly 4 x 8190 tokens
    assert b.phase.value == "prefill"
    assert b.terms()["kv_cache"] == 4 * 8190 * 131072
    assert b.terms()["activations"] > 3 * 32760 * 14336 * 2


def test_training_breakdowns_keep_their_terms():
    assert "kv_cache" not in vramcalc.estimate("llama-3.1-8b").terms()


def test_vllm_fits_exactly_at_max_concurrency():
    options = dict(context=8192, gpu="l40s", engine="vllm")
    best = max_concurrency("llama-3.1-8b", **options)
    assert best > 0
    assert vramcalc.infer("llama-3.1-8b", concurrency=best, **options).fits()
    assert not vramcalc.infer("llama-3.1-8b", concurrency=best + 1, **options).fits()
    # vLLM's own answer from the pool: whole requests of 512 blocks of 16 tokens
    details = vramcalc.infer("llama-3.1-8b", concurrency=1, **options).details
    assert best == details["gpu_blocks"] // (8192 // 16)


def test_max_context_is_the_fit_boundary():
    best = max_context("llama-3.1-8b", concurrency=8, gpu="rtx-4090", engine="vllm", weights="int4-awq")
    assert vramcalc.infer("llama-3.1-8b", context=best, concurrency=8, gpu="rtx-4090", engine="vllm",
                          weights="int4-awq").fits()
    assert not vramcalc.infer("llama-3.1-8b", context=best + 16, concurrency=8, gpu="rtx-4090", engine="vllm",
                              weights="int4-awq").fits()


def test_sglang_pool_is_fraction_minus_weights():
    b = vramcalc.infer("llama-3.1-8b", context=4096, gpu="h100-sxm", engine="sglang", mem_fraction_static=0.8)
    gpu = get_gpu("h100-sxm")
    expected = int(0.8 * gpu.memory_bytes) - b.terms()["weights"] - b.terms()["runtime_overhead"]
    assert b.details["kv_pool_bytes"] == expected


def test_moe_decode_reads_only_routed_experts():
    b = vramcalc.infer("qwen3-30b-a3b", context=4096, concurrency=1, gpu="h100-sxm")
    dense = vramcalc.infer("qwen3-32b", context=4096, concurrency=1, gpu="h100-sxm")
    assert b.details["decode_tokens_per_s_per_sequence"] > 3 * dense.details["decode_tokens_per_s_per_sequence"]


def test_serve_plan_prices_per_million_tokens():
    plans = serve_plan("llama-3.1-70b", context=8192, concurrency=64, gpus_to_try=["h100-sxm", "a100-80gb"])
    assert plans and all(p.gpus >= 2 for p in plans)  # 141 GB of bf16 weights need two 80 GB GPUs
    assert all(p.usd_per_million_generated_tokens > 0 for p in plans)


def test_serve_plan_takes_the_tensor_parallel_degree_needing_fewest_gpus():
    # at tp 2 a Llama-3.1-70B replica on 80 GB GPUs keeps ~10 GiB a GPU for KV (5 sequences of 4096 tokens); at tp 4
    # the weights take half as much of each GPU: 32 sequences fit on one tp-4 replica (4 GPUs) instead of 7 tp-2 ones
    options = dict(context=4096, concurrency=32, gpus_to_try=["h100-sxm"])
    chosen = serve_plan("llama-3.1-70b", **options)[0]
    for tp in (2, 4, 8):
        alone = serve_plan("llama-3.1-70b", tps=(tp,), **options)[0]
        assert chosen.gpus <= alone.gpus
    assert chosen.tp == 4 and chosen.gpus == 4


def test_vllm_weights_include_the_rotary_table_as_vllm_logs_them():
    # vllm-project/vllm#10517: Llama-3.1-8B-Instruct, bf16: "Loading model weights took 14.9888 GB" (GiB: vLLM
    # divides by 2**30) = 8,030,261,248 parameters x 2 B + cos_sin_cache [131072, 128] bf16
    weights = vramcalc.infer("llama-3.1-8b", engine="vllm").terms()["weights"]
    assert round(weights / GIB, 4) == 14.9888
    assert weights == 2 * 8_030_261_248 + 131072 * 128 * 2


# -- hosted APIs ------------------------------------------------------------------------------------------------------
def test_hosted_prices_match_by_name_or_size_bracket():
    from vramcalc.serving.hosted import hosted_prices_for

    # llama-3.1-8b: the providers that list it by name, and Fireworks' "up to 16B" serverless bracket
    eight = {(p.provider, p.offering) for p in hosted_prices_for(get_model("llama-3.1-8b"))}
    assert ("fireworks", "Serverless, base models up to 16B") in eight and ("amazon-bedrock", "meta.llama3-1-8b-instruct-v1:0") in eight
    assert not any("16.1B" in offering for _, offering in eight)
    # a 30.5B-total MoE takes the MoE 0-56B bracket, never a dense one
    moe = [p.offering for p in hosted_prices_for(get_model("qwen3-30b-a3b"))]
    assert moe == ["Serverless, MoE 0B - 56B (Mixtral 8x7B)"]
    # a 405B dense model has no published bracket here: nothing is made up
    assert hosted_prices_for(get_model("llama-3.1-405b")) == []


def test_infer_sets_hosted_prices_beside_self_hosted_cost():
    d = vramcalc.infer("llama-3.1-70b", context=4096, concurrency=8, gpu="h200").details
    assert d["usd_per_million_generated_tokens"] > 0
    hosted = d["hosted_api_prices"]
    assert hosted and all(p["source"] for p in hosted)
    assert [p["usd_per_million_output_tokens"] for p in hosted] == sorted(p["usd_per_million_output_tokens"] for p in hosted)


# -- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, words", [
    (dict(context=0), "context"),
    (dict(concurrency=-1), "concurrency"),
    (dict(engine="tgi"), "hf, vllm, sglang"),
    (dict(weights="int3"), "int4-awq"),
    (dict(engine="hf", tp=2), "tp"),
    (dict(engine="hf", kv_dtype="fp8"), "fp8"),
    (dict(engine="vllm", trace=True), "--engine hf"),
    (dict(tp=3), "tp 3"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(trace=True, lora_rank=16), "--lora-rank"),
])
def test_bad_input_is_one_clear_error(options, words):
    with pytest.raises(VramcalcError) as info:
        vramcalc.infer("llama-3.1-8b", **options)
    assert words in str(info.value)


def test_gpt_oss_caches_a_window_on_its_sliding_layers_only(tmp_path):
    # openai/gpt-oss-20b config.json: 24 layers, layer_types alternate from "sliding_attention" (layer 0),
    # sliding_window 128, 8 KV heads of 64 (configuration_gpt_oss.py L56-59, L84-87)
    import json

    from vramcalc.hf_config import load_config

    config = {"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24,
              "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32,
              "num_experts_per_tok": 4, "vocab_size": 201088, "sliding_window": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = load_config(tmp_path)
    assert [layer_is_sliding(spec, i) for i in range(4)] == [True, False, True, False]
    per_token_layer = 2 * 8 * 64 * 2  # keys and values, bf16
    expected = 12 * 10_000 * per_token_layer + 12 * 128 * per_token_layer
    assert hf_cache_bytes(spec, 1, 10_000, last_input=1) == expected


def _measured_memory_gb_s(gpu: str) -> float:
    """data/achievable_rates.csv's memory row for ``gpu``, read here with the csv module (not through step_time)."""
    import csv
    from pathlib import Path

    path = Path(vramcalc.__file__).resolve().parent.parent / "data" / "achievable_rates.csv"
    with path.open() as handle:
        return next(float(row["gb_s"]) for row in csv.DictReader(handle)
                    if row["gpu"] == gpu and row["kind"] == "memory")


@pytest.mark.parametrize("gpu", ["h100-sxm", "mi300x", "rtx-4090"])
def test_decode_streams_weights_and_cache_at_the_measured_bandwidth(gpu):
    """Llama 3.1 8B bf16, one sequence at 4096 tokens, is memory-bound: each step reads the weights (8,030,261,248
    params x 2 bytes, config.json) and the cache (32 layers x K,V x 8 KV heads x 128 x 2 bytes x 4096 tokens) at the
    GPU's achievable bandwidth, the same row the training step-time model uses (H100 SXM 2970 GB/s measured, 88.7% of
    its datasheet; MI300X 4090, 77.2%; RTX 4090 921.9, 91.5%: no one factor of the datasheet)."""
    b = vramcalc.infer("llama-3.1-8b", context=4096, concurrency=1, gpu=gpu)
    read_bytes = 8_030_261_248 * 2 + 32 * 2 * 8 * 128 * 2 * 4096
    expected = _measured_memory_gb_s(gpu) * 1e9 / read_bytes
    assert b.details["decode_tokens_per_s_per_sequence"] == pytest.approx(expected, rel=0.005)
    assert b.details["decode_tokens_per_s_per_sequence"] != pytest.approx(
        0.8 * get_gpu(gpu).bandwidth_gb_s * 1e9 / read_bytes, rel=0.02)  # the old assumed 80% of the datasheet
