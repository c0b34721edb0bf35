"""``--quantize-experts``: transformers 4.x built each expert's projections as ``nn.Linear`` modules (modeling_mixtral.py
``MixtralBlockSparseTop2MLP``: w1, w2, w3 in a ``ModuleList``), which bitsandbytes quantizes; transformers 5 fuses
them into 3-D parameters that stay 16-bit (terms/parameters.py)."""

import pytest

import vramcalc as vc
from vramcalc.errors import VramcalcError

MIXTRAL = dict(L=32, E=8, I=14336, h=4096)  # mistralai/Mixtral-8x7B config.json (data/models.csv)


def test_quantized_experts_store_half_a_byte_per_weight_plus_the_block_absmax():
    # 3 projections of [I, h] per expert: 32·8·3·14336·4096 = 45,097,156,608 weights; double quantization keeps one
    # uint8 absmax per 64 weights (plus fp32 absmax per 256 blocks): 0.5 + 1/64 bytes per weight, against 2 in bf16
    n = MIXTRAL["L"] * MIXTRAL["E"] * 3 * MIXTRAL["I"] * MIXTRAL["h"]
    options = dict(method="qlora", seq_len=512, double_quant=True)
    fused = vc.estimate("mixtral-8x7b", **options).terms()["weights"]
    per_expert = vc.estimate("mixtral-8x7b", quantize_experts=True, **options).terms()["weights"]
    assert abs((fused - per_expert) / (n * (2 - 0.5 - 1 / 64)) - 1) < 0.005


def test_a_published_transformers_4_mixtral_qlora_peak_is_matched():
    # foundation-model-stack/fms-acceleration scripts/benchmarks/refs/a100_80gb.csv @24bdadb line 62 (transformers
    # 4.48.1, TRL 0.13 with prepare_model_for_kbit_training): Mixtral-8x7B QLoRA on q/k/v/o, r 16, batch 4 x 4096
    # packed, checkpointing, one A100-80GB: max_memory_allocated 42,794,268,160 bytes
    measured = 42_794_268_160
    result = vc.estimate("mixtral-8x7b", method="qlora", quantize_experts=True, batch_size=4, seq_len=4096,
                         grad_ckpt=True, attn="flash", lora_rank=16, lora_targets="q_proj,k_proj,v_proj,o_proj",
                         lora_dropout=0.1, double_quant=True, precision="mixed-bf16", kbit_prep=True,
                         adapter_dtype="bf16", loss="hf-shifted")
    assert abs(result.peak_tensor_bytes / measured - 1) < 0.10


@pytest.mark.parametrize("options, words", [
    (dict(model="llama-3.1-8b"), "needs a mixture-of-experts model"),
    (dict(quant="int8"), "bitsandbytes 4-bit base"),
    (dict(lora_targets="q_proj,w1,w3"), "leave the expert projections out"),
])
def test_what_quantize_experts_does_not_model_is_refused(options, words):
    model = options.pop("model", "mixtral-8x7b")
    with pytest.raises(VramcalcError, match=words):
        vc.estimate(model, method="qlora", quantize_experts=True, **options)
