"""The stacks' own decoders (``vramcalc/terms/stack_layers.py``): each trait changes the estimate where its source
line says and nowhere else. Golden numbers come from the formula next to each (bytes; the shapes of the small
Llama-style models of ``benchmarks/accuracy_stacks.py``); the estimate-vs-trace claims are in
``tests/test_trace_stacks.py`` and ``benchmarks/accuracy_stacks.md``."""

import pytest

import vramcalc as vc
from vramcalc.estimator import layer_setup, step_moments
from vramcalc.model import ModelSpec
from vramcalc.options import Phase, Stack
from vramcalc.terms import activations, stack_layers
from vramcalc.training_setup import resolve_setup

GQA = ModelSpec(name="stack-llama-gqa", family="llama", hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=2,
                head_dim=64, intermediate_size=1536, vocab_size=8192, max_position_embeddings=4096)
T = 1024  # tokens: batch 2, sequence 512


def _layer(stack: str, **options):
    return layer_setup(resolve_setup(GQA, stack=stack, batch_size=2, seq_len=512, **options))


@pytest.mark.parametrize("stack", [s for s in Stack if s not in (Stack.TORCHTUNE, Stack.LITGPT)])
def test_stacks_on_transformers_keep_transformers_layers(stack):
    assert stack_layers.stack_layers(stack) is stack_layers.HF


def test_torchtune_saves_kv_expanded_to_every_head_and_no_rotary_tables():
    """attention.py:285-291 (k, v copied to a = 8 heads: 2·c·(a - k)·d more per token) and position_embeddings.py
    (a cache buffer: no per-forward cos/sin, 2·c·d per token, nor int64 position ids, 8 per token)."""
    tune = activations.layer_saved(GQA, _layer("torchtune", method="lora", adapter_dtype="bf16"), False)
    hf = activations.layer_saved(GQA, _layer("hf", method="lora", precision="bf16-true", adapter_dtype="bf16"), False)
    assert tune.per_token - hf.per_token == 2 * 2 * (8 - 2) * 64
    layer = _layer("torchtune", method="lora")
    assert activations.shared_saved(GQA, layer.dtypes, layer.attn_used, False, layers=layer.layers).per_token == 0


def test_full_fine_tuning_norms_keep_their_fp32_product():
    """rms_norm.py:38-43 / litgpt model.py:1315-1322: the weight's gradient reads the fp32 x_normed (4h), not a
    16-bit y (2h): 2h more per norm, two norms per layer."""
    hf = activations.layer_saved(GQA, _layer("hf", method="full", precision="bf16-true"), False)
    tune = activations.layer_saved(GQA, _layer("torchtune", method="full"), False)
    assert tune.per_token - hf.per_token == 2 * (4 - 2) * 512 + 2 * 2 * (8 - 2) * 64


def test_torchtune_before_its_fp32_rms_norm_saves_the_16_bit_normed_input():
    """torchtune@1814feb17 modules/rms_norm.py:38-42: ``(x_fp32 * rsqrt(...)).type_as(x) * self.scale`` saves the
    16-bit x_normed for the weight's gradient (2h), as transformers does; #2054 (1450d6126) made it F.rms_norm on the
    fp32 input with the product in fp32 (4h): --no-norm-fp32-product is the older one, 2h less per norm."""
    hf = activations.layer_saved(GQA, _layer("hf", method="full", precision="bf16-true"), False)
    old = _layer("torchtune", method="full", norm_fp32_product=False)
    assert not old.layers.norm_fp32_product
    tune_old = activations.layer_saved(GQA, old, False)
    assert tune_old.per_token - hf.per_token == 2 * 2 * (8 - 2) * 64  # the expanded k and v only
    assert _layer("torchtune", method="full").layers.norm_fp32_product
    # transformers' layers have no fp32 product to turn off
    assert not _layer("hf", method="full", norm_fp32_product=False).layers.norm_fp32_product


@pytest.mark.parametrize("compiled", [False, True])
def test_torchtune_packed_rope_gathers_its_cache_per_call(compiled):
    """Llama3ScaledRoPE.forward (torchtune@1814feb17 and 0.6.1): ``rope_cache = self.cache[input_pos]`` with the
    packed batch's input_pos gathers an fp32 [b, s, 1, d/2, 2] copy (4·d bytes per token) for q and again for k, each
    saved by ``xshaped[..., i] * rope_cache[..., j]``; a compiled layer's graph gathers once for both (CSE).
    Unpacked, ``self.cache[:seq_len]`` is a view of the buffer."""
    options = dict(method="full", grad_ckpt="none", compile=compiled)
    packed = _layer("torchtune", packing=True, **options)
    unpacked = _layer("torchtune", packing=False, **options)
    assert packed.rope_gathered and not unpacked.rope_gathered
    delta = activations.layer_saved(GQA, packed, False).per_token - activations.layer_saved(GQA, unpacked, False).per_token
    assert delta == (1 if compiled else 2) * 4 * 64
    assert not _layer("hf", packing=True, **options).rope_gathered  # transformers' cos/sin per forward


def test_rope_buffers_are_weights_of_their_formula():
    """torchtune: fp32 cache [max_seq_len, d/2, 2] + theta [d/2]; litgpt: fp32 cos and sin [s, d]."""
    assert stack_layers.rope_buffer_bytes(GQA, stack_layers.TORCHTUNE, 512) == 4 * 4096 * 64 + 512
    assert stack_layers.rope_buffer_bytes(GQA, stack_layers.LITGPT, 512) == 2 * 4 * 512 * 64
    assert stack_layers.rope_buffer_bytes(GQA, stack_layers.HF, 512) == 0


def test_torchao_dequantization_is_fourteen_bytes_per_bf16_weight():
    """nf4_tensor.py:855-891: two int64 index halves (8n), two lookups, two scaled halves and the stacked weight
    (3·2n) at the largest decoder weight, the MLP's h·I; compiled: the weight only."""
    n = 512 * 1536
    assert stack_layers.nf4_dequant_bytes(GQA, 2) == 14 * n
    assert stack_layers.nf4_dequant_bytes(GQA, 2, compiled=True) == 2 * n


def test_litgpt_qlora_holds_the_stable_embedding_gradient_at_every_step_moment():
    """finetune/lora.py:218-228: a V·h bf16 gradient no optimizer frees, at every moment of the step."""
    resolved = resolve_setup(GQA, stack="litgpt", method="qlora", batch_size=2, seq_len=512)
    grad = 2 * 8192 * 512
    moments = [m for m in step_moments(GQA, resolved) if m.phase is not Phase.LOAD]
    assert all(m.gradients >= grad for m in moments)
    lora = resolve_setup(GQA, stack="litgpt", method="lora", batch_size=2, seq_len=512)
    assert min(m.gradients for m in step_moments(GQA, lora) if m.phase is Phase.FORWARD) == 0


def test_litgpt_lora_on_qkv_is_one_adapter():
    """lora.py LoRAQKVLinear: one dropout (mask h + output c·h) for q and v together, not one each, and B's output
    [T, a·d + k·d] kept by zero_pad (fewer than three slices enabled)."""
    lit = activations.layer_saved(GQA, _layer("litgpt", method="lora", lora_targets="qv", lora_rank=16,
                                              lora_dropout=0.1), False)
    hf_same = activations.layer_saved(GQA, _layer("hf", method="lora", precision="bf16-true", adapter_dtype="bf16",
                                                  lora_targets="qv", lora_rank=16, lora_dropout=0.1), False)
    # litgpt's attention differs from transformers' by: k and v expanded (2·2·(a - k)·d), the fused qkv's
    # contiguous y copy for o_proj is not saved (o_proj frozen), one dropout less (h + 2h), B's output (2·640)
    expected = 2 * 2 * (8 - 2) * 64 - (512 + 2 * 512) + 2 * (512 + 128)
    assert lit.per_token - hf_same.per_token == expected


def test_stack_traits_change_no_hf_estimate():
    for method in ("full", "lora", "qlora"):
        plain = vc.estimate(GQA, method=method, seq_len=512)
        stated = vc.estimate(GQA, method=method, seq_len=512, stack="hf")
        assert plain.terms() == stated.terms()


def test_torchtune_compiled_loss_saves_the_fp32_logits_its_unembed_returns():
    """transformer.py:651-661 ``self.output(h).float()`` runs eagerly; the compiled cross-entropy keeps its fp32
    input (4·T·V) and two fp32 values per row, not the bf16 logits transformers' model would hand it."""
    from vramcalc.options import Loss
    from vramcalc.terms import logits

    layer = _layer("torchtune", method="full", loss="hf", compile=True)
    tune = logits.logits_bytes(GQA, Loss.HF, layer.dtypes, T, compiled=True, fp32_logits=True)
    hf = logits.logits_bytes(GQA, Loss.HF, layer.dtypes, T, compiled=True)
    assert tune.saved == 4 * T * 8192 + 2 * 4 * T + 8 * T
    assert hf.saved == 2 * T * 8192 + 2 * 4 * T + 8 * T
    assert tune.backward_peak == tune.saved + 4 * T * 8192


def test_torchtune_packing_builds_no_dense_mask():
    """attention_utils.py packed_block_causal_mask: a BlockMask for flex attention, so a packed batch of b rows of s
    tokens costs what one unmasked row of b·s tokens does; transformers' sdpa path saves a [T, T] mask per layer."""
    packed = vc.estimate(GQA, stack="torchtune", method="lora", packing=True, batch_size=2, seq_len=512)
    one_row = vc.estimate(GQA, stack="torchtune", method="lora", batch_size=1, seq_len=1024)
    assert packed.terms()["activations"] == one_row.terms()["activations"]
    hf_packed = vc.estimate(GQA, method="lora", packing=True, batch_size=2, seq_len=512)
    hf_row = vc.estimate(GQA, method="lora", batch_size=1, seq_len=1024)
    assert hf_packed.terms()["activations"] > hf_row.terms()["activations"]


def test_litgpt_trains_its_own_lm_head_beside_a_tied_models_embedding():
    """litgpt's GPT has no tying: a tied checkpoint's embedding is copied into a separate lm_head
    (``scripts/convert_hf_checkpoint.py:205-206``). Llama-3.2-1B ties them (config.json ``tie_word_embeddings``), so
    full fine-tuning trains 128256 x 2048 more weights under litgpt than under transformers or torchtune."""
    lm_head = 128256 * 2048
    trained = {stack: vc.estimate("llama-3.2-1b", stack=stack, method="full").details["trainable_params"]
               for stack in ("hf", "torchtune", "litgpt")}
    assert trained["litgpt"] - trained["hf"] == lm_head
    assert trained["torchtune"] == trained["hf"]


def test_litgpts_bitsandbytes_plugin_quantizes_falcons_linears_which_transformers_leaves_16_bit():
    """transformers' ``replace_with_bnb_linear`` takes ``type(module) is nn.Linear``, so Falcon's ``FalconLinear``
    stays bf16; litgpt builds Falcon from plain ``torch.nn.Linear``, which Lightning's ``BitsandbytesPrecision``
    quantizes. Falcon-7B's decoder Linears hold 32 x 4544 x (4672 + 4544 + 2 x 18176) weights: 16 bits under the hf
    stack, 4 bits (plus quantization statistics) under litgpt."""
    linear_weights = 32 * 4544 * (4672 + 4544 + 2 * 18176)
    weights = {stack: vc.estimate("falcon-7b", method="qlora", stack=stack, seq_len=512).terms()["weights"]
               for stack in ("hf", "litgpt")}
    saved = weights["hf"] - weights["litgpt"]
    # 2 B -> 0.5 B per weight, less the absmax statistics, plus litgpt's own untied lm_head (65024 x 4544)
    lm_head = 65024 * 4544
    assert 1.4 * linear_weights < saved + lm_head * 0.5 < 1.55 * linear_weights
