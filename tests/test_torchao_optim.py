"""torchao's low-bit AdamW (``--optimizer adamw-8bit-torchao | adamw-4bit-torchao | adamw-fp8-torchao``).

The claims: the state bytes are those torchao's own classes allocate (``_new_buffer`` on real CPU tensors); the
step's scratch rule (``facts.torchao_step_buffers``) reproduces the peak of every inductor plan
``benchmarks/torchao_step_plan.py`` read from the real compiled step (``benchmarks/torchao_step_plan.csv``, torch 2.13
+ triton 3.9, Triton scheduler); the estimate agrees with the trace of the real optimizer classes on the HF and
torchtune stacks, with the optimizer at the end of the step and in backward.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

import vramcalc as vc
from vramcalc.errors import VramcalcError
from vramcalc.facts import torchao_step_buffers
from vramcalc.model import ModelSpec
from vramcalc.options import Optimizer
from vramcalc.terms.optimizer import optimizer_state_bytes, optimizer_step_temporary_bytes, torchao_quantized
from vramcalc.terms.stored_tensor import StoredTensor

from .conftest import needs_torch
from .tiny_models import TINY

PLAN_CSV = Path(__file__).resolve().parent.parent / "benchmarks" / "torchao_step_plan.csv"
KINDS = {"adamw-8bit-torchao": "8bit", "adamw-4bit-torchao": "4bit", "adamw-fp8-torchao": "fp8"}
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
GIB = 2**30


def _plan_rows():
    with PLAN_CSV.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("row", _plan_rows(), ids=lambda r: f"{r['optimizer']}-{r['shape']}-{r['param_dtype']}")
def test_the_scratch_rule_is_the_peak_of_inductors_plan_of_the_real_step(row):
    shape = tuple(int(x) for x in row["shape"].split("x"))
    block = int(row["block_size"])
    tensor = StoredTensor("w", "linear", shape, 1, 16, True)
    assert torchao_quantized(tensor, block) == (row["quantized_states"] == "True")
    assert sum(torchao_step_buffers(KINDS[row["optimizer"]], shape, block)) == int(row["peak_scratch_bytes"])
    # every buffer the rule names is one the plan allocates (the 4-bit plan's unpacked halves die before its peak)
    planned = json.loads(row["buffers_bytes"])
    for nbytes in torchao_step_buffers(KINDS[row["optimizer"]], shape, block):
        assert nbytes in planned


def test_4bit_scratch_of_a_llama_2_7b_lm_head_is_26_bytes_per_element_and_two_scales():
    """lm_head [32000, 4096], block 128: the re-stacked codes (2 x n uint8), the scaled input (2 x 4n fp32) and the
    binary-search codes (2 x 8n int64) and two fp32 scales of n/128 (benchmarks/torchao_step_plan.csv, 3416064000)."""
    n = 32000 * 4096
    assert sum(torchao_step_buffers("4bit", (32000, 4096), 128)) == 26 * n + 2 * 4 * n // 128 == 3_416_064_000


@needs_torch
@needs_torchao
@pytest.mark.parametrize("optimizer", sorted(KINDS))
@pytest.mark.parametrize("trainer_built", [True, False])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_state_bytes_are_what_torchaos_own_buffers_allocate(optimizer, trainer_built, dtype_name):
    """Each shape through torchao's ``_new_buffer`` on real CPU tensors: the storages of codes, scale and qmap (or
    the plain ``zeros_like``), each rounded to 512 B as CUDA's allocator does, against ``optimizer_state_bytes``."""
    import torch

    from vramcalc.tracing.tracker import storages_of
    from vramcalc.tracing.torchao_optim import _classes
    from vramcalc.terms.optimizer import torchao_block_size

    shapes = [(4096,), (256,), (4100,), (512, 128), (1000, 4096), (384, 96), (8, 64, 256)]
    dtype = getattr(torch, dtype_name)
    block = torchao_block_size(Optimizer(optimizer), trainer_built)
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in shapes]
    instance = _classes()[Optimizer(optimizer)](params, lr=1e-3, block_size=block)
    torchao_bytes = 0
    for p in params:
        for signed in (True, False):
            buffer = instance._new_buffer(p, signed)
            torchao_bytes += sum(-(-s.nbytes() // 512) * 512 for s in storages_of(buffer))
    tensors = tuple(StoredTensor(f"p{i}", "linear", shape, 1, dtype.itemsize * 8, True)
                    for i, shape in enumerate(shapes))
    assert optimizer_state_bytes(tensors, Optimizer(optimizer), trainer_built).device_bytes == torchao_bytes


def test_trainer_built_4bit_quantizes_in_blocks_of_256_and_a_stack_in_blocks_of_128():
    """transformers ``_get_torchao_optimizer`` passes ``block_size=256`` to AdamW4bit; torchao's default is 128:
    half the scales. A [4096, 4096] weight: 2 x (8388608 codes + 4·16777216/B scale + 512 qmap)."""
    w = (StoredTensor("w", "linear", (4096, 4096), 1, 16, True),)
    assert optimizer_state_bytes(w, Optimizer.ADAMW_4BIT_TORCHAO, True).device_bytes == 2 * (8388608 + 262144 + 512)
    assert optimizer_state_bytes(w, Optimizer.ADAMW_4BIT_TORCHAO, False).device_bytes == 2 * (8388608 + 524288 + 512)


def test_small_or_off_block_tensors_keep_plain_states_in_the_parameters_dtype():
    """``_new_buffer``: below 4096 elements, or not a multiple of the block, ``torch.zeros_like(p)``: 2·n·B, where
    bitsandbytes keeps fp32; and their step is one in-place kernel (no scratch)."""
    norm = (StoredTensor("n", "norm", (4100,), 1, 16, True),)
    assert optimizer_state_bytes(norm, Optimizer.ADAMW_8BIT_TORCHAO).device_bytes == 2 * 8704  # 8200 -> 512-B granules
    assert optimizer_step_temporary_bytes(norm, Optimizer.ADAMW_8BIT_TORCHAO) == 0


def test_low_bit_states_are_smaller_than_bnb_8bit_and_4bit_halves_the_codes():
    model = "llama-2-7b"
    options = dict(method="full", precision="bf16", batch_size=1, seq_len=512, grad_ckpt=True)
    states = {opt: vc.estimate(model, optimizer=opt, **options).terms()["optimizer_states"]
              for opt in ("adamw", "adamw-8bit", "adamw-8bit-torchao", "adamw-4bit-torchao", "adamw-fp8-torchao")}
    assert states["adamw-8bit-torchao"] < states["adamw"] / 1.9
    assert states["adamw-4bit-torchao"] < 0.55 * states["adamw-8bit-torchao"]
    assert states["adamw-fp8-torchao"] < states["adamw-8bit-torchao"]  # no qmaps


def test_the_step_scratch_is_the_largest_tensors_plan_and_moves_the_peak_to_the_step():
    """Llama-2-7B, 4-bit, torchtune recipe without optimizer in backward: lm_head's plan (3416064000 B) is alive
    beside every gradient at the step, which becomes the peak."""
    b = vc.estimate("llama-2-7b", method="full", stack="torchtune", precision="bf16-true",
                    optimizer="adamw-4bit-torchao", optimizer_in_backward=False, batch_size=2, seq_len=1024)
    assert b.phase.value == "optimizer-step"
    assert b.terms()["temporaries"] >= 3_416_064_000


def test_unknown_optimizer_error_lists_the_torchao_names():
    with pytest.raises(VramcalcError, match="adamw-4bit-torchao"):
        vc.estimate("llama-2-7b", optimizer="torchao-adamw4bit")


TT = ModelSpec(name="stack-tiny", family="llama", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=64, intermediate_size=768, vocab_size=2048, max_position_embeddings=1024)


def _has(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


@needs_torch
@needs_torchao
@pytest.mark.trace
@pytest.mark.parametrize("optimizer", sorted(KINDS))
def test_hf_trainer_estimate_matches_the_trace_of_the_real_optimizer(optimizer):
    from .trace_helpers import estimated_and_traced

    peak, traced = estimated_and_traced(TINY["llama"], method="full", seq_len=256, optimizer=optimizer)
    total = sum(traced.terms.values())
    assert abs(peak.tensor_bytes - total) / total < 0.005
    from vramcalc.options import Term
    assert traced.terms[Term.OPTIMIZER_STATES] == peak.optimizer_states  # torchao's own buffers, byte for byte


@needs_torch
@needs_torchao
@pytest.mark.trace
@pytest.mark.skipif(not _has("torchtune"), reason="needs the stacks extra")
@pytest.mark.parametrize("optimizer", sorted(KINDS))
@pytest.mark.parametrize("in_backward", [False, True])
def test_torchtune_estimate_is_within_3_percent_of_the_trace(optimizer, in_backward):
    """The full recipe with the optimizer at the end of the step (every gradient beside lm_head's step) and in
    backward (each step from its parameter's hook). torch AdamW on the same setups: -1.7% and +0.5%."""
    from vramcalc.estimator import step_moments
    from vramcalc.training_setup import resolve_setup
    from vramcalc.tracing.stacks.torchtune import run_trace

    options = dict(method="full", seq_len=256, optimizer=optimizer, precision="bf16-true", loss="torchtune",
                   optimizer_in_backward=in_backward)
    resolved = resolve_setup(TT, stack="torchtune", **options)
    peak = max(step_moments(TT, resolved), key=lambda m: m.tensor_bytes)
    traced = run_trace(TT, resolved, progress=False, warm=True).result
    total = sum(traced.terms.values())
    assert abs(peak.tensor_bytes - total) / total < 0.03
