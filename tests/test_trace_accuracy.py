"""The CI-sized accuracy check: the estimate's peak within 3% of the traced peak, for every family and method.

The full real-size grid is benchmarks/accuracy.py (its results: benchmarks/accuracy.csv and accuracy.md).
"""

import pytest

from vramcalc.estimator import step_moments
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch
from .tiny_models import TINY
from .trace_helpers import peak_error

pytestmark = [needs_torch, pytest.mark.trace]

TOLERANCE = 0.03

CASES = [
    ("llama", dict(seq_len=512)),
    ("llama", dict(seq_len=2048, method="qlora", grad_ckpt=True)),
    ("llama", dict(seq_len=512, method="lora", lora_dropout=0.1, lora_targets="all-linear")),
    ("llama", dict(seq_len=512, precision="mixed-bf16", optimizer="adamw-foreach")),
    ("llama", dict(seq_len=256, precision="fp32", attn="eager", batch_size=2)),
    ("llama", dict(seq_len=512, method="prompt", loss="chunked")),
    ("llama", dict(seq_len=512, method="lora", loss="fused", optimizer="adamw-8bit")),
    ("llama", dict(seq_len=256, batch_size=2, method="lora", loss="hf-shifted")),
    ("qwen3", dict(seq_len=256, batch_size=2, loss="hf-shifted", precision="mixed-bf16")),
    ("llama", dict(seq_len=256, loss="hf-shifted")),  # one sequence: the shifted slice is not copied
    ("llama", dict(seq_len=256, method="qlora", loss="hf-shifted", grad_ckpt=True)),
    ("llama", dict(seq_len=256, batch_size=2, method="lora", loss="hf-fp32-logits", grad_ckpt=True)),
    ("llama", dict(seq_len=256, loss="hf-fp32-logits", precision="fp32")),
    ("qwen3", dict(seq_len=512, method="qlora", loss="hf-fp32-logits")),
    ("gemma2", dict(seq_len=256, batch_size=2, method="lora", loss="hf-fp32-logits")),
    ("llama", dict(seq_len=256, batch_size=2, loss="model-dtype", precision="bf16-true")),
    ("llama", dict(seq_len=256, method="lora", loss="model-dtype", precision="bf16-true")),
    ("gemma2", dict(seq_len=256, loss="model-dtype", precision="bf16-true")),
    ("qwen3", dict(seq_len=256, method="qlora", loss="model-dtype", grad_ckpt=True)),
    ("llama", dict(seq_len=256, batch_size=2, method="lora", loss="hf-loop")),
    ("qwen3", dict(seq_len=256, batch_size=2, loss="hf-loop", precision="bf16-true", grad_ckpt=True)),
    ("mistral", dict(seq_len=512, method="lora", grad_accum=2)),
    ("qwen2", dict(seq_len=512, optimizer="sgd-momentum")),
    ("qwen3", dict(seq_len=512, method="lora", adapter_dtype="bf16", grad_ckpt=True)),
    ("gemma2", dict(seq_len=256, batch_size=2)),
    ("gemma2", dict(seq_len=256, method="qlora", precision="mixed-bf16")),
    ("phi3", dict(seq_len=512, method="lora", lora_targets="all-linear")),
    ("mixtral", dict(seq_len=512, method="lora")),
    ("qwen3_moe", dict(seq_len=512)),
    ("qwen3_moe", dict(seq_len=512, method="qlora", lora_targets="all-linear")),
    ("deepseek_v3", dict(seq_len=512)),
    ("deepseek_v3", dict(seq_len=512, method="lora", grad_ckpt=True)),
]


@pytest.mark.parametrize("family, options", CASES, ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for f, o in CASES])
def test_estimated_peak_is_within_3_percent_of_the_trace(family, options):
    assert abs(peak_error(TINY[family], **options)) < TOLERANCE


# Each was 1-21% off (or refused) before session 33, each for a mechanism the 3% check above lets through:
# - the first layer, whose input needs no gradient, saves q only if k needs one (LoRA on q and v: it does not), act's
#   output only if up's output needs one (LoRA on gate alone);
# - multi-query eager attention at batch 1: repeat_kv's k and v stay views through matmul's bmm;
# - the math SDPA kernel (fp32 with GQA): o_proj's input is saved only if o_proj saves it, the eager-like backward,
#   its bmm outputs in the selective cache;
# - o_proj's input under eager attention: its contiguous copy is saved only where o_proj saves it as it is (fp32
#   adapters save their own cast), and in the first layer with o_proj alone adapted o_proj saves the SDPA output;
# - QLoRA on an fp32 model: fp32 unquantized parameters, Linear4bit computing in its fp32 input's dtype;
# - mixed precision: the first layer's frozen fp32 weights whose input needs no gradient keep no autocast copy;
# - DoRA with dropout: peft recomputes the base output as F.linear(dropout(x), W), which saves W (or its cast) and
#   adds one aten.mm to the layer's call order (selective-op);
# - --repeat-kv (transformers < 4.54): SDPA gets k and v repeated to every head, and fp32 then takes the efficient
#   kernel instead of math.
EXACT_CASES = [
    ("llama", dict(seq_len=512, method="lora", precision="fp32", attn="eager")),
    ("llama", dict(seq_len=512, method="lora", precision="fp32")),
    ("llama", dict(seq_len=512, method="lora", lora_targets="gate_proj")),
    ("llama", dict(seq_len=512, method="lora", lora_targets="up_proj", attn="eager")),
    ("qwen3", dict(seq_len=512, method="lora", attn="eager")),
    ("qwen2", dict(seq_len=512, method="lora", attn="eager")),
    ("qwen2", dict(seq_len=256, batch_size=2, method="lora", attn="eager")),
    ("llama", dict(seq_len=512, method="lora", precision="fp32", grad_ckpt="selective")),
    ("llama", dict(seq_len=512, method="qlora", precision="fp32")),
    ("llama", dict(seq_len=512, method="qlora", precision="fp32", attn="eager", lora_targets="all-linear")),
    ("llama", dict(seq_len=512, batch_size=2, method="lora", lora_targets="o_proj", attn="eager")),
    ("llama", dict(seq_len=512, method="lora", lora_targets="o_proj", adapter_dtype="bf16")),
    ("llama", dict(seq_len=512, method="lora", precision="mixed-bf16")),
    ("llama", dict(seq_len=512, method="dora", lora_dropout=0.1)),
    ("llama", dict(seq_len=512, method="dora", lora_dropout=0.1, precision="bf16-true")),
    ("llama", dict(seq_len=512, method="dora", lora_dropout=0.1, grad_ckpt="selective-op")),
    ("qwen3", dict(seq_len=512, method="dora", lora_dropout=0.05, lora_targets="all-linear", precision="mixed-bf16")),
    ("llama", dict(seq_len=512, method="lora", repeat_kv=True)),
    ("llama", dict(seq_len=512, method="qlora", precision="fp32", grad_ckpt="reentrant", repeat_kv=True)),
    ("llama", dict(seq_len=512, method="lora", loss="hf-loop", repeat_kv=True)),
]


@pytest.mark.parametrize("family, options", EXACT_CASES,
                         ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for f, o in EXACT_CASES])
def test_partial_gradients_math_attention_and_fp32_qlora_are_within_0_1_percent_of_the_trace(family, options):
    assert abs(peak_error(TINY[family], **options)) < 0.001


# eager attention at batch 1: matmul's reshape to bmm's [b·a, ...] merges a size-1 batch dim, so views reach bmm
# uncopied: a multi-query k and v (qwen2's one kv head) stay repeat_kv's views, k·d wide, and a fused qkv's v (Phi-3
# with as many kv heads as heads) pins the whole qkv output; with the hf-loop's DynamicCache the attention gets the
# cache's copies instead. Batch 2 copies both (Saved.per_token_delta_at_batch_one).
BATCH_ONE_CASES = [
    ("qwen2", dict(seq_len=512, method="lora", attn="eager", loss="hf-loop")),
    ("phi3-mha", dict(seq_len=512, method="lora", attn="eager")),
    ("phi3-mha", dict(seq_len=256, batch_size=2, method="lora", attn="eager")),
    ("phi3-mha", dict(seq_len=512, method="lora", attn="eager", loss="hf-loop")),
]


@pytest.mark.parametrize("family, options", BATCH_ONE_CASES,
                         ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for f, o in BATCH_ONE_CASES])
def test_eager_attentions_batch_one_views_are_within_0_1_percent_of_the_trace(family, options):
    import dataclasses

    spec = TINY[family.split("-")[0]]
    if family == "phi3-mha":
        spec = dataclasses.replace(spec, name="tiny-phi3-mha", num_kv_heads=spec.num_heads)
    assert abs(peak_error(spec, **options)) < 0.001


def test_repeat_kv_saves_the_repeated_keys_and_values_instead_of_the_grouped_ones():
    # transformers < 4.54: SDPA saves k and v at a heads, not k: 2·(a - k)·d·c bytes per token and layer more
    spec = TINY["llama"]
    a, k, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    b, s = 1, 512

    def peak(**options):
        return max(m.tensor_bytes for m in step_moments(spec, resolve_setup(spec, method="lora", seq_len=s, **options)))

    assert peak(repeat_kv=True) - peak() == 2 * (a - k) * d * 2 * b * s * spec.num_layers


def test_full_size_8b_setup_matches_the_trace_term_by_term():
    # real size: Llama-3.1-8B, full bf16 fine-tuning, b=1, s=4096 (the memory-math.md section 5.5 example)
    from vramcalc.catalogue import get_model
    from vramcalc.options import Term
    from vramcalc.tracing.runner import run_trace

    spec = get_model("llama-3.1-8b")
    resolved = resolve_setup(spec, seq_len=4096)
    peak = max(step_moments(spec, resolved), key=lambda m: m.tensor_bytes)
    traced = run_trace(spec, resolved, progress=False)
    assert traced.phase == peak.phase
    for term in (Term.WEIGHTS, Term.OPTIMIZER_STATES, Term.ACTIVATIONS, Term.LOGITS):
        assert abs(getattr(peak, term.value) - traced.terms[term]) <= 0.01 * traced.terms[term]


# Setups whose peak falls inside a decoder layer's backward, not at the logits: a 16-token vocabulary makes the head
# negligible (as a reward model's score head or a fused loss does at full size). Before the layer's backward was
# split into down's, mul's and (eager) the softmax's moments, with autocast's weight copies and the fp32 residual
# gradient, these three were +3.77%, -4.85% and +4.43% off the trace (issue 15's reward rows inherited them).
LAYER_PEAK_CASES = [
    ("qwen3", dict(seq_len=512, batch_size=2, method="full", grad_ckpt=False)),
    ("llama", dict(seq_len=256, batch_size=2, method="lora", precision="mixed-bf16", grad_ckpt=True)),
    ("gemma2", dict(seq_len=512, batch_size=2, method="lora")),
    ("phi3", dict(seq_len=128, batch_size=2, method="full", precision="mixed-bf16")),
    ("mistral", dict(seq_len=512, batch_size=2, method="lora", lora_targets="all-linear")),
]


@pytest.mark.parametrize("family, options", LAYER_PEAK_CASES,
                         ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for f, o in LAYER_PEAK_CASES])
def test_a_peak_inside_a_layers_backward_is_within_2_5_percent_of_the_trace(family, options):
    import dataclasses

    from vramcalc.options import Phase
    from vramcalc.tracing.runner import run_trace

    spec = dataclasses.replace(TINY[family], vocab_size=16, name=f"tiny-{family}-vocab16")
    resolved = resolve_setup(spec, stack="hf", **options)
    peak = max(step_moments(spec, resolved), key=lambda m: m.tensor_bytes)
    traced = sum(run_trace(spec, resolved, progress=False).terms.values())
    assert peak.phase in (Phase.BACKWARD, Phase.BACKWARD_START)
    assert abs(peak.tensor_bytes - traced) / traced < 0.025


def test_transformers_4_46_loss_adds_a_shifted_fp32_copy_at_the_forward_peak():
    """transformers 4.46-4.49 ``ForCausalLMLoss`` (``loss/loss_utils.py`` in the 4.46.0 and 4.48.0 wheels) runs
    ``logits[..., :-1, :].contiguous()`` on the fp32 logits, and its cross-entropy then runs on those b·(s - 1) rows:
    with a vocabulary large enough for the loss to hold the peak, the forward peak rises by the copy, 4·b·(s-1)·V,
    less the log_softmax's b rows, 4·b·V (4.50 pads the labels and shifts no logits). The estimate follows the trace."""
    import dataclasses

    import vramcalc as vc
    from vramcalc.options import Phase
    from vramcalc.tracing.runner import run_trace

    spec = dataclasses.replace(TINY["llama"], name="tiny-llama-wide-vocab", vocab_size=32768)
    b, s, V = 2, 256, spec.vocab_size
    options = dict(seq_len=s, batch_size=b, method="lora")
    old = run_trace(spec, resolve_setup(spec, loss="hf-shifted", **options), progress=False)
    new = run_trace(spec, resolve_setup(spec, loss="hf", **options), progress=False)
    assert old.phase is Phase.FORWARD
    rise = old.phase_peaks[Phase.FORWARD] - new.phase_peaks[Phase.FORWARD]
    assert abs(rise - (4 * b * (s - 1) * V - 4 * b * V)) <= 2 * 8 * b * s  # to two int64 label tensors
    estimated = vc.estimate(spec, loss="hf-shifted", **options).peak_tensor_bytes
    assert abs(estimated / sum(old.terms.values()) - 1) < 0.005


@pytest.mark.parametrize("batch, precision", [(2, "bf16"), (1, "bf16"), (2, "bf16-true"), (2, "fp32")])
def test_before_4_46_the_models_fp32_logits_let_the_16_bit_ones_die_before_the_loss(batch, precision):
    """transformers 4.31-4.45 (``modeling_llama.py`` of the 4.31.0-4.45.2 wheels) rebinds ``logits =
    logits.float()`` in the model's forward, so the 16-bit logits are gone when the loss shifts its fp32 copy; 4.46-4.49
    upcast inside the loss function while the model still holds them. The forward peaks differ by c·T·V exactly (none
    in fp32, where ``.float()`` is the tensor itself), and the estimate follows the trace."""
    import dataclasses

    import vramcalc as vc
    from vramcalc.options import Phase
    from vramcalc.tracing.runner import run_trace

    spec = dataclasses.replace(TINY["llama"], name="tiny-llama-wide-vocab", vocab_size=32768)
    s, V = 256, spec.vocab_size
    options = dict(seq_len=s, batch_size=batch, method="lora", precision=precision)
    shifted = run_trace(spec, resolve_setup(spec, loss="hf-shifted", **options), progress=False)
    fp32_logits = run_trace(spec, resolve_setup(spec, loss="hf-fp32-logits", **options), progress=False)
    c = 4 if precision == "fp32" else 2
    drop = shifted.phase_peaks[Phase.FORWARD] - fp32_logits.phase_peaks[Phase.FORWARD]
    assert drop == (0 if c == 4 else c * batch * s * V)
    estimated = vc.estimate(spec, loss="hf-fp32-logits", **options).peak_tensor_bytes
    assert abs(estimated / sum(fp32_logits.terms.values()) - 1) < 0.005


@pytest.mark.parametrize("precision, held_bytes_per_logit", [("bf16", 4), ("bf16-true", 2), ("fp32", 4)])
def test_a_loop_that_keeps_outputs_holds_its_logits_through_backward_and_the_next_forward(precision,
                                                                                          held_bytes_per_logit,
                                                                                          monkeypatch):
    """transformers' ``*_no_trainer`` loop (``outputs = model(**batch); loss = outputs.loss;
    accelerator.backward(loss)``) keeps ``outputs`` until the next model call returns: its logits, fp32 under mixed
    precision (accelerate's ``convert_outputs_to_fp32``), lm_head's own dtype otherwise, sit beside backward's start
    and beside the next micro-batch's whole forward. Traced with transformers' model in that loop (two steps, so the
    second step's forward runs beside the first's outputs); the estimate follows the trace phase by phase."""
    import dataclasses

    import vramcalc as vc
    from vramcalc.options import Phase
    from vramcalc.tracing.runner import run_trace
    from vramcalc.tracing.step import TrainerLoss

    # a vocabulary large enough for the logits to hold the peak (as in the 4.46 loss test above)
    spec = dataclasses.replace(TINY["llama"], name="tiny-llama-wide-vocab", vocab_size=32768)
    b, s, V = 2, 256, spec.vocab_size
    options = dict(seq_len=s, batch_size=b, method="lora", precision=precision)
    loop = run_trace(spec, resolve_setup(spec, loss="hf-loop", **options), progress=False)
    trainer = run_trace(spec, resolve_setup(spec, loss="hf", **options), progress=False)
    held = held_bytes_per_logit * b * s * V
    # the logits alone: the loop traced with the model's cache off (fp32's math kernel saves no K/V of the cache's)
    with monkeypatch.context() as patch:
        patch.setattr(TrainerLoss, "runs_with_cache", staticmethod(lambda setup: False))
        uncached = run_trace(spec, resolve_setup(spec, loss="hf-loop", **options), progress=False)
    rise = uncached.phase_peaks[Phase.BACKWARD_START] - trainer.phase_peaks[Phase.BACKWARD_START]
    assert abs(rise - held) <= 2 * 8 * b * s  # to two int64 label tensors
    assert Phase.NEXT_FORWARD in loop.phase_peaks and Phase.NEXT_FORWARD not in trainer.phase_peaks
    estimate = vc.estimate(spec, loss="hf-loop", **options)
    for phase in (Phase.BACKWARD_START, Phase.NEXT_FORWARD, Phase.OPTIMIZER_STEP):
        estimated = estimate.details["phase_peak_bytes"][phase.value]
        assert abs(estimated / loop.phase_peaks[phase] - 1) < 0.006, phase  # fp32 LoRA: hf's own +0.5% here


# hf-loop without checkpointing: the cache's K/V saved by the attention as they are (llama's SDPA, bf16), saved as
# fp32 rotated keys cast by autocast (qwen3 mixed-bf16: the cache's keys extra), eager attention repeating k and v
# over sliding and full layers (gemma2), a fused qkv output released by v's copy (phi3), MLA's compressed latents
# (deepseek_v3); a packed row, which a model with a cache attends without the packed sequences' block mask
KV_CACHE_CASES = [
    ("llama", dict(method="lora")),
    ("llama", dict(method="lora", packing=True)),
    ("qwen3", dict(method="full", precision="mixed-bf16")),
    ("gemma2", dict(method="lora")),
    ("phi3", dict(method="lora")),
    ("deepseek_v3", dict(method="lora")),
]


@pytest.mark.parametrize("family, options", KV_CACHE_CASES,
                         ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for f, o in KV_CACHE_CASES])
def test_a_loop_that_keeps_outputs_without_checkpointing_matches_the_trace_with_its_kv_cache(family, options):
    """The loop's ``outputs.past_key_values`` (transformers' DynamicCache, the model run with ``use_cache``) beside
    its logits: each phase's peak within 0.6% of the trace, transformers' own cache in the traced model. Eight
    layers and an 8192 vocabulary: the logits hold the peak, the cache is 1-5% of the step and the next forward."""
    import dataclasses

    import vramcalc as vc
    from vramcalc.options import Phase
    from vramcalc.tracing.runner import run_trace

    spec = dataclasses.replace(TINY[family], name=f"tiny-{family}-8-layers", num_layers=8, vocab_size=8192)
    options = dict(seq_len=256, batch_size=2, **options)
    loop = run_trace(spec, resolve_setup(spec, loss="hf-loop", **options), progress=False)
    estimate = vc.estimate(spec, loss="hf-loop", **options)
    for phase in (Phase.BACKWARD_START, Phase.NEXT_FORWARD, Phase.OPTIMIZER_STEP):
        estimated = estimate.details["phase_peak_bytes"][phase.value]
        assert abs(estimated / loop.phase_peaks[phase] - 1) < 0.006, phase


def test_the_kv_cache_a_loop_keeps_lasts_from_backward_end_to_the_next_forward(monkeypatch):
    """Without checkpointing a loop's ``outputs`` holds every layer's cached keys and values, 2·b·s·k·d·c bytes a
    layer (transformers ``DynamicLayer.update``: ``torch.cat([self.keys, key_states])``). SDPA saves those copies
    themselves (16-bit, no mask, GQA in the kernel), so forward and the loss's backward see nothing more; each
    layer's attention backward frees its saved k and v but the cache keeps them: from the end of backward, through
    the step and the next micro-batch's forward, all L layers' K/V are extra. Traced against the same loop with the
    model's cache off."""
    import dataclasses

    from vramcalc.options import Phase
    from vramcalc.tracing.runner import run_trace
    from vramcalc.tracing.step import TrainerLoss
    from vramcalc.units import CUDA_ALLOCATION_GRANULE_BYTES

    spec = dataclasses.replace(TINY["llama"], name="tiny-llama-wide-vocab", vocab_size=32768)
    assert spec.num_kv_heads < spec.num_heads  # grouped-query attention
    b, s, c = 2, 256, 2
    options = dict(seq_len=s, batch_size=b, method="full")  # full: the embedding's backward is a phase of its own
    resolved = resolve_setup(spec, loss="hf-loop", **options)
    cached = run_trace(spec, resolved, progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(TrainerLoss, "runs_with_cache", staticmethod(lambda setup: False))
        uncached = run_trace(spec, resolved, progress=False)
    layers_kv = spec.num_layers * 2 * b * s * spec.num_kv_heads * spec.head_dim * c
    granules = 2 * CUDA_ALLOCATION_GRANULE_BYTES
    for phase in (Phase.FORWARD, Phase.BACKWARD_START):
        assert abs(cached.phase_peaks[phase] - uncached.phase_peaks[phase]) <= granules, phase
    for phase in (Phase.BACKWARD_END, Phase.OPTIMIZER_STEP, Phase.NEXT_FORWARD):
        assert abs(cached.phase_peaks[phase] - uncached.phase_peaks[phase] - layers_kv) <= granules, phase
