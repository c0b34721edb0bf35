"""Vision-language models: the estimate against the trace of the real transformers model on fake tensors
(``vramcalc/tracing/vision.py``), within 3% of the peak tensor bytes, across two families and frozen/lora/full.

Slow (a tiny VLM trace takes 10-30 s on one shared core): the setups are the CI-sized models of ``tiny_vlms.py``.
"""

import pytest

import vramcalc
from vramcalc.hf_config import spec_from_config
from tests.tiny_vlms import TINY_VLM

pytest.importorskip("transformers")
pytest.importorskip("peft")

TOLERANCE = 0.03

SETUPS = [
    ("smolvlm", dict(images=2, seq_len=128)),  # full: the tower trains
    ("smolvlm", dict(images=2, seq_len=128, method="lora")),  # q_proj, v_proj match the tower's too
    ("smolvlm", dict(images=2, seq_len=128, method="lora", vision="frozen")),
    ("idefics3", dict(images=1, image_size=100, seq_len=128, method="lora", lora_targets="all-linear")),  # 5 tiles
    ("gemma3", dict(images=2, seq_len=128)),
    ("gemma3", dict(images=2, seq_len=128, method="lora")),
    ("gemma3", dict(images=2, seq_len=128, method="lora", vision="frozen")),
    # the tower checkpointed with the language model, LoRA dropout's masks
    ("gemma3", dict(images=2, seq_len=128, method="lora", lora_targets="all-linear", lora_dropout=0.1,
                    grad_ckpt=True)),
]


@pytest.mark.parametrize("name, options", SETUPS, ids=[f"{n}-{o.get('method', 'full')}-{o.get('vision', '')}"
                                                         for n, o in SETUPS])
def test_vlm_estimate_is_within_3_percent_of_the_trace(name, options):
    from vramcalc.tracing.runner import trace

    spec = spec_from_config(TINY_VLM[name], name=f"tiny-{name}")
    estimated = vramcalc.estimate(spec, **options)
    traced = trace(spec, progress=False, **options)
    error = estimated.peak_tensor_bytes / traced.peak_tensor_bytes - 1
    assert abs(error) <= TOLERANCE, (estimated.terms(), traced.terms())
    assert traced.terms()["weights"] == pytest.approx(estimated.terms()["weights"], rel=0.01)
