"""``--grads-kept``: the loop zeroes the gradients in place between steps (``zero_grad(set_to_none=False)``, torch's
default before 2.0, which transformers' Trainer called as ``model.zero_grad()``), so every forward and backward runs
beside all the gradients. The estimate against the trace, whose step then zeroes in place, and the refusals."""

import pytest

import vramcalc as vc
from vramcalc.errors import VramcalcError

from .cli_helpers import run_cli
from .conftest import needs_torch
from .tiny_models import TINY
from .trace_helpers import peak_error


def test_kept_gradients_never_lower_the_peak_and_are_whole_at_every_moment():
    options = dict(seq_len=512, precision="fp32")
    plain = vc.estimate("llama-3.2-1b", **options)
    kept = vc.estimate("llama-3.2-1b", grads_kept=True, **options)
    assert kept.peak_tensor_bytes >= plain.peak_tensor_bytes
    # all fp32 gradients (one 512-byte block each at most above numel x 4) at the peak, whichever moment it is
    assert kept.terms()["gradients"] >= kept.details["trainable_params"] * 4


@pytest.mark.parametrize("options", [dict(num_gpus=2, sharding="ddp"), dict(stack="torchtune"),
                                     dict(optimizer_in_backward=True)])
def test_kept_gradients_are_modelled_for_the_trainer_step_on_one_gpu(options):
    with pytest.raises(VramcalcError, match="--grads-kept"):
        vc.estimate("llama-3.2-1b", grads_kept=True, **options)


def test_the_cli_takes_the_flag(capsys):
    code, out, err = run_cli(capsys, "estimate", "llama-3.2-1b", "--grads-kept", "--format", "json")
    assert code == 0, err
    assert '"grads_kept": true' in out


@needs_torch
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("options", [dict(precision="bf16"), dict(precision="mixed-bf16"),
                                     dict(method="lora", precision="bf16"), dict(precision="fp32", grad_ckpt=True)])
def test_estimate_matches_the_trace_that_zeroes_in_place(family, options):
    assert abs(peak_error(TINY[family], seq_len=256, grads_kept=True, **options)) < 0.005
