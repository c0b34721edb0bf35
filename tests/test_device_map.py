"""``--device-map auto``: accelerate's placement as transformers computes it, per-GPU peaks against a per-GPU trace,
the pipeline's time and the refused combinations (issue 14 item 2)."""

import dataclasses
import logging

import pytest

import vramcalc
from tests.tiny_models import TINY
from vramcalc.catalogue import get_model
from vramcalc.errors import VramcalcError
from vramcalc.options import Precision, Quant
from vramcalc.terms.device_map import placement
from vramcalc.training_setup import resolve_setup

PLACEMENT_MODELS = ["llama-3.1-8b", "qwen2.5-0.5b", "gemma-2-9b", "qwen3-30b-a3b", "phi-3-mini", "llama-3.2-1b"]


def _real_device_map(spec, num_gpus, quantized=False):
    """transformers 5.25.0 ``integrations/accelerate.py::_get_device_map(model, "auto", ...)`` on a meta model, with
    budgets far above the model so that the balanced rule alone decides (as vramcalc's estimate assumes)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM
    from transformers.integrations.accelerate import _get_device_map

    from vramcalc.tracing.build import hf_config

    logging.disable(logging.WARNING)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch.bfloat16)
        quantizer = None
        if quantized:  # as from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True)) prepares it
            pytest.importorskip("bitsandbytes")
            from transformers import BitsAndBytesConfig
            from transformers.quantizers import AutoHfQuantizer

            quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(load_in_4bit=True), pre_quantized=False)
            quantizer.preprocess_model(model, dtype=torch.bfloat16, device_map="auto")
            quantizer.validate_environment = lambda *args, **kwargs: None  # it asks for a CUDA device
        device_map = _get_device_map(model, "auto", {i: 10**15 for i in range(num_gpus)}, quantizer)
    finally:
        logging.disable(logging.NOTSET)

    def device(name):
        while name not in device_map:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return device_map[name]

    return (device("model.embed_tokens"), tuple(device(f"model.layers.{i}") for i in range(spec.num_layers)),
            device("model.norm"), device("model.rotary_emb"), device("lm_head"))


@pytest.mark.parametrize("num_gpus", [2, 4, 8])
@pytest.mark.parametrize("name", PLACEMENT_MODELS + ["tiny-llama", "tiny-gemma2", "tiny-mixtral"])
def test_placement_is_transformers_device_map_auto(name, num_gpus):
    spec = get_model(name) if not name.startswith("tiny-") else dataclasses.replace(
        TINY[name.removeprefix("tiny-")], num_layers=12)
    where = placement(spec, Precision.BF16, None, num_gpus)
    assert (where.embed, where.layers, where.norm, where.rotary, where.head) == _real_device_map(spec, num_gpus)


@pytest.mark.parametrize("num_gpus", [2, 4, 8])
@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-7b", "llama-3.2-1b"])
def test_qlora_placement_is_transformers_device_map_auto(name, num_gpus):
    """4-bit Linears count 0.5 byte per element and every budget shrinks to 90 % (the bnb quantizer's)."""
    spec = get_model(name)
    where = placement(spec, Precision.BF16, Quant.NF4, num_gpus)
    assert (where.embed, where.layers, where.norm, where.rotary, where.head) == _real_device_map(spec, num_gpus, True)


def test_tied_lm_head_goes_to_gpu_0_with_the_embedding():
    """qwen2.5-0.5b ties lm_head to embed_tokens: accelerate places the tied module with the embedding."""
    where = placement(get_model("qwen2.5-0.5b"), Precision.BF16, None, 4)
    assert where.head == where.embed == 0 and where.norm != 0


def test_gpu_0_gets_fewer_layers_than_the_middle_ones():
    """GPU 0's budget keeps room for the largest module still to place (``infer_auto_device_map``'s main device)."""
    where = placement(get_model("llama-3.1-8b"), Precision.BF16, None, 4)
    assert len(where.layers_on(0)) < len(where.layers_on(1))


# (family, layers, options): tiny models, seq_len 256
TRACED = [
    ("llama", 6, dict(method="full", num_gpus=2)),
    ("llama", 6, dict(method="lora", num_gpus=3)),
    ("llama", 6, dict(method="lora", num_gpus=2, grad_ckpt=True)),
    ("qwen2", 6, dict(method="full", num_gpus=2, grad_ckpt=True)),
    ("mistral", 8, dict(method="lora", num_gpus=4, batch_size=2)),
    ("gemma2", 6, dict(method="lora", num_gpus=2)),
    ("qwen3", 6, dict(method="qlora", num_gpus=2)),
]


@pytest.mark.parametrize("family,layers,options", TRACED)
def test_every_gpu_peak_within_5_percent_of_its_trace(family, layers, options):
    pytest.importorskip("transformers")
    from vramcalc.device_map_step import gpu_peaks
    from vramcalc.tracing.device_map import trace_device_map

    spec = dataclasses.replace(TINY[family], num_layers=layers)
    resolved = resolve_setup(spec, seq_len=256, device_map="auto", **options)
    traced = trace_device_map(spec, resolved)
    for peak in gpu_peaks(spec, resolved):
        assert abs(peak.tensor_bytes - traced[peak.gpu]) <= 0.05 * traced[peak.gpu], (peak.gpu, peak, traced)


def test_splitting_lowers_the_peak_and_json_lists_every_gpu():
    one = vramcalc.estimate("llama-3.1-8b", method="lora", seq_len=2048)
    split = vramcalc.estimate("llama-3.1-8b", method="lora", seq_len=2048, num_gpus=4, device_map="auto")
    gpus = split.details["device_map_gpus"]
    assert len(gpus) == 4 and split.peak_tensor_bytes == max(g["peak_tensor_bytes"] for g in gpus)
    assert split.peak_tensor_bytes < one.peak_tensor_bytes


def test_pipeline_is_no_faster_than_one_gpu():
    """Only one GPU computes at a time: the step is the single-GPU step plus the boundary copies."""
    one = vramcalc.estimate("llama-3.1-8b", method="lora", gpu="a100-80gb")
    split = vramcalc.estimate("llama-3.1-8b", method="lora", gpu="a100-80gb", num_gpus=4, device_map="auto")
    assert split.details["step_seconds"] > one.details["step_seconds"]


@pytest.mark.parametrize("options,words", [
    (dict(num_gpus=1), "num-gpus of 2"),
    (dict(num_gpus=2, sharding="fsdp"), "--sharding fsdp"),
    (dict(num_gpus=2, task="dpo"), "--task sft only"),
    (dict(num_gpus=2, method="dora"), "full, lora and qlora"),
])
def test_bad_combinations_are_one_error_line(options, words):
    with pytest.raises(VramcalcError) as err:
        vramcalc.estimate("llama-3.1-8b", device_map="auto", **options)
    assert words in str(err.value) and "\n" not in str(err.value)
