"""Planning speed: sweep throughput (setups/s) and the time of a full-catalogue plan.

Both are also expressed as ratios to a scalar ``estimate()`` timed in the same run, so they read the same on any
machine: the sweep's speed-up per setup over calling ``estimate()`` in a loop, and a plan's cost in ``estimate()``
calls. Run: ``pytest benchmarks/bench_plan.py --benchmark-only`` (figures land in ``extra_info``).
"""

from __future__ import annotations

import time

import pytest

import vramcalc as vc
from vramcalc.planning import plan, sweep

pytest.importorskip("pytest_benchmark")

GRID = {"model": ["llama-3.1-8b", "qwen3-30b-a3b", "gemma-2-9b", "deepseek-r1", "phi-4"],
        "method": ["full", "lora", "qlora", "prompt"], "optimizer": ["adamw", "adamw-8bit", "paged-adamw-8bit"],
        "grad_ckpt": [False, True], "lora_rank": [16], "batch_size": list(range(1, 33)),
        "seq_len": [256, 512, 1024, 2048, 4096, 8192, 16384], "gpu": ["h100-sxm", "rtx-4090", "a100-80gb", "b200"]}
SCALAR_CALLS = 300  # nothing here asserts a time: the ratios land in extra_info and are read side by side


@pytest.fixture(scope="module")
def estimate_seconds() -> float:
    """The mean time of one scalar estimate() over varied batch shapes."""
    vc.estimate("llama-3.1-8b", method="lora", gpu="h100-sxm")  # warm the caches, as the sweep's first group does
    start = time.perf_counter()
    for i in range(SCALAR_CALLS):
        vc.estimate("llama-3.1-8b", method="lora", gpu="h100-sxm", batch_size=1 + i % 32, seq_len=256 * (1 + i % 8))
    return (time.perf_counter() - start) / SCALAR_CALLS


def test_sweep_setups_per_second(benchmark, estimate_seconds):
    frame = benchmark.pedantic(sweep, args=(GRID,), rounds=5, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    per_setup = seconds / len(frame)
    speedup = estimate_seconds / per_setup
    benchmark.extra_info.update(setups=len(frame), setups_per_s=round(len(frame) / seconds),
                                estimate_s=estimate_seconds, speedup_per_setup_vs_estimate=round(speedup, 1))
    assert len(frame) >= 100_000


@pytest.mark.parametrize("model, method, tokens, seq_len", [
    ("llama-3.1-8b", "lora", 1e9, None), ("llama-3.3-70b", "qlora", 1e9, None), ("deepseek-r1", "lora", 1e9, None),
    ("llama-3.1-8b", "lora", None, None), ("llama-3.1-70b", "full", 1e9, None),
    ("qwen3-30b-a3b", "lora", 1e9, None), ("mixtral-8x7b", "full", 1e9, None), ("llama-3.1-8b", "lora", 1e9, 131072)])
def test_full_catalogue_plan_time(benchmark, estimate_seconds, model, method, tokens, seq_len):
    """A plan with a token budget, and one without (cost per million tokens): the same searches either way.
    70B full fine-tuning walks every strategy plan searches (planning/strategies.py): checkpointing, tensor
    parallelism and device_map on the GPU types where plain FSDP needs many GPUs; the MoE models add expert
    parallelism beside them, and the 128k-token job the context-parallel rings."""
    options = {"method": method} if seq_len is None else {"method": method, "seq_len": seq_len}
    frame = benchmark.pedantic(plan, args=(model,), kwargs={"tokens": tokens, **options}, rounds=3,
                               iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    in_calls = seconds / estimate_seconds
    benchmark.extra_info.update(gpus=int((frame["offer"] == "gpu").sum()), plan_s=seconds,
                                plan_in_estimate_calls=round(in_calls))
    assert len(frame) > 0
