"""``--load requantize`` (torchtune 0.1.x + torchao 0.1): the load phase's reserved memory from the analytic
allocation sequence (``vramcalc/terms/load_reserved.py``) replayed through the caching allocator.

Two checks of the sequence: against the sequence torchao 0.1's own code records on fake tensors in torchtune 0.1.1's
order (``docs/evidence/torchtune01_reserved/events.py``; runs where torch is installed and torchao 0.1's
``nf4tensor.py`` is given, since no installable torchao has that code: ``pip download --no-deps torchao==0.1``, unzip,
and set ``VRAMCALC_TORCHAO_01_NF4TENSOR`` to ``torchao/dtypes/nf4tensor.py``), and, always, against the figures that
recording gave for Llama-2-7B (numbers below, recorded with events.py on the torchao 0.1 wheel from PyPI and
replayed by ``caching_allocator.replay``)."""

import importlib.util
import os
from pathlib import Path

import pytest

import vramcalc
from vramcalc.catalogue import get_model
from vramcalc.errors import VramcalcError
from vramcalc.terms import load_reserved
from vramcalc.terms.load_reserved import BuiltLinear, Rope, torchtune_01_load_events
from vramcalc.tracing.caching_allocator import OutOfMemory, replay
from vramcalc.training_setup import resolve_setup

EVIDENCE = Path(__file__).resolve().parents[1] / "docs" / "evidence" / "torchtune01_reserved" / "events.py"
NF4TENSOR_0_1 = os.environ.get("VRAMCALC_TORCHAO_01_NF4TENSOR", "")

# llama2/7B_qlora_single_device (torchtune-028, -037)
_ROW = dict(stack="torchtune", method="qlora", batch_size=2, seq_len=512, grad_ckpt=True, lora_rank=8,
            lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", loss="torchtune-2024",
            optimizer="adamw-foreach", lora_dropout=0.05, double_quant=True, adapter_dtype="bf16",
            precision="bf16-true", quant="nf4", load="requantize")
# events.py (torchao 0.1 wheel, 32 layers, rotary embeddings included) through caching_allocator.replay: the QLoRA
# build + load_state_dict, and the LoRA config's build (--lora); the tutorial printed 9.13 GB and 13.98 GB reserved
# after model init (shared/reference/published/measurements.csv, torchtune-037's notes)
RECORDED_QLORA_RESERVED, RECORDED_QLORA_ALLOCATED = 9_133_096_960, 7_360_848_896
RECORDED_LORA_RESERVED = 14_008_975_360
TUTORIAL_QLORA_RESERVED, TUTORIAL_LORA_RESERVED = 9.13e9, 13.98e9


def _layout(method="qlora"):
    spec = get_model("llama-2-7b")
    row = _ROW if method == "qlora" else {k: v for k, v in _ROW.items() if k not in ("quant", "double_quant")}
    return load_reserved.torchtune_01_layout(spec, resolve_setup(spec, **{**row, "method": method}))


def test_llama2_7b_qlora_load_replays_to_the_recorded_and_the_tutorials_reserved_memory():
    result = load_reserved.torchtune_01_load_replay(*_layout())
    assert result.reserved_peak_bytes == RECORDED_QLORA_RESERVED
    assert result.allocated_peak_bytes == RECORDED_QLORA_ALLOCATED
    assert abs(result.reserved_peak_bytes / TUTORIAL_QLORA_RESERVED - 1) < 0.001
    # the mechanism: far above the allocated peak (the [n, 16] searches' segments, split by the codes made after)
    assert result.reserved_peak_bytes - result.allocated_peak_bytes > 1.5e9


def test_the_load_does_not_fit_in_less_than_its_reserved_memory():
    """The stranded blocks are not cache a failing cudaMalloc could release (``release_cached_blocks``): with less
    device memory the same sequence runs out of it, so they belong in the fit, not only in the reserved reading."""
    events = torchtune_01_load_events(*_layout())
    assert replay(events, capacity_bytes=RECORDED_QLORA_RESERVED).reserved_peak_bytes == RECORDED_QLORA_RESERVED
    with pytest.raises(OutOfMemory):
        replay(events, capacity_bytes=RECORDED_QLORA_RESERVED - (64 << 20))


def test_the_same_build_without_quantization_replays_to_the_lora_configs_reserved_memory():
    """llama2/7B_lora_single_device: the bf16 layer built once, deep-copied 32 times, the template freed; nothing on
    the device at load_state_dict (a blocking host-to-device copy_ converts on the host)."""
    layout = _layout("lora")
    assert not any(linear.quantized for linear in layout[0] + layout[1])
    reserved = load_reserved.torchtune_01_load_replay(*layout).reserved_peak_bytes
    assert reserved == RECORDED_LORA_RESERVED
    assert abs(reserved / TUTORIAL_LORA_RESERVED - 1) < 0.005


def test_the_estimates_reserved_memory_is_the_loads_where_the_load_reserves_more_than_the_step():
    breakdown = vramcalc.estimate("llama-2-7b", **_ROW)
    assert breakdown.phase == "load"
    assert breakdown.details["load_reserved_bytes"] == RECORDED_QLORA_RESERVED
    spec = get_model("llama-2-7b")
    stranded = vramcalc.estimator.allocator_stranded_bytes(spec, resolve_setup(spec, **_ROW))
    assert breakdown.peak_tensor_bytes + stranded == RECORDED_QLORA_RESERVED
    per_layer = vramcalc.estimate("llama-2-7b", **{**_ROW, "load": "per-layer"})
    assert "load_reserved_bytes" not in per_layer.details


def test_the_step_keeps_its_own_reserved_memory_where_it_reserves_more_than_the_load():
    """max(step reserved, load reserved): a long step outgrows what the load left cached."""
    long_step = {**_ROW, "batch_size": 8, "seq_len": 4096, "grad_ckpt": False}
    requantize = vramcalc.estimate("llama-2-7b", **long_step)
    per_layer = vramcalc.estimate("llama-2-7b", **{**long_step, "load": "per-layer"})
    assert requantize.details["load_reserved_bytes"] == RECORDED_QLORA_RESERVED
    assert requantize.phase != "load"
    assert requantize.terms() == per_layer.terms()


def test_a_model_torchtune_01_could_not_build_gets_no_replay():
    """torchtune 0.1.1's llama builders deep-copy one decoder layer: a mixture-of-experts inventory has none."""
    row = {**_ROW, "lora_targets": "q_proj,k_proj,v_proj,o_proj"}
    spec = get_model("mixtral-8x7b")
    assert load_reserved.torchtune_01_layout(spec, resolve_setup(spec, **row)) is None
    assert "load_reserved_bytes" not in vramcalc.estimate("mixtral-8x7b", **row).details


def test_the_trace_refuses_requantize_which_no_installed_code_runs():
    pytest.importorskip("torch")
    with pytest.raises(VramcalcError, match="--load requantize is torchtune 0.1.x"):
        vramcalc.trace("llama-2-7b", **_ROW)


# -- the analytic sequence against torchao 0.1's own code ---------------------------------------------------------
def _recorded(num_layers, quantize, dims):
    """events.py's recording up to the end of load_state_dict, as (kind, allocation ordinal, bytes) events."""
    spec = importlib.util.spec_from_file_location("torchtune01_events", EVIDENCE)
    events = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(events)
    out, ordinal = [], {}
    for kind, key, nbytes in events.record(NF4TENSOR_0_1, num_layers, quantize=quantize, **dims):
        if kind == "mark" and key == "loaded":
            break
        if kind == "a":
            ordinal[key] = len(ordinal)
            out.append(("alloc", ordinal[key], nbytes))
        elif kind == "f":
            out.append(("free", ordinal[key]))
    return out


def _analytic(num_layers, quantize, dims):
    h, inter, vocab, r = dims["h"], dims["I"], dims["V"], dims["r"]

    def linear(out_features, in_features):
        n = out_features * in_features
        return BuiltLinear(n, quantize, 2 * n, (2 * r * in_features, 2 * out_features * r))

    attention = tuple(linear(h, h) for _ in range(4))
    mlp = (linear(inter, h), linear(h, inter), linear(inter, h))
    events = torchtune_01_load_events(attention, mlp, 2 * h, Rope(h // dims["heads"], dims["max_seq_len"]),
                                      num_layers, 2 * vocab * h, BuiltLinear(vocab * h, False, 2 * vocab * h))
    out, ordinal = [], {}
    for event in events:
        if event[0] == "alloc":
            ordinal[event[1]] = len(ordinal)
            out.append(("alloc", ordinal[event[1]], event[2]))
        else:
            out.append(("free", ordinal[event[1]]))
    return out


def _frees_as_sets(events):
    """Each run of frees as a set: their order within a run (locals released on return) changes nothing."""
    out, run = [], set()
    for event in events:
        if event[0] == "free":
            run.add(event[1])
            continue
        if run:
            out.append(frozenset(run))
            run = set()
        out.append(event)
    return out + ([frozenset(run)] if run else [])


SMALL = dict(h=1024, I=2816, V=4096, r=8, heads=8, max_seq_len=1024)  # n a multiple of 64 * 256 (to_nf4's blocks)
LLAMA2_7B = dict(h=4096, I=11008, V=32000, r=8, heads=32, max_seq_len=4096)


@pytest.mark.skipif(not Path(NF4TENSOR_0_1).is_file(), reason="torchao 0.1's nf4tensor.py not given "
                    "(VRAMCALC_TORCHAO_01_NF4TENSOR): pip download --no-deps torchao==0.1, unzip")
@pytest.mark.parametrize("dims, num_layers, quantize", [(SMALL, 1, True), (SMALL, 3, True), (SMALL, 3, False),
                                                        (LLAMA2_7B, 2, True)])
def test_the_analytic_sequence_is_the_one_torchao_01_records(dims, num_layers, quantize):
    pytest.importorskip("torch")
    recorded, analytic = _recorded(num_layers, quantize, dims), _analytic(num_layers, quantize, dims)
    assert _frees_as_sets(analytic) == _frees_as_sets(recorded)
    assert replay(analytic) == replay(recorded)
