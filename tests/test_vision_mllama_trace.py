"""Llama-3.2-Vision (``mllama``): the estimate against the trace of the real ``MllamaForConditionalGeneration`` on
fake tensors (``vramcalc/tracing/vision_mllama.py``), within 3% of the peak tensor bytes, across frozen/LoRA/full
towers, full and LoRA language models, with and without checkpointing. Slow: 10-50 s per setup on one core."""

import pytest

import vramcalc
from vramcalc.hf_config import spec_from_config
from tests.tiny_mllama import TINY_MLLAMA

pytest.importorskip("transformers")
pytest.importorskip("peft")

TOLERANCE = 0.03
_BATCH = dict(images=2, seq_len=256, batch_size=2)

SETUPS = [
    dict(_BATCH),  # full: tower, projector and cross-attention layers train
    dict(_BATCH, vision="frozen"),  # the cross-attention layers still save (and keep X for k_proj/v_proj)
    dict(_BATCH, method="lora"),  # q_proj, v_proj adapt the tower's and the cross-attention layers' too
    dict(_BATCH, method="lora", lora_targets="all-linear"),  # the projector too
    dict(_BATCH, method="lora", vision="frozen", lora_targets="all-linear"),
    dict(_BATCH, grad_ckpt=True),
    dict(_BATCH, method="lora", grad_ckpt=True),
    dict(_BATCH, method="lora", vision="frozen", grad_ckpt=True),  # the frozen tower saves (input grads)
]


@pytest.mark.parametrize("options", SETUPS, ids=[f"{o.get('method', 'full')}-{o.get('vision', 'default')}-"
                                                 f"{o.get('lora_targets', 'qv')}-{'ckpt' if o.get('grad_ckpt') else ''}"
                                                 for o in SETUPS])
def test_mllama_estimate_is_within_3_percent_of_the_trace(options):
    from vramcalc.tracing.runner import trace

    spec = spec_from_config(TINY_MLLAMA, name="tiny-mllama")
    estimated = vramcalc.estimate(spec, **options)
    traced = trace(spec, progress=False, **options)
    error = estimated.peak_tensor_bytes / traced.peak_tensor_bytes - 1
    assert abs(error) <= TOLERANCE, (estimated.terms(), traced.terms())
    assert traced.terms()["weights"] == pytest.approx(estimated.terms()["weights"], rel=0.001)
