"""vramcalc's parameter inventory agrees tensor for tensor with the real transformers model built from the config."""

import pytest

from vramcalc import catalogue
from vramcalc.model import ParamKind

from .conftest import has_torch

pytestmark = [pytest.mark.skipif(not has_torch(), reason="needs the trace extra"), pytest.mark.trace]

# one model per family and size class keeps this fast; test_catalogue covers every row's count
MODELS = ["llama-3.1-8b", "qwen2.5-7b", "qwen3-8b", "qwen3-30b-a3b", "gemma-2-9b", "phi-3-mini", "mixtral-8x7b",
          "mistral-7b", "deepseek-v3", "smollm2-135m",
          # issue 13 rows, one per family and layout: tied llama, qwen2 tied/untied, qwen3 tied, phi3 tied, gpt_neox, falcon
          "llama-3.2-1b", "qwen2.5-0.5b", "deepseek-r1-distill-qwen-1.5b", "qwen3-0.6b", "phi-4-mini", "pythia-70m",
          "falcon-7b",
          # issue 13 item 6: gpt_oss (bf16, as trained), the Gemma 3 language models, granite, olmo2, llama4_text
          "gpt-oss-20b", "gpt-oss-120b", "gemma-3-4b", "gemma-3-27b", "granite-3.3-8b", "granite-3.3-2b",
          "olmo-2-1124-7b", "olmo-2-1124-13b", "llama-4-scout"]


def _meta_model(spec):
    import torch
    from transformers import AutoModelForCausalLM

    from vramcalc.tracing.build import hf_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config(spec))


@pytest.mark.parametrize("name", MODELS)
def test_inventory_count_equals_the_transformers_model(name):
    spec = catalogue.get_model(name)
    model = _meta_model(spec)
    params = {id(p): p.numel() for p in model.parameters()}  # tied weights counted once
    router_buffers = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert sum(params.values()) + router_buffers == spec.params


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3"])
def test_v5_experts_are_3d_parameters_not_linear_modules(name):
    import torch

    spec = catalogue.get_model(name)
    model = _meta_model(spec)
    experts = [p for n, p in model.named_parameters() if ".experts." in n and "shared" not in n]
    assert experts and all(p.dim() == 3 for p in experts)
    linear_numel = sum(m.weight.numel() for m in model.modules() if type(m) is torch.nn.Linear) - spec.vocab_size * spec.hidden_size
    assert linear_numel == sum(t.total_numel for t in spec.inventory.tensors if t.kind is ParamKind.LINEAR and t.name.endswith("weight"))


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b", "gemma-3-4b", "gemma-3-27b", "granite-3.3-8b",
                                  "granite-3.3-2b", "olmo-2-1124-7b", "olmo-2-1124-13b", "llama-4-scout"])
def test_params_exact_is_what_transformers_builds_from_the_published_config(name):
    # independent of vramcalc's own config writer (tracing.build.hf_config): the published config itself, its
    # text_config for the multimodal Gemma 3; gpt-oss without its MXFP4 quantization_config, as training loads it
    # (dequantized to bf16, hf_config.MXFP4_NOTE)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .test_catalogue import PUBLISHED_CONFIGS

    published = PUBLISHED_CONFIGS[name]
    fields = {k: v for k, v in published.get("text_config", published).items() if k != "quantization_config"}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum({id(p): p.numel() for p in model.parameters()}.values()) == catalogue.get_model(name).params_exact
