"""Qwen2.5-VL: the estimate against the trace of the real ``Qwen2_5_VLForConditionalGeneration`` on fake tensors
(``vramcalc/tracing/vision_qwen.py``), within 3% of the peak tensor bytes: the tower full, LoRA-adapted and frozen,
windowed and full-attention blocks, one and two images, with and without gradient checkpointing.

Slow (a tiny Qwen2.5-VL trace takes 10-50 s on one shared core): the model is ``tiny_vlms.py``'s ``qwen2_5_vl``.
"""

import pytest

import vramcalc
from vramcalc.hf_config import spec_from_config
from tests.tiny_vlms import TINY_VLM

pytest.importorskip("transformers")
pytest.importorskip("peft")

TOLERANCE = 0.03

SETUPS = [
    dict(images=2, image_size=168, seq_len=128),  # full: the tower and merger train; 2 images of 12 x 12 patches
    dict(images=1, image_size=224, seq_len=128, grad_ckpt=True),  # every vision block checkpointed
    dict(images=1, image_size=224, seq_len=128, vision="frozen"),
    dict(images=1, image_size=224, seq_len=128, method="lora", lora_targets="all-linear"),  # qkv, proj, MLP, merger
    dict(images=1, image_size=224, seq_len=128, method="lora", lora_targets="all-linear", grad_ckpt=True),
    dict(images=2, image_size=224, seq_len=160, method="lora", vision="frozen"),
    dict(images=1, image_tokens=48, seq_len=128, method="lora"),  # q_proj/v_proj: the tower stays frozen
]


@pytest.mark.parametrize("options", SETUPS, ids=[f"{o.get('method', 'full')}-{o.get('vision', '')}-"
                                                 f"{o.get('lora_targets', '')}-{'ckpt' if o.get('grad_ckpt') else ''}"
                                                 f"-{o['images']}" for o in SETUPS])
def test_qwen2_5_vl_estimate_is_within_3_percent_of_the_trace(options):
    from vramcalc.tracing.runner import trace

    spec = spec_from_config(TINY_VLM["qwen2_5_vl"], name="tiny-qwen2_5_vl")
    estimated = vramcalc.estimate(spec, **options)
    traced = trace(spec, progress=False, **options)
    error = estimated.peak_tensor_bytes / traced.peak_tensor_bytes - 1
    assert abs(error) <= TOLERANCE, (estimated.terms(), traced.terms())
    assert traced.terms()["weights"] == pytest.approx(estimated.terms()["weights"], rel=0.01)
