"""The activation knobs of issue 11 (selective checkpointing, torch.compile, activation offloading, Liger kernels,
packing): the estimate against the trace of the real torch code, and the byte rules stated from the libraries'
sources.

Trace cases run the real mechanism on tiny models (``tests/tiny_models.py``): torch's selective checkpointing with
the matmul policy, AOTAutograd's min-cut partitioner per layer, save_on_cpu-style offloading, transformers'
packed-sequence masks. Liger is Triton-only, so its rules are checked against numbers derived by hand from
liger-kernel 0.8.5's ``ctx.save_for_backward`` calls.
"""

import statistics

import pytest

from vramcalc.options import Attention, GradCkpt, Kernels, Method, Precision
from vramcalc.terms import activations
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch
from .tiny_models import TINY

TOLERANCE = 0.03  # issue 11: max |estimate - trace| / trace over the knob grid
MEDIAN_TOLERANCE = 0.005  # issue 11: median over the grid

CASES = [
    # selective checkpointing
    ("llama", dict(seq_len=256, batch_size=2, grad_ckpt="selective")),
    ("llama", dict(seq_len=256, method="lora", grad_ckpt="selective")),
    ("llama", dict(seq_len=2048, method="qlora", grad_ckpt="selective")),
    ("qwen3", dict(seq_len=256, method="lora", lora_targets="all-linear", grad_ckpt="selective")),
    ("mistral", dict(seq_len=256, grad_ckpt="selective", optimizer="adamw-8bit")),
    ("llama", dict(seq_len=256, method="dora", grad_ckpt="selective")),
    ("llama", dict(seq_len=1024, method="qlora", quant="int8", grad_ckpt="selective")),
    ("deepseek_v3", dict(seq_len=256, grad_ckpt="selective")),
    # torchtitan's selective checkpointing (every other mm)
    ("llama", dict(seq_len=256, batch_size=2, grad_ckpt="selective-op")),
    ("llama", dict(seq_len=256, method="lora", lora_targets="all-linear", grad_ckpt="selective-op")),
    ("llama", dict(seq_len=2048, method="qlora", grad_ckpt="selective-op")),
    ("llama", dict(seq_len=256, method="dora", grad_ckpt="selective-op")),
    ("llama", dict(seq_len=1024, method="qlora", quant="int8", grad_ckpt="selective-op")),
    ("qwen2", dict(seq_len=256, method="lora", grad_ckpt="selective-op")),
    ("phi3", dict(seq_len=256, grad_ckpt="selective-op")),
    ("gemma2", dict(seq_len=256, grad_ckpt="selective-op")),
    ("qwen3_moe", dict(seq_len=256, grad_ckpt="selective-op")),
    ("deepseek_v3", dict(seq_len=256, grad_ckpt="selective-op")),
    ("llama", dict(seq_len=256, grad_ckpt="selective-op", activation_offload=True)),
    # torch.compile (AOTAutograd, min-cut partition)
    ("llama", dict(seq_len=256, batch_size=2, compile=True)),
    ("llama", dict(seq_len=256, method="lora", compile=True)),
    ("llama", dict(seq_len=256, method="lora", lora_targets="all-linear", compile=True)),
    ("qwen3", dict(seq_len=256, compile=True)),
    ("mistral", dict(seq_len=256, batch_size=2, method="lora", compile=True, grad_ckpt="full")),
    ("llama", dict(seq_len=256, compile=True, grad_ckpt="selective")),
    ("qwen3", dict(seq_len=256, method="lora", adapter_dtype="bf16", compile=True)),
    # the blocks compiled, the loss eager (torchtitan before bbb1b616e)
    ("llama", dict(seq_len=256, batch_size=2, compile=True, compile_loss=False)),
    ("llama", dict(seq_len=256, method="lora", compile=True, compile_loss=False)),
    ("qwen3", dict(seq_len=256, compile=True, compile_loss=False)),
    ("mistral", dict(seq_len=256, batch_size=2, method="lora", compile=True, compile_loss=False, grad_ckpt="full")),
    ("llama", dict(seq_len=256, compile=True, compile_loss=False, grad_ckpt="selective-op")),
    # activation offloading
    ("llama", dict(seq_len=256, batch_size=2, activation_offload=True)),
    ("llama", dict(seq_len=256, method="lora", activation_offload=True)),
    ("llama", dict(seq_len=256, grad_ckpt="full", activation_offload=True)),
    ("llama", dict(seq_len=256, method="lora", grad_ckpt="full", activation_offload=True)),
    ("llama", dict(seq_len=2048, method="qlora", grad_ckpt="full", activation_offload=True)),
    ("llama", dict(seq_len=256, grad_ckpt="selective", activation_offload=True)),
    ("qwen3", dict(seq_len=256, method="lora", lora_targets="all-linear", grad_ckpt="full", activation_offload=True)),
    # packing
    ("llama", dict(seq_len=128, batch_size=4, packing=True)),
    ("llama", dict(seq_len=128, batch_size=4, packing=True, attn="flash")),
    ("mistral", dict(seq_len=256, batch_size=2, method="lora", packing=True)),
    ("mistral", dict(seq_len=256, batch_size=2, method="lora", packing=True, attn="flash")),
    ("llama", dict(seq_len=128, batch_size=2, packing=True, attn="eager")),
    ("qwen3", dict(seq_len=1024, batch_size=2, method="qlora", packing=True, attn="flash")),
    # combined
    ("llama", dict(seq_len=256, batch_size=2, method="lora", packing=True, attn="flash", grad_ckpt="selective",
                   activation_offload=True)),
    ("qwen3", dict(seq_len=128, batch_size=2, compile=True, packing=True, attn="flash")),
    ("llama", dict(seq_len=256, method="lora", compile=True, activation_offload=True)),
]

# With the loss compiled as one fused kernel (tracing/compiled.py ``_fused``) the logits shrink and the peak of these
# small setups moves into the decoder layers' compiled backward, which the trace runs op by op: it allocates the
# intermediates inductor fuses, so the trace is above the estimate there (a limit of the trace, not an estimate rule).
# Since the trace's graphs release each input at its last use, as inductor's do (tracing/compiled.py ``_boxed``),
# only the offloaded one is still over 3% (-5.7%; qwen3 -4.3% -> -0.01%, llama selective -7.0% -> -2.7%, packed
# qwen3 -4.3% -> -0.03%, llama offload -12.5% -> -5.7%).
_OP_BY_OP_BACKWARD = {
    ("llama", (("activation_offload", True), ("compile", True), ("method", "lora"), ("seq_len", 256))),
}
_PARAMS = [pytest.param(family, options, marks=pytest.mark.xfail(strict=True, reason="op-by-op compiled backward"))
           if (family, tuple(sorted(options.items()))) in _OP_BY_OP_BACKWARD else (family, options)
           for family, options in CASES]
_IDS = [f"{family}-{'-'.join(f'{k}={v}' for k, v in options.items())}" for family, options in CASES]
_ERRORS: dict = {}


def _relative_error(family: str, options: dict) -> float:
    from vramcalc.estimator import step_moments
    from vramcalc.tracing.runner import run_trace

    key = (family, tuple(sorted(options.items())))
    if key not in _ERRORS:
        spec = TINY[family]
        resolved = resolve_setup(spec, **options)
        estimated = max(m.tensor_bytes for m in step_moments(spec, resolved))
        traced = sum(run_trace(spec, resolved, progress=False).terms.values())
        _ERRORS[key] = (estimated - traced) / traced
    return _ERRORS[key]


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("family, options", _PARAMS, ids=_IDS)
def test_estimated_peak_is_within_3_percent_of_the_traced_knob(family, options):
    assert abs(_relative_error(family, options)) < TOLERANCE


@needs_torch
@pytest.mark.trace
def test_median_error_over_the_knob_grid_is_below_half_a_percent():
    errors = [abs(_relative_error(family, options)) for family, options in CASES]
    assert len(errors) >= 25
    assert statistics.median(errors) <= MEDIAN_TOLERANCE


# -- rules from the sources, without a trace ------------------------------------------------------------------------

def _layer(method=Method.FULL, kernels=Kernels.NONE, compiled=False, offload=False, **lora):
    dt = activations.dtypes(method, Precision.BF16, activations.AdapterDtype.FP32)
    return activations.LayerSetup(method, dt, Attention.SDPA, kernels=kernels, compiled=compiled, offload=offload,
                                  **lora)


def test_liger_saves_8h_plus_2i_less_per_layer_and_4h_less_in_the_final_norm():
    # liger-kernel 0.8.5: LigerRMSNormFunction saves (X, W, RSTD) -- the bf16 input and a [T] fp32 rstd -- where
    # HF's LlamaRMSNorm keeps an fp32 copy (4h) and y (2h); per norm that is 4h + 2h - 2h = 4h less, two norms a
    # layer. LigerSiLUMulFunction saves (a, b) and recomputes silu: silu's output (2I) is not kept.
    # Final norm: 4h less. Full fine-tuning, bf16, so every norm's weight trains.
    spec = TINY["llama"]
    h, i, layers = spec.hidden_size, spec.intermediate_size, spec.num_layers
    eager = activations.model_saved(spec, _layer(), GradCkpt.NONE)
    liger = activations.model_saved(spec, _layer(kernels=Kernels.LIGER), GradCkpt.NONE)
    assert eager.per_token - liger.per_token == layers * (8 * h + 2 * i) + 4 * h
    assert eager.per_square == liger.per_square


def test_liger_with_frozen_base_saves_4h_plus_2i_less_per_layer():
    # LoRA on q, v: norms of frozen weights keep no y and no normalized copy for q/k/v (frozen Linears save no
    # input); Liger keeps the norm's bf16 input (2h) instead of HF's fp32 copy (4h): 2h less per norm. SwiGLU:
    # gate and up kept either way, silu's output (2I) not kept. The first layer's input needs no gradient, so it
    # saves nothing in either; the final norm saves 2h less.
    spec = TINY["llama"]
    h, i, layers = spec.hidden_size, spec.intermediate_size, spec.num_layers
    lora = dict(lora_modules=("q_proj", "v_proj"), lora_rank=8)
    eager = activations.model_saved(spec, _layer(Method.LORA, **lora), GradCkpt.NONE)
    liger = activations.model_saved(spec, _layer(Method.LORA, kernels=Kernels.LIGER, **lora), GradCkpt.NONE)
    first_layer_mlp = 2 * i  # the MLP of layer 0 sees a gradient (v's LoRA feeds it), its norms 2h each less
    assert eager.per_token - liger.per_token == (layers - 1) * (4 * h + 2 * i) + (2 * h + first_layer_mlp) + 2 * h


_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _bf16_lora_layer(kernels, dropout=0.0, rank=8):
    dt = activations.dtypes(Method.LORA, Precision.BF16_TRUE, activations.AdapterDtype.BF16)
    return activations.LayerSetup(Method.LORA, dt, Attention.SDPA, lora_modules=_ALL_LINEAR, lora_rank=rank,
                                  lora_dropout=dropout, kernels=kernels)


def test_unsloth_fused_lora_saves_the_swiglu_product_and_every_lora_a_output_less_than_liger():
    # unsloth/kernels/fast_lora.py: LoRA_MLP saves (A, B..., X, e, g) and recomputes h = swiglu(e, g), which peft's
    # down_proj LoRA keeps as lora_A's input (c·I); LoRA_QKV, LoRA_W and LoRA_MLP save X but never X @ A, which peft
    # keeps for each lora_B (c·r, seven adapters). Norms (X and a [T] rstd) and the SwiGLU's e and g are Liger's.
    spec = TINY["llama"]
    i, layers, rank, c = spec.intermediate_size, spec.num_layers, 8, 2
    liger = activations.model_saved(spec, _bf16_lora_layer(Kernels.LIGER), GradCkpt.NONE)
    unsloth = activations.model_saved(spec, _bf16_lora_layer(Kernels.UNSLOTH), GradCkpt.NONE)
    assert liger.per_token - unsloth.per_token == layers * (c * i + 7 * c * rank)


def test_unsloth_runs_peft_layers_and_transformers_mlp_when_lora_has_dropout():
    # unsloth/models/llama.py patch_peft_model patches LoRA_QKV/W/MLP only ``if lora_dropout == 0 and bias ==
    # "none"``; otherwise peft's layers and transformers' LlamaMLP run (silu's output saved too, c·I more than
    # Liger's SwiGLU), while the decoder layer keeps Unsloth's RMSNorm.
    spec = TINY["llama"]
    i, layers, c = spec.intermediate_size, spec.num_layers, 2
    liger = activations.model_saved(spec, _bf16_lora_layer(Kernels.LIGER, dropout=0.05), GradCkpt.NONE)
    unsloth = activations.model_saved(spec, _bf16_lora_layer(Kernels.UNSLOTH, dropout=0.05), GradCkpt.NONE)
    assert unsloth.per_token - liger.per_token == layers * c * i


def test_triton_norms_write_their_input_gradient_in_place_but_for_gemma():
    # Unsloth kernels/rms_layernorm.py ``dX = torch.empty_like(dY) if ctx.GEMMA else dY``; Liger ops/rms_norm.py
    # ``dX = dY`` when in_place, which its monkey patch sets for every family but the Gemma ones: no [T, h] buffer,
    # where transformers' eager LlamaRMSNorm backward holds five fp32 ones (traced)
    from vramcalc.catalogue import get_model
    from vramcalc.terms import temporaries

    llama, gemma2, tokens = TINY["llama"], get_model("gemma-2-2b"), 512
    eager = temporaries.norm_backward_bytes(llama, tokens)
    assert eager == 5 * 4 * tokens * llama.hidden_size
    for kernels in (Kernels.LIGER, Kernels.UNSLOTH):
        assert temporaries.norm_backward_bytes(llama, tokens, kernels) == 0
        assert temporaries.norm_backward_bytes(gemma2, tokens, kernels) == temporaries.norm_backward_bytes(gemma2,
                                                                                                           tokens)


def test_unsloth_fits_the_longest_contexts_unsloth_published():
    # docs.unsloth.ai/basics/unsloth-benchmarks ("Unsloth context length" column; Llama 3.3 blog, Dec 2024): the
    # longest padded context that fitted each GPU with 4-bit QLoRA, rank 32 on all seven projections, batch 1. The
    # unsloth preset's estimate must say it fits (<= the GPU's memory) and, each being the longest that fitted, not
    # be far below it. benchmarks/unsloth_context.md has the ratios.
    import vramcalc as vc

    rows = [("llama-3.1-8b", 8, 2_972), ("llama-3.1-8b", 24, 78_475), ("llama-3.1-8b", 80, 342_733),
            ("llama-3.3-70b", 48, 12_106), ("llama-3.3-70b", 80, 89_389)]
    for model, gib, seq_len in rows:
        total = vc.estimate(model, method="qlora", stack="unsloth", batch_size=1, seq_len=seq_len, lora_rank=32,
                            lora_targets=",".join(_ALL_LINEAR)).total_bytes
        assert 0.7 * gib * 2**30 < total <= gib * 2**30, (model, gib, seq_len, total / 2**30)


def test_selective_keeps_every_matmul_output_of_a_layer():
    # torch SAC with the matmul policy caches each mm output: q (a·d), k and v (k·d), o (h), gate and up (I),
    # down (h), in bf16, and SDPA flash's output (a·d, bf16) and logsumexp (4·a per token), plus the layer input
    # (2h) that the checkpoint keeps. Numbers for tiny llama: h=256, a=4, k=2, d=64, I=688.
    spec = TINY["llama"]
    kept = activations.layer_kept(spec, _layer(), GradCkpt.SELECTIVE, moe=False)
    h, a, k, d, i = 256, 4, 2, 64, 688
    assert kept.per_token == 2 * h + 2 * (a * d + 2 * k * d + h + 2 * i + h) + 2 * a * d + 4 * a


def test_selective_op_keeps_torchtitans_odd_mm_outputs_of_a_layer():
    # torchtitan activation_checkpoint.py: "Saves output of all compute ops, except every second mm", the count
    # restarting in each checkpointed layer. Full fine-tuning of tiny llama calls mm for q, k, v, o, gate, up, down
    # in that order, so the 1st, 3rd, 5th and 7th are kept: q (a·d), v (k·d), gate (I), down (h), in bf16; SDPA's
    # output (a·d, bf16) and logsumexp (4·a) are on the save list; plus the checkpointed layer input (2h).
    spec = TINY["llama"]
    kept = activations.layer_kept(spec, _layer(), GradCkpt.SELECTIVE_OP, moe=False)
    h, a, k, d, i = 256, 4, 2, 64, 688
    assert kept.per_token == 2 * h + 2 * (a * d + k * d + i + h) + 2 * a * d + 4 * a


def test_selective_op_counts_lora_matmuls_between_the_base_ones():
    # peft's LoRA Linear calls base, lora_A, lora_B in turn, so with adapters on q and v the mm sequence is
    # q, q_A, q_B, k, v, v_A, v_B, o, gate, up, down: kept are q (a·d), q_B (a·d), v (k·d), v_B (k·d), gate (I),
    # down (h) -- the adapters' A outputs (r) and k, o, up are recomputed. LoRA's outputs in bf16 under autocast.
    spec = TINY["llama"]
    lora = _layer(Method.LORA, lora_modules=("q_proj", "v_proj"), lora_rank=8)
    kept = activations.layer_kept(spec, lora, GradCkpt.SELECTIVE_OP, moe=False)
    h, a, k, d, i = 256, 4, 2, 64, 688
    assert kept.per_token == 2 * h + 2 * (2 * a * d + 2 * k * d + i + h) + 2 * a * d + 4 * a


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("family, options", [("qwen3", dict(seq_len=256)), ("llama", dict(seq_len=256, batch_size=2)),
                                             ("mistral", dict(seq_len=256, batch_size=2, method="lora",
                                                              grad_ckpt="full"))],
                         ids=["qwen3", "llama-b2", "mistral-lora-ckpt"])
def test_a_compiled_layer_backward_frees_each_saved_tensor_at_its_last_use(family, options):
    # inductor's call(args) clears its argument list and dels each buffer after its last use, and AOTAutograd hands
    # the backward graph its saved tensors in a list nothing else holds (runtime_wrappers.py: ctx.
    # maybe_clear_saved_tensors, steal_args=True): the MLP's saved tensors die before the attention's backward. The
    # trace's graphs ran through make_boxed_func's f(*args), which held every input to the end of the graph
    # (qwen3 -4.30%, llama b2 -1.83%, mistral LoRA ckpt -1.24%; fuzz35 #14 qwen3-4b full fp16 eager reentrant
    # compile b4 s1024: -3.28% -> -0.76%, the rest the op-by-op softmax backward)
    assert abs(_relative_error(family, dict(options, compile=True))) < 0.002


@needs_torch
@pytest.mark.trace
def test_selective_op_on_qdora_counts_no_mm_for_the_4bit_base():
    # bitsandbytes' MatMul4Bit runs gemm_4bit, not aten.mm, so each QDoRA target's mm calls are peft's four
    # (lora_A and lora_B on the identity, then on x): torchtitan's policy keeps the [in, r] and [T, r] outputs
    # only. The estimate walks QDoRA on a 16-bit base (estimator._quantized_base_moments), whose base mm had
    # shifted the parity and kept every other target's [in, out] and [T, out] outputs (fuzz35 #22, qwen3-0.6b
    # QDoRA all-linear s=4096: +6.1%; tiny llama with a 32k vocabulary, so the peak is at the loss: +0.75%)
    import dataclasses

    from .trace_helpers import peak_error

    spec = dataclasses.replace(TINY["llama"], vocab_size=32000)
    error = peak_error(spec, method="dora", quant="nf4", seq_len=512, precision="bf16", grad_ckpt="selective-op",
                       lora_targets="all-linear")
    assert abs(error) < 0.001, error


def test_selective_keeps_more_than_full_and_less_than_none():
    spec = TINY["qwen3"]
    layer = _layer()
    full = activations.layer_kept(spec, layer, GradCkpt.FULL, moe=False).per_token
    selective = activations.layer_kept(spec, layer, GradCkpt.SELECTIVE, moe=False).per_token
    none = activations.layer_kept(spec, layer, GradCkpt.NONE, moe=False).per_token
    assert full < selective < none


def test_offloaded_checkpointing_keeps_nothing_per_layer_and_puts_the_inputs_on_the_host():
    # transformers activation_checkpointing_enable(offload=True): the checkpoint runs under save_on_cpu, whose
    # only saved tensors are the layer inputs (2h bytes per token in bf16, one per layer)
    spec = TINY["llama"]
    layer = _layer(offload=True)
    assert activations.layer_kept(spec, layer, GradCkpt.FULL, moe=False).per_token == 0
    host = activations.offloaded_saved(spec, layer, GradCkpt.FULL)
    assert host.per_token == 2 * spec.hidden_size * spec.num_layers


def test_packing_masks_sdpa_but_not_flash():
    # transformers 5.24 masking_utils: packed position ids -> find_packed_sequence_indices -> a block-diagonal
    # 4-D mask for sdpa/eager; FlashAttention-2 uses flash_attn_varlen_func and gets no mask
    spec = TINY["llama"]
    assert activations.attention_masked(spec, 4096, Attention.SDPA, packing=True)
    assert not activations.attention_masked(spec, 4096, Attention.FLASH, packing=True)
    assert not activations.attention_masked(spec, 4096, Attention.SDPA, packing=False)



@pytest.mark.parametrize("stack, warned", [("hf", True), ("trl", True), ("torchtune", False)])
def test_the_dense_packing_mask_warning_names_only_stacks_that_build_one(stack, warned):
    # torchtune 0.6.1 padded_collate_packed attends a packed batch through flex attention's BlockMask (no [T, T]
    # mask); the stacks on transformers get masking_utils' block-diagonal mask under sdpa
    from vramcalc import estimate

    result = estimate(TINY["llama"], method="lora", stack=stack, packing=True, attn="sdpa", batch_size=2)
    assert any("block-diagonal" in text for text in result.warnings) is warned

@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("kernels", ["liger", "unsloth"])
def test_trace_refuses_triton_kernels_in_one_line(kernels):
    from vramcalc.errors import VramcalcError
    from vramcalc.tracing.runner import run_trace

    spec = TINY["llama"]
    with pytest.raises(VramcalcError, match="estimate only"):
        run_trace(spec, resolve_setup(spec, seq_len=64, kernels=kernels), progress=False)


def test_offloaded_rotary_tables_are_per_position_so_a_batch_of_pairs_estimates():
    # the device's rotary cos/sin are [1, s, d_rope] whatever the batch: offload without checkpointing frees them
    # once, not once per row (a reward model's chosen and rejected rows crashed with a negative activations term)
    from vramcalc import estimate, get_model

    for options in (dict(method="qlora", task="reward"), dict(method="lora", task="dpo"),
                    dict(method="lora", stack="trl", batch_size=4, seq_len=4096)):
        result = estimate(get_model("llama-3.1-8b"), activation_offload=True, grad_ckpt=False, **options)
        assert result.terms()["activations"] >= 0


@needs_torch
@pytest.mark.trace
def test_offloaded_lora_without_checkpointing_at_batch_4_is_within_1_percent_of_the_trace():
    from vramcalc import estimate, trace

    options = dict(method="lora", activation_offload=True, grad_ckpt=False, batch_size=4, seq_len=256)
    estimated = estimate(TINY["llama"], **options).peak_tensor_bytes
    traced = trace(TINY["llama"], **options).peak_tensor_bytes
    assert abs(estimated / traced - 1) < 0.01, (estimated, traced)
