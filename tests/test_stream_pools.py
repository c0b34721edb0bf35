"""FSDP's side streams and the reserved memory they add (``distributed.side_stream_pools``,
``runtime.stream_pool_bytes``): the estimate's per-stream pools against a real FSDP2 step traced on a fake process
group, where ``alloc_events`` records the stream each allocation was made on (FSDP2 selects ``torch.cpu`` streams
around its collectives on CPU, as it selects CUDA streams on a GPU), and against the caching-allocator replay of that
step with and without its streams."""

import csv
import dataclasses
import io

import pytest

import vramcalc as vc
from vramcalc import estimator
from vramcalc.catalogue import get_gpu, get_model
from vramcalc.terms import distributed, runtime
from vramcalc.training_setup import resolve_setup

from .cli_helpers import run_cli
from .conftest import needs_torch
from .tiny_models import TINY

FSDP_SETUPS = {
    "full-2-ranks": dict(method="full", num_gpus=2, sharding="fsdp", seq_len=256, batch_size=2),
    "full-4-ranks-accumulating": dict(method="full", num_gpus=4, sharding="fsdp", seq_len=128, batch_size=2,
                                      grad_accum=2),
    "full-shard-grad-op": dict(method="full", num_gpus=2, sharding="fsdp", seq_len=256, batch_size=2,
                               fsdp_shard="shard-grad-op"),
    "lora-2-ranks": dict(method="lora", num_gpus=2, sharding="fsdp", seq_len=256, batch_size=2),
}


def _traced_streams(spec, resolved):
    """The FSDP2 step's allocation events (1 warm-up step, 2 steps), each stream's largest live bytes and all
    streams' together."""
    from vramcalc.tracing.alloc_events import AllocationEvents
    from vramcalc.tracing.caching_allocator import stream_live_peaks
    from vramcalc.tracing.engine import run_trace

    events = AllocationEvents()
    run_trace(spec, resolved, steps=2, warmup=1, events=events, progress=False)
    return list(events.events), *stream_live_peaks(events.events)


@pytest.fixture(scope="module", params=sorted(FSDP_SETUPS))
def traced(request):
    spec = TINY["llama"]
    resolved = resolve_setup(spec, **FSDP_SETUPS[request.param])
    return spec, resolved, *_traced_streams(spec, resolved)


@needs_torch
@pytest.mark.trace
def test_fsdp2_allocates_on_its_all_gather_and_reduce_scatter_streams_what_the_estimate_puts_in_their_pools(traced):
    spec, resolved, _, peak, _ = traced
    all_gather, reduce_scatter = distributed.side_stream_pools(spec, resolved)
    assert set(peak) <= {0, 1, 2}  # the default stream, the copy-in stream, the reduce-scatter stream
    # the estimate rounds each tensor to the 512-B granule, the events keep storage sizes
    assert peak.get(1, 0) == pytest.approx(all_gather, rel=0.01)  # LoRA: the fp32 adapters' casts left out
    assert peak.get(2, 0) == pytest.approx(reduce_scatter, abs=8 * 512)
    if resolved.setup.method.value == "lora":  # the adapters' gradients are peft's, outside FSDP2's units
        assert reduce_scatter < 64 * 1024


@needs_torch
@pytest.mark.trace
def test_the_default_streams_floor_is_at_most_its_traced_peak_and_within_10_percent(traced):
    spec, resolved, _, peak, _ = traced
    pools = estimator._tensor_peak(spec, resolved).stream_pools_bytes
    peak_tensor = max(m.tensor_bytes for m in estimator.step_moments(spec, resolved))
    floor = pools + peak_tensor - sum(distributed.side_stream_pools(spec, resolved))  # runtime.stream_pool_bytes
    assert floor <= peak[0] * 1.005  # a floor (the estimate's granules aside)
    assert floor >= 0.9 * peak[0]


@needs_torch
@pytest.mark.trace
def test_replaying_the_step_with_its_streams_reserves_at_least_the_estimates_stream_pools_more(traced):
    from vramcalc.tracing.caching_allocator import ALLOC, replay

    spec, resolved, events, _, _ = traced
    with_streams = replay(events).reserved_peak_bytes
    one_stream = replay([e[:3] if e[0] == ALLOC else e for e in events]).reserved_peak_bytes
    pools = estimator._tensor_peak(spec, resolved).stream_pools_bytes
    assert pools > 0
    assert with_streams - one_stream >= pools


@needs_torch
@pytest.mark.trace
def test_the_estimates_stream_pools_are_the_traced_streams_peaks_beyond_the_traced_peak_within_15_percent(traced):
    spec, resolved, _, peak, total_peak = traced
    traced_pools = sum(peak.values()) - total_peak
    assert estimator._tensor_peak(spec, resolved).stream_pools_bytes == pytest.approx(traced_pools, rel=0.15)


def test_stream_pools_are_the_streams_peaks_beyond_the_joint_peak_and_never_negative():
    # three streams peaking at different moments: 10 + 3 + 4 against a joint peak of 12
    assert runtime.stream_pool_bytes(10, (3, 4), 12) == 5
    assert runtime.stream_pool_bytes(10, (0, 0), 12) == 0  # (a joint peak above the default stream's alone)


def test_one_gpu_and_other_engines_have_no_stream_pools():
    spec = TINY["llama"]
    for options in ({}, dict(num_gpus=2, sharding="ddp"), dict(num_gpus=2, sharding="zero3")):
        breakdown = vc.estimate(spec, seq_len=256, **options)
        assert "stream_pools_bytes" not in breakdown.details
        assert distributed.side_stream_pools(spec, resolve_setup(spec, seq_len=256, **options)) == (0, 0)


def test_fsdp_full_fine_tuning_reserves_the_cached_gradient_shards_beside_the_losss_backward():
    """Llama-2-7B on 4 ranks at 4 x 2048 (torchtune 2024's bf16 FSDP): the default stream peaks at the loss's
    backward, before any gradient of this step exists, and the reduce-scatter stream keeps the last step's gradient
    shards (2 bytes x 6.74 G / 4 = 3.37 GB) cached beside it; the tensors themselves peak at the optimizer step, where
    those shards are live. So the pools add the shards less the gap between the two peaks, plus the all-gather
    stream's two cached layer buffers (2 bytes x 202.4 M parameters each)."""
    options = dict(method="full", stack="torchtune", num_gpus=4, sharding="fsdp", batch_size=4, seq_len=2048,
                   grad_ckpt=True, loss="torchtune-2024", optimizer="adamw-foreach", precision="bf16-true")
    breakdown = vc.estimate("llama-2-7b", **options)
    spec = get_model("llama-2-7b")
    moments = estimator.step_moments(spec, resolve_setup(spec, **options))
    backward_start = max(m.tensor_bytes for m in moments if m.phase.value == "backward-start")
    gradient_shards = 2 * 6_738_415_616 // 4
    layer_buffers = 2 * 2 * 202_383_360
    expected = backward_start + gradient_shards + layer_buffers - breakdown.peak_tensor_bytes
    assert breakdown.details["stream_pools_bytes"] == pytest.approx(expected, rel=0.002)
    # reserved while the GPU has room; not in the total that decides the fit (freed before a cudaMalloc fails)
    slack = breakdown.terms_bytes[vc.Term.ALLOCATOR_SLACK]
    assert slack == estimator.allocator_stranded_bytes(spec, resolve_setup(spec, **options))  # the pools apart
    assert breakdown.reserved_bytes == breakdown.peak_tensor_bytes + slack + breakdown.details["stream_pools_bytes"]
    assert breakdown.total_bytes == sum(breakdown.terms().values())


@needs_torch
@pytest.mark.trace
def test_a_single_gpu_step_allocates_everything_on_the_default_stream():
    spec = TINY["llama"]
    events, peaks, joint = _traced_streams(spec, resolve_setup(spec, seq_len=128))
    assert all(len(event) == 3 for event in events if event[0] == "alloc")
    assert set(peaks) == {0} and peaks[0] == joint


def test_the_text_table_states_the_fsdp_streams_beside_the_total():
    breakdown = vc.estimate("llama-3.1-8b", num_gpus=8, sharding="fsdp")
    line = next(line for line in breakdown.table().splitlines() if line.startswith("FSDP's streams"))
    shown = float(line.split("keep ")[1].split(" GiB")[0])
    assert shown == pytest.approx(breakdown.details["stream_pools_bytes"] / 2**30, abs=0.005)
    assert f"max_memory_reserved {breakdown.reserved_bytes / 2**30:.2f} GiB" in line
    assert "FSDP's streams" not in vc.estimate("llama-3.1-8b").table()


def test_a_gpu_the_peak_fits_but_the_stream_pools_overflow_gets_a_warning_not_a_refusal():
    options = dict(method="full", num_gpus=8, sharding="fsdp", batch_size=2, seq_len=2048, grad_ckpt=True)
    plain = vc.estimate("llama-3.1-8b", **options)
    pools = plain.details["stream_pools_bytes"]
    # a made-up GPU with 1 GiB more than the total: the peak fits, the pools do not
    tight = dataclasses.replace(get_gpu("h100-sxm"), name="tight-gpu", memory_bytes=plain.total_bytes + 2**30)
    assert pools > 2**30
    breakdown = vc.estimate("llama-3.1-8b", gpu=tight, **options)
    assert breakdown.fits() and any("FSDP's streams" in w and "num_alloc_retries" in w for w in breakdown.warnings)
    roomy = dataclasses.replace(tight, memory_bytes=plain.total_bytes + pools + 2**30)
    assert not any("FSDP's streams" in w for w in vc.estimate("llama-3.1-8b", gpu=roomy, **options).warnings)


def test_the_csv_row_of_an_fsdp_estimate_carries_the_stream_pools_and_the_reserved_bytes(capsys):
    code, out, _ = run_cli(capsys, "estimate", "llama-3.1-8b", "--num-gpus", "8", "--sharding", "fsdp",
                           "--format", "csv")
    row = next(csv.DictReader(io.StringIO(out)))
    breakdown = vc.estimate("llama-3.1-8b", num_gpus=8, sharding="fsdp")
    assert code == 0 and int(row["stream_pools_bytes"]) == breakdown.details["stream_pools_bytes"] > 0
    assert int(row["reserved_bytes"]) == int(row["peak_tensor_bytes"]) + int(row["allocator_slack_bytes"]) \
        + int(row["stream_pools_bytes"])
    _, single, _ = run_cli(capsys, "estimate", "llama-3.1-8b", "--format", "csv")
    assert "stream_pools_bytes" not in single.splitlines()[0]
