"""Speed of the analytic estimate (pytest-benchmark). Run: python -m pytest benchmarks/bench_estimate.py

The three benchmarks share one run, so their ratios are comparable: a single estimate, a scalar sweep of 10,000
setups across the catalogue, and the same 10,000 shapes evaluated as numpy arrays per setup.
"""

import itertools

import pytest

import vramcalc
from vramcalc.catalogue import get_model
from vramcalc.estimator import peak_tensor_bytes_grid
from vramcalc.training_setup import resolve_setup

MODELS = [m.name for m in vramcalc.models()]
METHODS = ["full", "lora", "qlora"]
SEQ_LENS = [256, 512, 1024, 2048, 4096, 8192]
BATCHES = [1, 2, 4, 8]


def _setups(n):
    grid = itertools.product(MODELS, METHODS, SEQ_LENS, BATCHES, [False, True], ["adamw", "adamw-8bit"])
    return list(itertools.islice(itertools.cycle(grid), n))


SETUPS = _setups(10_000)


def test_one_estimate(benchmark):
    result = benchmark(vramcalc.estimate, "llama-3.1-8b", method="lora", seq_len=2048, gpu="h100-sxm")
    assert result.total_bytes > 0


def test_sweep_10000_setups_scalar(benchmark):
    def sweep():
        return [vramcalc.estimate(m, method=me, seq_len=s, batch_size=b, grad_ckpt=c, optimizer=o).total_bytes
                for m, me, s, b, c, o in SETUPS]

    totals = benchmark.pedantic(sweep, rounds=1, iterations=1)
    assert len(totals) == 10_000 and min(totals) > 0


def test_sweep_10000_setups_vectorised(benchmark):
    np = pytest.importorskip("numpy")
    groups = {}
    for m, me, s, b, c, o in SETUPS:
        groups.setdefault((m, me, c, o), []).append((b, s))

    def sweep():
        out = []
        for (m, me, c, o), shapes in groups.items():
            spec = get_model(m)
            resolved = resolve_setup(spec, method=me, grad_ckpt=c, optimizer=o)
            b, s = np.array(shapes).T
            peaks, _ = peak_tensor_bytes_grid(spec, resolved, b, s)
            out.append(peaks)
        return np.concatenate(out)

    peaks = benchmark(sweep)
    assert peaks.size == 10_000 and peaks.min() > 0
