"""Speed of the analytic estimate (pytest-benchmark). Run: python -m pytest benchmarks/bench_estimate.py --benchmark-only

The benchmarks share one run, so their ratios are comparable:
- one estimate of llama-3.1-8b LoRA on an H100, called again and again (what a notebook or a planner repeating a
  setup sees: the model- and setup-dependent parts are cached after the first call), the same call with every
  cache emptied first (a model and setup never seen before: ``test_one_estimate_new_setup``), and a new sequence
  length at every call (a setup never seen before of a model already used: ``test_one_estimate_unseen_setup``);
- the closest peer, fitcheck-llm 0.3.1 (``fitcheck.estimate``), on the same model, setup and GPU, when installed;
- a scalar sweep of 10,000 setups across the catalogue, and the same 10,000 shapes evaluated as numpy arrays per setup.
Nothing here asserts a time: ``--benchmark-only`` prints both figures side by side, and their ratio is the claim.
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

# the setup both tools estimate: llama-3.1-8b, LoRA r=8 on q_proj and v_proj (peft's defaults), bf16 weights,
# AdamW, one sequence of 2048 tokens, no checkpointing, on an H100 80GB
ONE = dict(method="lora", seq_len=2048, gpu="h100-sxm")


def _setups(n):
    grid = itertools.product(MODELS, METHODS, SEQ_LENS, BATCHES, [False, True], ["adamw", "adamw-8bit"])
    return list(itertools.islice(itertools.cycle(grid), n))


SETUPS = _setups(10_000)


def _setup_caches():
    """Every cache that depends on the setup (resolved setup, stored tensors, saved activations, moments). The
    catalogue stays loaded and each model's parameter inventory built (once per process, as in any session)."""
    import functools
    import sys

    kept = ("vramcalc.catalogue", "vramcalc.profiles", "vramcalc.model")
    return [value for name, module in list(sys.modules.items()) if name.startswith("vramcalc") and name not in kept
            for value in list(vars(module).values()) if isinstance(value, functools._lru_cache_wrapper)]


def _clear_caches(caches=[]):  # noqa: B006 (filled once, on first use, after every module is imported)
    if not caches:
        caches += _setup_caches()
    for cache in caches:
        cache.cache_clear()


@pytest.mark.benchmark(group="one estimate: llama-3.1-8b lora, h100")
def test_one_estimate(benchmark):
    result = benchmark(vramcalc.estimate, "llama-3.1-8b", **ONE)
    assert result.total_bytes > 0


@pytest.mark.benchmark(group="one estimate: llama-3.1-8b lora, h100")
def test_one_estimate_new_setup(benchmark):
    def cold():
        _clear_caches()
        return vramcalc.estimate("llama-3.1-8b", **ONE)

    result = benchmark(cold)
    assert result.total_bytes > 0


@pytest.mark.benchmark(group="one estimate: llama-3.1-8b lora, h100")
def test_one_estimate_unseen_setup(benchmark):
    # a setup never estimated before in this process, of a model and method already used (what a planner, a sweep
    # over batch shapes or a web form sees): every call takes a new sequence length, so the answer's own cache
    # misses and only the parts that do not depend on the batch shape (stored tensors, what a layer saves) are reused
    seq_lens = itertools.count(100_000)

    def unseen():
        return vramcalc.estimate("llama-3.1-8b", method="lora", seq_len=next(seq_lens), gpu="h100-sxm")

    result = benchmark(unseen)
    assert result.total_bytes > 0


@pytest.mark.benchmark(group="one estimate: llama-3.1-8b lora, h100")
def test_one_estimate_fitcheck(benchmark):
    fitcheck = pytest.importorskip("fitcheck", reason="the peer: pip install fitcheck-llm==0.3.1")
    spec = get_model("llama-3.1-8b")
    model = fitcheck.ModelConfig(
        name=spec.name, num_params=spec.params, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size, vocab_size=spec.vocab_size, head_dim=spec.head_dim,
        tie_word_embeddings=spec.tie_word_embeddings)
    training = fitcheck.TrainingConfig(precision="bf16", optimizer="adamw", batch_size=1, seq_len=2048, lora_rank=8,
                                       lora_targets=["q_proj", "v_proj"])
    gpu = fitcheck.get_gpu("h100")
    report = benchmark(fitcheck.estimate, model, training, gpu)
    assert report.total_mib > 0


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
            peaks, _, _ = peak_tensor_bytes_grid(spec, resolved, b, s)
            out.append(peaks)
        return np.concatenate(out)

    peaks = benchmark(sweep)
    assert peaks.size == 10_000 and peaks.min() > 0
