"""The serving trace: transformers' own generate with its own cache classes, on fake tensors, under the tracker.

Claims: (1) the estimate's KV-cache bytes equal the bytes of every cache layer's key and value storages after every
forward, for every family the trace builds (GQA, MHA, MQA, MLA latent, Gemma-2 alternating sliding windows,
all-sliding Mistral/Phi-3 windows, fused qkv, partial rotary), DynamicCache and StaticCache; (2) the estimate's
prefill and decode peaks agree with the trace's within 1% on the tiny architectures (where activations weigh far more
than at full size), and the decode step's transients alone within 1% too; (3) ``infer(trace=True)``.
Falcon is left out: its attention changes in transformers 5.25 (tests/test_families_devset.py covers its training).
Gemma-3 and gpt-oss interleave sliding and full layers by their ``layer_types`` (LFM2's convolution states are in
tests/test_hybrid_lfm2.py).
"""

import dataclasses

import pytest

from .conftest import needs_torch
from .test_families_2026 import TINY as NEW
from .test_families_devset import TINY as DEV
from .test_families_moe_2026 import TINY as MOE
from .tiny_models import TINY

pytestmark = [needs_torch, pytest.mark.trace]

SLIDING = {
    # all layers slide (MistralConfig / Phi3Config with sliding_window set); windows smaller than the prompts
    "mistral-window": dataclasses.replace(TINY["mistral"], name="tiny-mistral-window", sliding_window=40),
    "phi3-window": dataclasses.replace(TINY["phi3"], name="tiny-phi3-window", sliding_window=48),
    # layer_types (sliding, full): each layer's cache class follows its type
    "gemma3-window": dataclasses.replace(NEW["gemma3_text"], name="tiny-gemma3-window", sliding_window=40),
    "gpt-oss-window": dataclasses.replace(MOE["gpt_oss"], name="tiny-gpt-oss-window", sliding_window=40),
}
DEVSET = {name: DEV[name] for name in ("gemma", "phi", "gpt_neox")}  # MQA GeGLU; partial rotary; fused qkv
SPECS = {**TINY, **SLIDING, **DEVSET}


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_kv_cache_bytes_equal_the_traced_cache_tensors(name, cache):
    from vramcalc.serving.kv_cache import hf_cache_bytes
    from vramcalc.serving.terms import HfCache
    from vramcalc.serving.trace import run_inference_trace

    spec = SPECS[name]
    batch, prompt, new = 3, 70, 4  # the prompt outgrows gemma2's 64-token window and the variants' windows
    result = run_inference_trace(spec, batch_size=batch, prompt_len=prompt, new_tokens=new, cache=HfCache(cache))
    static = prompt + new - 1 if cache == "static" else None  # generate: max_cache_length = max_length - 1
    expected = tuple(hf_cache_bytes(spec, batch, prompt + i, last_input=prompt if i == 0 else 1, static_len=static)
                     for i in range(new))
    assert result.cache_bytes_by_step == expected
    assert result.cache_bytes_final == expected[-1]


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3_moe", "gemma2", "deepseek_v3", "phi3", "mixtral",
                                  "mistral-window", "phi3-window", "gemma", "phi", "gpt_neox"])
def test_estimate_matches_trace_for_prefill_and_decode(name):
    from vramcalc.serving.hf_engine import decode_moment, prefill_moment
    from vramcalc.serving.terms import InferencePhase, InferenceTerm
    from vramcalc.serving.trace import run_inference_trace

    spec = SPECS[name]
    batch, prompt, new = 4, 300, 3
    result = run_inference_trace(spec, batch_size=batch, prompt_len=prompt, new_tokens=new)
    weights = result.phase_terms[InferencePhase.PREFILL]["weights"]
    for phase, moment in ((InferencePhase.PREFILL, prefill_moment(spec, batch, prompt)),
                          (InferencePhase.DECODE, decode_moment(spec, batch, prompt + new, prompt=prompt))):
        traced = sum(result.phase_terms[phase].values())
        assert abs(weights + moment.total - traced) <= 0.01 * traced, (phase, weights + moment.total, traced)
    # the decode step's own transients (KiB beside the cache): the fused qkv storage, phi's held q/k projections and
    # the roped tensors at the cache update are each modelled, so these agree too
    decode = result.phase_terms[InferencePhase.DECODE]
    traced_act = decode[InferenceTerm.ACTIVATIONS] + decode[InferenceTerm.LOGITS]
    moment = decode_moment(spec, batch, prompt + new, prompt=prompt)
    assert abs(moment.activations + moment.logits - traced_act) <= 0.01 * traced_act, (moment, traced_act)


def test_infer_with_trace_returns_the_traced_terms():
    import vramcalc

    spec = TINY["qwen3"]
    traced = vramcalc.infer(spec, context=130, concurrency=2, trace=True)
    estimated = vramcalc.infer(spec, context=130, concurrency=2, engine="hf")
    assert traced.source == "trace" and traced.inputs["engine"] == "hf"
    assert traced.terms()["kv_cache"] > 0
    assert abs(traced.peak_tensor_bytes - estimated.peak_tensor_bytes) <= 0.01 * traced.peak_tensor_bytes


def test_trace_refuses_quantized_weights():
    from vramcalc.errors import VramcalcError
    import vramcalc

    with pytest.raises(VramcalcError, match="16-bit"):
        vramcalc.infer(TINY["llama"], context=64, trace=True, weights="int4-awq")
