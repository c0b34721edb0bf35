"""Gemma-2 on SDPA: transformers 4.42 to 5.20 ran it (``_supports_sdpa = True`` in those wheels' modeling_gemma2.py,
the attention softcap dropped on that path; 4.48-5.20 by default), 5.21 set ``_supports_sdpa = False`` and 5.25
refuses an explicit ``attn_implementation="sdpa"``. So an explicit ``--attn sdpa`` means an earlier release and is
honoured; without ``--attn`` the estimate follows 5.25's eager fallback. Checked against the trace, which builds
5.25's model with the flag restored (the two releases' modeling files differ only there)."""

import pytest

from vramcalc.options import Attention
from vramcalc.terms.activations import layer_masks
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch
from .tiny_models import TINY

GEMMA2 = TINY["gemma2"]  # sliding window 64, two layers: layer 0 slides, layer 1 attends fully


def test_an_explicit_sdpa_on_gemma2_runs_sdpa_as_transformers_before_5_21_did():
    resolved = resolve_setup(GEMMA2, attn="sdpa")
    assert resolved.attn_used is Attention.SDPA
    assert any("before 5.21" in warning for warning in resolved.warnings)


def test_gemma2_without_an_attention_choice_falls_back_to_eager_as_transformers_5_25_does():
    resolved = resolve_setup(GEMMA2)
    assert resolved.attn_used is Attention.EAGER
    assert any("give --attn sdpa explicitly" in warning for warning in resolved.warnings)


def test_litgpt_gemma2_keeps_its_own_softcapped_eager_attention_whatever_attn_says():
    resolved = resolve_setup(GEMMA2, stack="litgpt", method="lora", attn="sdpa")
    assert resolved.attn_used is Attention.EAGER


def test_past_the_window_only_gemma2s_sliding_layers_get_the_sdpa_mask():
    assert layer_masks(GEMMA2, True) == (True, False)
    assert layer_masks(GEMMA2, False) == (False, False)


SETUPS = [dict(seq_len=256), dict(seq_len=256, method="lora"), dict(seq_len=256, batch_size=2, grad_ckpt="full"),
          dict(seq_len=1024, method="qlora"), dict(seq_len=512, method="lora", grad_ckpt="full"),
          dict(seq_len=48, method="lora")]


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("options", SETUPS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_gemma2_on_sdpa_is_within_half_a_percent_of_the_trace(options):
    from .trace_helpers import peak_error

    assert abs(peak_error(GEMMA2, attn="sdpa", **options)) < 0.005
