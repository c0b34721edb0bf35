"""ModelSpec: the architecture of a decoder LLM, and the exact inventory of its parameter tensors.

The inventory mirrors the transformers v5 modules of each family (``models/<family>/modeling_<family>.py``):
which tensors exist, their shapes, which are ``nn.Linear`` (what LoRA can target and bitsandbytes can quantize),
which are 3-D expert tensors (v5 ``*Experts`` modules: not nn.Linear, so bitsandbytes does not reach them, nor
LoRA ``all-linear`` but on the families peft 0.21 converts onto their fused experts, terms/moe_lora.py),
and which stay fp32 whatever the load dtype. Symbols: h hidden, L layers, a heads, k kv heads, d head_dim,
I intermediate, V vocab, E experts, K experts per token, I_m expert width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import TYPE_CHECKING

from .errors import VramcalcError

if TYPE_CHECKING:
    from .vision import VisionSpec


class ParamKind(str, Enum):
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    LINEAR = "linear"  # nn.Linear weight or bias inside a decoder layer
    EXPERTS = "experts"  # 3-D nn.Parameter of a v5 *Experts module
    ROUTER = "router"  # MoE gate weight (not an nn.Linear in v5) and its score-correction buffer
    NORM = "norm"  # RMSNorm weight, LayerNorm weight and bias


@dataclass(frozen=True)
class ParamTensor:
    """``count`` tensors of one shape (one per layer that has it)."""

    name: str
    kind: ParamKind
    shape: tuple[int, ...]
    count: int = 1
    keep_fp32: bool = False  # _keep_in_fp32_modules_strict: stays fp32 in a bf16 model
    scope: str = "model"  # model (once) | layer (every decoder layer) | dense | moe (layers of that kind)

    @functools.cached_property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def total_numel(self) -> int:
        return self.numel * self.count


@dataclass(frozen=True)
class LinearModule:
    """``count`` nn.Linear modules named ``name`` (the peft target name), weight [out, in]."""

    name: str
    in_features: int
    out_features: int
    count: int
    bias: bool = False
    role: str = "attention"  # attention | mlp | shared_expert

    @property
    def scope(self) -> str:
        return {"attention": "layer", "mlp": "dense", "shared_expert": "moe"}[self.role]

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class FamilyTraits:
    """What a transformers model family does that its config does not say."""

    norms_per_layer: int = 2
    fused_qkv: bool = False  # Phi-3: one qkv_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj
    qkv_bias: bool = False  # Qwen2: q/k/v carry biases although the config has no attention_bias key
    qk_norm: bool = False  # Qwen3: RMSNorm(d) on q and k
    mla: bool = False  # DeepSeek-V3 multi-head latent attention
    supports_sdpa: bool = True  # False: transformers silently falls back to eager attention
    # the transformers release that stopped running the family on SDPA: before it ``--attn sdpa`` was honoured
    sdpa_dropped_in: str = ""
    logit_softcap: bool = False  # Gemma-2 final_logit_softcapping
    moe: bool = False
    router_fp32: bool = False  # DeepSeek-V3 keeps gate.weight and e_score_correction_bias in fp32
    default_tied: bool = False
    lora_qv: tuple[str, ...] = ("q_proj", "v_proj")  # the modules "qv" means in this family
    # Layer layouts other than Llama's (phi, gpt_neox, falcon, qwen): see ``LAYOUTS`` for the module names
    layer_norm: bool = False  # nn.LayerNorm with weight and bias instead of RMSNorm
    gemma_norm: bool = False  # GemmaRMSNorm: (x * rsqrt) * (1 + w) in fp32, then cast (saves its fp32 output);
    # Olmo2RMSNorm's (w * y).to(input dtype) saves the same tensors
    pre_norms: bool = True  # False: no input_layernorm nor pre-MLP norm; the Linears read the residual (olmo2)
    post_norms: bool = False  # a norm on the attention output and one on the MLP output (gemma2, olmo2)
    rope_fp32: bool = False  # the rotary embedding returns fp32 cos and sin, not the hidden dtype (olmo2)
    embedding_multiplier: bool = False  # the embedding's output is scaled after embed_tokens' forward (granite)
    qk_norm_whole: bool = False  # q_norm, k_norm over the whole projection width a·d, k·d (olmo2), not per head
    parallel_block: bool = False  # attention and MLP both read the layer input; one residual add (GPT-J style)
    gated_mlp: bool = True  # False: fc1 -> GELU -> fc2 (two Linears, both with bias)
    lm_head_bias: bool = False  # Phi-1/2: lm_head = nn.Linear(h, V, bias=True)
    # the module names peft matches (``modules_to_save``, ``target_modules``) for the input embedding and the output
    # layer: GPT-NeoX ``embed_in`` (modeling_gpt_neox.py:298), Falcon ``word_embeddings`` (modeling_falcon.py:480),
    # Qwen v1 ``transformer.wte`` (remote modeling_qwen.py); lm_head in every family transformers 5.25 builds
    embedding_name: str = "embed_tokens"
    head_name: str = "lm_head"
    traceable: bool = True  # False: transformers has no class for it (remote code only); estimate only
    bnb_quantizable: bool = True  # False: its Linears subclass nn.Linear, which bitsandbytes loading leaves 16-bit
    always_masked: bool = False  # sdpa and eager always get a 4-D causal mask (``allow_is_causal_skip=False``)
    # peft target names of the projections: one fused qkv name is [h, (a + 2k)·d]; two gated MLP names are a fused
    # gate_up [h, 2I] and down, three are gate, up, down; two plain MLP names (gated_mlp False) are up and down
    qkv_names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    o_name: str = "o_proj"
    mlp_names: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    rope_per_layer_kind: bool = False  # one rotary table per layer kind in use (gemma3_text), else one table
    # apply_rotary_pos_emb makes new interleaved cos and sin in every layer (cos[..., :d/2].repeat_interleave(2)),
    # which the q·cos and rotate_half(q)·sin products save (glm4, ernie4_5)
    rope_copies_per_layer: bool = False
    # Cohere2LayerNorm: the fp32 ``x - mean`` is computed twice (pow's input and the product's), and the fp32 copy of
    # a 16-bit weight is saved by the weight product (cohere2)
    centered_norm: bool = False
    # MoE layouts beyond Mixtral's, Qwen3-MoE's and DeepSeek-V3's (issue 13)
    shared_expert_prefix: str = "shared_experts."  # peft name prefix of the shared expert's Linears
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared_expert(x), Linear(h, 1)
    router_score_bias: bool = True  # with router_fp32: DeepSeek-V3's e_score_correction_bias buffer (not V2's)
    rope_complex: bool = False  # RoPE by complex multiply: fp32 q/k copies and complex64 freqs_cis (DeepSeek-V2, Llama-4)
    attention_sinks: bool = False  # gpt-oss: a learned sink logit per head (self_attn.sinks [a]) joins the softmax
    moe_biases: bool = False  # gpt-oss: the router and both expert projections carry biases
    clamped_swiglu: bool = False  # gpt-oss: interleaved gate/up, clamped, gate * sigmoid(alpha * gate) * (up + 1)
    rope_half_table: bool = False  # cos/sin of width d/2, rotating two halves (gpt-oss _apply_rotary_emb)
    dense_experts: bool = False  # Llama-4: every token runs through every expert (bmm), scaled by sigmoid scores
    weightless_qk_norm: bool = False  # Llama-4: an L2 norm without weight on q and k (when the config's qk_norm)
    softmax_in_dtype: bool = False  # eager softmax without dtype=fp32: in the scores' (+ mask's) dtype (Llama-4)
    # a hybrid model: the layers whose ``layer_types`` entry is "conv" run a gated short convolution instead of
    # attention (LFM2's Lfm2ShortConv: in_proj [h, 3h], a depthwise Conv1d of conv_kernel taps, out_proj [h, h])
    short_conv: bool = False
    # False: the model computes its own loss on lm_head's output as it comes, a plain CrossEntropyLoss on a shifted
    # contiguous copy with no ``.float()`` (remote code that predates transformers' ForCausalLMLoss: Qwen v1)
    loss_upcasts: bool = True
    # 2022-era layouts (opt, bloom, gptj)
    learned_positions: bool = False  # OPT: a learned [max_position_embeddings + 2, h] position table added to embeds
    embedding_norm: bool = False  # BLOOM: a LayerNorm (weight, bias) on the token embedding before the first layer
    # BLOOM's own attention (no attention interface, eager only): reshape copies of q, k, v, ALiBi by baddbmm, the
    # fp32 softmax cast back, bmm with v, a merge-heads copy of the output
    alibi: bool = False
    # GPT-J: one [1, s, rotary_dim] sin|cos table per forward; apply_rotary_pos_emb repeat-interleaves sin and cos for
    # q and again for k (four [1, s, 1, rotary_dim] copies per layer)
    rope_copies_per_projection: bool = False
    eager_fp32_scores: bool = False  # GPT-J eager: q and k cast to fp32 before the scores matmul, softmax in fp32
    # a bidirectional encoder trained as a sequence classifier (BERT, ``--task classify``): word, learned position
    # and token-type embeddings summed, LayerNorm and dropout; post-LN layers, LayerNorm(x + dropout(sublayer)), so
    # the residual stream is each norm's output and there is no final norm; no causal mask; the model's dropouts
    # (``ModelSpec.hidden_dropout``, ``attention_dropout``) as its config sets them; a pooler (dense + tanh on the
    # first token), dropout and a biased classifier Linear(h, num_labels) in place of lm_head (``terms/encoder.py``)
    encoder: bool = False


FAMILIES: dict[str, FamilyTraits] = {
    # models/llama/modeling_llama.py
    "llama": FamilyTraits(),
    # models/mistral/modeling_mistral.py (Llama layout)
    "mistral": FamilyTraits(),
    # models/mixtral/modeling_mixtral.py: MixtralTopKRouter + MixtralExperts (3-D gate_up_proj, down_proj)
    "mixtral": FamilyTraits(moe=True),
    # models/qwen2/modeling_qwen2.py L181-184: q/k/v bias=True, o bias=False
    "qwen2": FamilyTraits(qkv_bias=True),
    # models/qwen3/modeling_qwen3.py: q_norm, k_norm
    "qwen3": FamilyTraits(qk_norm=True),
    # models/qwen3_moe/modeling_qwen3_moe.py: no shared expert
    "qwen3_moe": FamilyTraits(qk_norm=True, moe=True),
    # models/gemma2/modeling_gemma2.py: 4 norms, tied, _supports_sdpa = False, final logit softcap. 4.42 to 5.20 had
    # _supports_sdpa = True (SDPA without the attention softcap; 4.45-4.47 defaulted to eager unless asked, 4.48-5.20
    # defaulted to SDPA: the wheels' modeling_gemma2.py); 5.21 set it False
    "gemma2": FamilyTraits(norms_per_layer=4, supports_sdpa=False, sdpa_dropped_in="5.21", logit_softcap=True,
                           default_tied=True, post_norms=True),
    # models/phi3/modeling_phi3.py: fused qkv_proj and gate_up_proj
    "phi3": FamilyTraits(fused_qkv=True, fused_gate_up=True, lora_qv=("qkv_proj",), qkv_names=("qkv_proj",),
                         mlp_names=("gate_up_proj", "down_proj")),
    # models/deepseek_v3/modeling_deepseek_v3.py: MLA + routed/shared experts, first_k_dense_replace dense layers
    "deepseek_v3": FamilyTraits(mla=True, moe=True, router_fp32=True, lora_qv=("q_b_proj", "kv_b_proj")),
    # models/gemma/modeling_gemma.py: Llama layout with GemmaRMSNorm (L64-78, (1 + w) in fp32), GeGLU GemmaMLP
    # (L84-97), embedding scaled by sqrt(h) (L50-61, L103-105), lm_head tied (GemmaConfig.tie_word_embeddings=True)
    "gemma": FamilyTraits(gemma_norm=True, default_tied=True),
    # models/phi/modeling_phi.py: q/k/v_proj and dense with bias (L164-167), fc1 -> gelu_new -> fc2 (L238-250), one
    # nn.LayerNorm feeding attention and MLP in parallel (L253-290), final_layernorm, lm_head with bias (L400)
    "phi": FamilyTraits(norms_per_layer=1, layer_norm=True, parallel_block=True, gated_mlp=False, lm_head_bias=True,
                        o_name="dense", mlp_names=("fc1", "fc2")),
    # models/gpt_neox/modeling_gpt_neox.py: fused query_key_value [b, s, a, 3d] (L181, L195-196), dense, two
    # LayerNorms both on the layer input and one residual add (use_parallel_residual, L249-263), GELU MLP (L38-49)
    "gpt_neox": FamilyTraits(layer_norm=True, parallel_block=True, gated_mlp=False, fused_qkv=True,
                             lora_qv=("query_key_value",),
                             qkv_names=("query_key_value",), o_name="dense",
                             mlp_names=("dense_h_to_4h", "dense_4h_to_h"), embedding_name="embed_in"),
    # models/falcon/modeling_falcon.py (transformers 5.25): fused query_key_value split into q, k, v views
    # (FalconAttention.forward L295-305), the shared attention interface (L319-329), dense, GELU MLP (L341-355); one
    # LayerNorm (input_layernorm) or, with new_decoder_architecture, ln_attn and ln_mlp (L371-382); parallel_attn;
    # FalconModel.forward always builds the 4-D mask (create_causal_mask(..., allow_is_causal_skip=False), L573-581)
    "falcon": FamilyTraits(norms_per_layer=1, layer_norm=True, parallel_block=True, gated_mlp=False, fused_qkv=True,
                           default_tied=True, bnb_quantizable=False, always_masked=True, lora_qv=("query_key_value",),
                           qkv_names=("query_key_value",), o_name="dense",
                           mlp_names=("dense_h_to_4h", "dense_4h_to_h"), embedding_name="word_embeddings"),
    # models/olmo2/modeling_olmo2.py (transformers 5.25): Llama projections and MLP; q_norm, k_norm are
    # Olmo2RMSNorm(a·d), (k·d) on the whole q_proj, k_proj outputs (L209-210, L224-225); no input norm: the layer
    # normalises the attention and MLP outputs (post_attention_layernorm, post_feedforward_layernorm, L281-282,
    # L295-312); Olmo2RMSNorm returns (w * y).to(input dtype) (L58-63); Olmo2RotaryEmbedding returns fp32 cos, sin
    # (L105-110; apply_rotary_pos_emb casts q, k back); untied (configuration_olmo2.py L82)
    "olmo2": FamilyTraits(qk_norm=True, qk_norm_whole=True, pre_norms=False, post_norms=True, gemma_norm=True,
                          rope_fp32=True),
    # models/granite/modeling_granite.py (transformers 5.25): Llama's modules (L115-228); embedding_multiplier (L388),
    # residual_multiplier (L275, L280) and logits_scaling (L489) multiply by Python scalars, which save no tensor
    # (a transient copy only, below the peak), and attention_multiplier is SDPA's scale (L124, L174)
    "granite": FamilyTraits(embedding_multiplier=True),
    # models/starcoder2/modeling_starcoder2.py (transformers 5.25): q/k/v/o_proj with bias=use_bias (L153-156), two
    # nn.LayerNorm with bias before attention and MLP, sequential residuals (L212-244), c_fc -> gelu_pytorch_tanh ->
    # c_proj with bias (L53-66), final nn.LayerNorm (L323), tied (configuration_starcoder2.py L80); sliding window
    # through the mask (L358); dropouts default to 0 (a no-op: ATen ``dropout`` returns its input for p = 0)
    "starcoder2": FamilyTraits(layer_norm=True, gated_mlp=False, default_tied=True, mlp_names=("c_fc", "c_proj")),
    # models/smollm3/modeling_smollm3.py (transformers 5.25): Llama's modules (L166-280); layers whose
    # no_rope_layers entry is 0 skip RoPE (L192, L215-217): SDPA then saves views of the q_proj and k_proj outputs
    # instead of the rotated copies, the same bytes; tied (configuration_smollm3.py L94)
    "smollm3": FamilyTraits(default_tied=True),
    # models/gemma3/modeling_gemma3.py (transformers 5.25): Gemma3RMSNorm (x * rsqrt) * (1 + w) in fp32, then
    # type_as(x) (L119-133); q_norm, k_norm per head (L310-311, L329-330); input, post_attention,
    # pre_feedforward and post_feedforward norms (L367-400); embedding scaled inside Gemma3TextScaledWordEmbedding
    # (L89-100); sliding and full layers (config.layer_types), one rotary table and one mask per kind (L527-534);
    # supports sdpa (L413); tied (configuration_gemma3.py L88)
    "gemma3_text": FamilyTraits(norms_per_layer=4, post_norms=True, qk_norm=True, gemma_norm=True, default_tied=True,
                                rope_per_layer_kind=True),
    # models/glm4/modeling_glm4.py (transformers 5.25): q/k/v_proj with bias=attention_bias, o_proj without
    # (L211-220); Glm4MLP fused gate_up_proj, chunk, up * silu(gate) (L49-64); input_layernorm, post_self_attn,
    # post_attention (pre-MLP) and post_mlp norms (L74-77, L90-110), Llama's RMSNorm (L313-328); partial rotary
    # (partial_rotary_factor 0.5, configuration_glm4.py L76) with cos and sin interleaved per layer and q, k
    # concatenated back (apply_rotary_pos_emb L179-195); untied (configuration_glm4.py L68)
    "glm4": FamilyTraits(norms_per_layer=4, post_norms=True, fused_gate_up=True, rope_copies_per_layer=True,
                         mlp_names=("gate_up_proj", "down_proj")),
    # models/cohere2/modeling_cohere2.py (transformers 5.25): one Cohere2LayerNorm (no bias; fp32 x - mean, rsqrt,
    # fp32 weight product, cast back: L88-102) feeding attention and a SwiGLU MLP in parallel, one residual add
    # (L300-313); q/k/v/o with bias=attention_bias (L192-203); RoPE (fp32 q, k, cast back, L168-175) only in
    # sliding layers (L222-223); one rotary table (L42-85) and a full and a sliding mask (L387-390); logits *
    # logit_scale, a Python scalar (L476); tied (configuration_cohere2.py L80)
    "cohere2": FamilyTraits(norms_per_layer=1, parallel_block=True, gemma_norm=True, centered_norm=True,
                            default_tied=True),
    # models/ernie4_5/modeling_ernie4_5.py (transformers 5.25): Llama's modules with bias=use_bias on every Linear
    # (L97-99, L199-202); the rotary embedding returns fp32 cos and sin (L80-87) and apply_rotary_pos_emb
    # interleaves them per layer, rotates q and k in fp32 and casts back (L151-182); tied (configuration L77)
    "ernie4_5": FamilyTraits(default_tied=True, rope_fp32=True, rope_copies_per_layer=True),
    # models/opt/modeling_opt.py (transformers 5.25): OPTLearnedPositionalEmbedding of max_position_embeddings + 2
    # rows (offset 2, L46-71) added to embed_tokens' output (L375); q/k/v/out_proj with bias=enable_bias, q scaled by
    # head_dim**-0.5 after q_proj (L124-153); self_attn_layer_norm and final_layer_norm, nn.LayerNorm with bias,
    # before attention and MLP (do_layer_norm_before), sequential residuals; fc1 -> ReLU -> fc2 with bias (L186-238);
    # final_layer_norm; tied (L452, configuration_opt.py L73); sdpa, flash and eager (L266-267). opt-350m's
    # post-norm layout with project_in/out is refused (hf_config.py)
    "opt": FamilyTraits(layer_norm=True, gated_mlp=False, default_tied=True, learned_positions=True,
                        o_name="out_proj", mlp_names=("fc1", "fc2")),
    # models/bloom/modeling_bloom.py (transformers 5.25): word_embeddings, then word_embeddings_layernorm (L500);
    # BloomAttention (L167-311): fused query_key_value [b, s, a, 3, d] with bias, reshape copies of q, k, v, scores =
    # alibi.baddbmm(q, kᵀ), + the 4-D mask, fp32 softmax cast back, bmm with v, _merge_heads copy, dense with bias,
    # dropout_add; BloomMLP dense_h_to_4h -> GeLUFunction (saves its input) -> dense_4h_to_h (L142-164, L314-342);
    # input_layernorm and post_attention_layernorm, sequential residuals (L345-400); ln_f; tied (L565); no
    # _supports_sdpa or _supports_flash_attn: eager only
    "bloom": FamilyTraits(layer_norm=True, gated_mlp=False, fused_qkv=True, default_tied=True, supports_sdpa=False,
                          embedding_norm=True, alibi=True, lora_qv=("query_key_value",),
                          qkv_names=("query_key_value",), o_name="dense",
                          mlp_names=("dense_h_to_4h", "dense_4h_to_h"), embedding_name="word_embeddings"),
    # models/gptj/modeling_gptj.py (transformers 5.25): one nn.LayerNorm ln_1 feeding attention and MLP in parallel,
    # attn + mlp + x (GPTJBlock L209-239); q/k/v/out_proj without bias (L124-127); partial interleaved rotary on the
    # first rotary_dim of each head, from a fp32 sin|cos buffer indexed per forward and cast to the hidden dtype
    # (L46-62), with sin and cos repeat-interleaved for k and again for q (L74-77, L143-153), q and k concatenated
    # back; eager casts q and k to fp32 (L91); fc_in -> gelu_new -> fc_out with bias (L191-206); ln_f; lm_head with
    # bias, untied (L375, configuration_gptj.py L84); sdpa, flash and eager (L248-249)
    "gptj": FamilyTraits(norms_per_layer=1, layer_norm=True, parallel_block=True, gated_mlp=False, lm_head_bias=True,
                         rope_copies_per_projection=True, eager_fp32_scores=True, o_name="out_proj",
                         mlp_names=("fc_in", "fc_out"), embedding_name="wte"),
    # Qwen v1 (remote code ``modeling_qwen.py`` of Qwen/Qwen-7B, QWenLMHeadModel; no transformers class): fused
    # c_attn with bias, attn.c_proj without, RMSNorm ln_1/ln_2/ln_f, QWenMLP a1 = w1(x), a2 = w2(x),
    # mlp.c_proj(a1 * silu(a2)) with w1, w2: h -> intermediate_size / 2; lm_head untied. QWenLMHeadModel.forward
    # computes ``CrossEntropyLoss()(lm_logits[..., :-1, :].contiguous().view(-1, V), ...)`` with no upcast
    # (modeling_qwen.py, read in the code-corpus copy id 29119010094 of the Hub file)
    "qwen": FamilyTraits(fused_qkv=True, qkv_bias=True, lora_qv=("c_attn",), traceable=False, qkv_names=("c_attn",),
                         o_name="attn.c_proj", mlp_names=("w1", "w2", "mlp.c_proj"), loss_upcasts=False,
                         embedding_name="wte"),
    # models/qwen2_moe/modeling_qwen2_moe.py (transformers 5.25): q/k/v with bias=config.qkv_bias (default True), o
    # without (L222-225); Qwen2MoeTopKRouter (a 2-D weight, not an nn.Linear, L311-329) and Qwen2MoeExperts (3-D
    # gate_up_proj, down_proj, L271-282); a shared expert Qwen2MoeMLP of shared_expert_intermediate_size and its
    # gate nn.Linear(h, 1): sigmoid(shared_expert_gate(x)) * shared_expert(x) (L332-351); MoE where not in
    # mlp_only_layers and (i + 1) % decoder_sparse_step == 0 (L358-363); untied
    "qwen2_moe": FamilyTraits(qkv_bias=True, moe=True, shared_expert_prefix="shared_expert.",
                              shared_expert_gate=True),
    # models/deepseek_v2/modeling_deepseek_v2.py (transformers 5.25): DeepSeek-V3's MLA (DeepseekV2Attention,
    # L300-400) and layout (first_k_dense_replace dense layers, shared_experts, L405-412); the router keeps an fp32
    # gate.weight (_keep_in_fp32_modules_strict, L467) with softmax scores and no e_score_correction_bias (L91-124);
    # RoPE multiplies complex fp32 copies of q_pe, k_pe by a complex64 freqs_cis (apply_rotary_emb L258-271)
    "deepseek_v2": FamilyTraits(mla=True, moe=True, router_fp32=True, router_score_bias=False, rope_complex=True,
                                lora_qv=("q_b_proj", "kv_b_proj")),
    # models/gpt_oss/modeling_gpt_oss.py (transformers 5.25): q/k/v/o with bias=attention_bias (L270-281) and a
    # learned sink logit per head (L283) concatenated to the scores before an in-dtype softmax
    # (eager_attention_forward L225-253); _supports_sdpa = False (L378): sdpa falls back to eager; GptOssRMSNorm
    # returns (w * y).to(input dtype) (L56-61); every layer is MoE: GptOssTopKRouter with a bias, top-k of the
    # logits then softmax (L116-129), GptOssExperts with biases and a clamped SwiGLU on interleaved gate/up
    # (L67-113); one rotary table of width d/2 (L184-190, L205-222) for sliding and full layers (config.layer_types)
    "gpt_oss": FamilyTraits(moe=True, supports_sdpa=False, gemma_norm=True, attention_sinks=True, moe_biases=True,
                            clamped_swiglu=True, rope_half_table=True),
    # models/llama4/modeling_llama4.py (transformers 5.25), the text model: Llama4TextMoe (L159-177) on the layers
    # of config.moe_layers, Llama4TextMLP of intermediate_size_mlp on the others (L403-407); its router is an
    # nn.Linear subclass (L145-156: top-k, scatter, fp32 sigmoid), every token is repeated to every expert and
    # scaled by its score before a bmm (Llama4TextExperts L55-84), plus a shared expert of intermediate_size; q/k
    # weightless L2 norm on RoPE layers when use_qk_norm (L334-335, L358-360); RoPE by complex multiply (L228-237),
    # one freqs_cis; NoPE layers (no_rope_layers) scale q by a temperature (L363-370); chunked attention through
    # the mask (layer_types, L544-550); _supports_flash_attn False (L453)
    "llama4_text": FamilyTraits(moe=True, rope_complex=True, shared_expert_prefix="shared_expert.",
                                dense_experts=True, weightless_qk_norm=True, softmax_in_dtype=True),
    # models/lfm2/modeling_lfm2.py (transformers 5.25): a hybrid of attention and gated short-convolution layers
    # (Lfm2DecoderLayer L418-461: config.layer_types "full_attention" or "conv"); Lfm2Attention q/k/v_proj, out_proj
    # without bias and per-head q_layernorm, k_layernorm (L213-218, L232-233); Lfm2ShortConv in_proj [h, 3h],
    # depthwise nn.Conv1d(h, h, conv_L_cache, groups=h), out_proj [h, h], biases with conv_bias (L383-392); SwiGLU
    # Lfm2MLP w2(silu(w1(x)) * w3(x)) (L111-128); operator_norm, ffn_norm (L428-429) and a final embedding_norm
    # (L495); Llama's RMSNorm (L54-59) and rotary embedding; tied (configuration_lfm2.py L71). The attention and
    # convolution out_proj share a name: peft's suffix match on "out_proj" reaches both, so the inventory names them
    # by their parent module
    "lfm2": FamilyTraits(qk_norm=True, default_tied=True, short_conv=True, o_name="self_attn.out_proj",
                         mlp_names=("w1", "w3", "w2")),
    # models/bert/modeling_bert.py (transformers 5.25; the same modules in 4.16-4.24): BertEmbeddings word +
    # token_type + position embeddings, LayerNorm, dropout (L54-109); eager_attention_forward's softmax without a
    # dtype and dropout on the probabilities (L112-137); BertSelfAttention query/key/value with bias (L140-205);
    # BertSelfOutput and BertOutput dense -> dropout -> LayerNorm(x + input) (L283-294, L342-353); BertIntermediate
    # dense -> GELU (L327-339); BertPooler dense + tanh on the first token (L455-467); BertForSequenceClassification
    # dropout and a classifier nn.Linear(h, num_labels) with bias, CrossEntropyLoss (L1074-1145); sdpa, flash and
    # eager (L540-541). Module names are the parameters' suffixes: "dense" alone would name three Linears
    "bert": FamilyTraits(layer_norm=True, gated_mlp=False, pre_norms=False, encoder=True,
                         lora_qv=("query", "value"), qkv_names=("query", "key", "value"),
                         o_name="attention.output.dense", mlp_names=("intermediate.dense", "output.dense"),
                         embedding_name="word_embeddings", head_name="classifier"),
}

SUPPORTED_FAMILIES = tuple(FAMILIES)
# OPTLearnedPositionalEmbedding: "if padding_idx is specified then offset the embedding ids by 2 and adjust
# num_embeddings appropriately" (transformers 5.25 modeling_opt.py L52-55)
OPT_POSITION_OFFSET = 2

# Families with sliding and full layers: without ``layer_types`` every n-th layer is full, the rest slide
# (``sliding_window_pattern``: configuration_gemma3.py L104-111, configuration_cohere2.py L95-101)
SLIDING_WINDOW_PATTERN: dict[str, int] = {"gemma3_text": 6, "cohere2": 4}


def default_layer_types(family: str, num_layers: int, pattern: int | None = None) -> tuple[str, ...]:
    """Layer kinds of a family that mixes sliding and full layers when its config lists none: layer i is full when
    (i + 1) % pattern == 0 (the family's default pattern unless given); () for other families."""
    pattern = pattern or SLIDING_WINDOW_PATTERN.get(family)
    if not pattern:
        return ()
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))

# Upper bounds on architecture sizes, under HF config names: about 64x the largest published decoder LLM in each
# field (hidden 16,384 and 126 layers in Llama-3.1-405B; 128 heads; head_dim 256 in Gemma-2; intermediate 53,248 in
# Llama-3.1-405B; vocab 262,144 in Gemma-3; 512 experts in Qwen3-Next). A config past them is a typo, not a model,
# and refusing it keeps every estimate fast (the estimate loops over layers: 10**12 layers would hang it) and every
# byte count small enough for the int64 arithmetic of the numpy grid and of torch in the trace.
MAX_SIZES: dict[str, int] = {
    "hidden_size": 2**20,
    "num_hidden_layers": 2**13,
    "num_attention_heads": 2**13,
    "num_key_value_heads": 2**13,
    "head_dim": 2**14,
    "intermediate_size": 2**22,
    "vocab_size": 2**24,
    "num_local_experts": 2**15,
    "num_experts": 2**15,
    "n_routed_experts": 2**15,
    "num_experts_per_tok": 2**15,
    "moe_intermediate_size": 2**22,
    "n_shared_experts": 2**10,
    "first_k_dense_replace": 2**13,
    "decoder_sparse_step": 2**13,
    "q_lora_rank": 2**20,
    "kv_lora_rank": 2**20,
    "qk_nope_head_dim": 2**14,
    "qk_rope_head_dim": 2**14,
    "v_head_dim": 2**14,
    "shared_expert_intermediate_size": 2**22,
    "conv_L_cache": 2**10,  # LFM2's short convolution: 3 taps
}
# ModelSpec field -> its HF config name, for the checks in ModelSpec.__post_init__
_SIZE_FIELDS = (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
                ("head_dim", "head_dim"), ("intermediate_size", "intermediate_size"), ("vocab_size", "vocab_size"),
                ("num_experts", "num_experts"), ("experts_per_token", "num_experts_per_tok"),
                ("moe_intermediate_size", "moe_intermediate_size"), ("n_shared_experts", "n_shared_experts"),
                ("first_k_dense_replace", "first_k_dense_replace"), ("decoder_sparse_step", "decoder_sparse_step"),
                ("q_lora_rank", "q_lora_rank"), ("kv_lora_rank", "kv_lora_rank"),
                ("qk_nope_head_dim", "qk_nope_head_dim"), ("qk_rope_head_dim", "qk_rope_head_dim"),
                ("v_head_dim", "v_head_dim"), ("shared_expert_intermediate_size", "shared_expert_intermediate_size"))
_POSITIVE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size")


def cached_field_hash(self) -> int:
    """``__hash__`` for frozen dataclasses used as cache keys: the hash of the compared fields, computed once per
    instance (a catalogue model or a resolved setup is looked up many times per estimate). Not pickled: string
    hashes differ between processes."""
    try:
        return self.__dict__["_field_hash"]
    except KeyError:
        cached = hash(tuple(getattr(self, f.name) for f in fields(self) if f.compare))
        object.__setattr__(self, "_field_hash", cached)
        return cached


def state_without_hash(self) -> dict:
    """``__getstate__`` to go with ``cached_field_hash``: pickle the fields, not the process-local hash."""
    return {key: value for key, value in self.__dict__.items() if key != "_field_hash"}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture fields (HF config names in comments) plus catalogue metadata."""

    name: str
    family: str  # model_type
    hidden_size: int
    num_layers: int  # num_hidden_layers
    num_heads: int  # num_attention_heads
    num_kv_heads: int  # num_key_value_heads
    head_dim: int  # config.head_dim when set, else hidden_size // num_heads
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None
    qkv_bias: bool = False  # bias on q, k, v (Qwen2 always; Llama when attention_bias)
    o_bias: bool = False  # bias on o_proj (Llama attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm(head_dim) on q and k (Qwen3)
    sliding_window: int | None = None
    # MoE
    num_experts: int = 0  # num_local_experts (Mixtral) / num_experts (Qwen) / n_routed_experts (DeepSeek)
    experts_per_token: int = 0  # num_experts_per_tok
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # MLA
    q_lora_rank: int = 0  # 0: a plain q_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # partial rotary and Falcon's layout
    rotary_dim: int = 0  # rotary width per head (phi partial_rotary_factor, gpt_neox rotary_pct); 0: all of head_dim
    new_decoder_architecture: bool = False  # falcon: grouped kv heads and two LayerNorms (ln_attn, ln_mlp) per layer
    layer_types: tuple[str, ...] = ()  # gemma3_text: "sliding_attention" or "full_attention" per layer
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert width; 0: moe_intermediate_size · n_shared
    nope_layers: tuple[int, ...] = ()  # Llama-4: layers without RoPE (no_rope_layers entry 0), hence no q/k norm
    score_labels: int = 0  # AutoModelForSequenceClassification's num_labels (``reward_spec``); 0: the causal LM
    # built by a stack from its own plain torch.nn modules (``stack_layers.built_model``: litgpt), not transformers':
    # every Linear is quantizable and no family's always-built mask applies (``bnb_quantizable``, ``always_masked``)
    plain_modules: bool = False
    vision: "VisionSpec | None" = None  # a vision-language model's tower and projector (``vision.py``); None: text only
    # LFM2's short convolution (the "conv" entries of layer_types): conv_L_cache taps, conv_bias
    conv_kernel: int = 0
    conv_bias: bool = False
    # an encoder (``FamilyTraits.encoder``: BERT): token-type rows, and the dropout probabilities of the hidden states
    # (embeddings, each sublayer's output, the classifier's input) and of the attention probabilities
    type_vocab_size: int = 0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # catalogue metadata (not architecture)
    hf_repo: str = ""
    license: str = ""
    source: str = ""
    params_published: int | None = None
    active_params_published: int | None = None
    params_exact: int | None = None  # an exact count from the reference, where one is given
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise VramcalcError(
                f"unsupported architecture {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        for name, config_key in _SIZE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise VramcalcError(f"model {self.name!r}: {config_key} must be an integer, got {value!r}")
            positive = name in _POSITIVE_FIELDS
            if (positive and value <= 0) or value < 0 or value > MAX_SIZES[config_key]:
                lowest = 1 if positive else 0
                raise VramcalcError(f"model {self.name!r}: {config_key} must be from {lowest} to "
                                    f"{MAX_SIZES[config_key]:,} (see model.MAX_SIZES), got {value:,}")
        if isinstance(self.rotary_dim, bool) or not isinstance(self.rotary_dim, int) or not (
                0 <= self.rotary_dim <= self.head_dim):
            raise VramcalcError(f"model {self.name!r}: the rotary width must be from 0 to head_dim "
                                f"({self.head_dim}), got {self.rotary_dim!r}")
        if self.traits.short_conv and any(self.layer_is_conv) and (
                isinstance(self.conv_kernel, bool) or not isinstance(self.conv_kernel, int)
                or not 1 <= self.conv_kernel <= MAX_SIZES["conv_L_cache"]):
            raise VramcalcError(f"model {self.name!r}: conv_L_cache (the short convolution's width) must be from 1 to "
                                f"{MAX_SIZES['conv_L_cache']:,}, got {self.conv_kernel!r}")
        if self.traits.encoder:
            self._check_encoder()
        if self.num_heads % self.num_kv_heads:
            raise VramcalcError(f"model {self.name!r}: num_key_value_heads ({self.num_kv_heads}) must divide "
                                f"num_attention_heads ({self.num_heads}) (grouped-query attention repeats each kv "
                                "head num_attention_heads / num_key_value_heads times)")
        if self.traits.moe:
            if self.num_experts <= 0 or self.experts_per_token <= 0:
                raise VramcalcError(f"model {self.name!r}: a {self.family} model needs num_experts and "
                                    "experts_per_token")
            if self.experts_per_token > self.num_experts:
                raise VramcalcError(f"model {self.name!r}: num_experts_per_tok ({self.experts_per_token}) must be at "
                                    f"most the number of experts ({self.num_experts})")
            if self.decoder_sparse_step <= 0:
                raise VramcalcError(f"model {self.name!r}: decoder_sparse_step must be a positive integer, "
                                    f"got {self.decoder_sparse_step!r}")
            if not isinstance(self.mlp_only_layers, tuple) or not all(
                    isinstance(i, int) and 0 <= i < self.num_layers for i in self.mlp_only_layers):
                raise VramcalcError(f"model {self.name!r}: mlp_only_layers must be layer indices from 0 to "
                                    f"{self.num_layers - 1}, got {self.mlp_only_layers!r}")

    __hash__ = cached_field_hash
    __getstate__ = state_without_hash

    def _check_encoder(self) -> None:
        """An encoder's own fields: its position table, token-type rows and labels (at least one each; the position
        table also bounds the sequence), its dropout probabilities in [0, 1)."""
        for value, what in ((self.max_position_embeddings, "max_position_embeddings"),
                            (self.type_vocab_size, "type_vocab_size"), (self.score_labels, "num_labels")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VramcalcError(f"model {self.name!r}: an encoder's {what} must be a positive integer, "
                                    f"got {value!r}")
        for value, what in ((self.hidden_dropout, "hidden_dropout_prob"),
                            (self.attention_dropout, "attention_probs_dropout_prob")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise VramcalcError(f"model {self.name!r}: {what} must be in [0, 1), got {value!r}")

    @property
    def traits(self) -> FamilyTraits:
        return FAMILIES[self.family]

    @property
    def bnb_quantizable(self) -> bool:
        """bitsandbytes quantizes the decoder's Linears (``FamilyTraits.bnb_quantizable``; any plain module's)."""
        return self.traits.bnb_quantizable or self.plain_modules

    @property
    def always_masked(self) -> bool:
        """The attention always gets a 4-D mask (``FamilyTraits.always_masked``; never a plain module's)."""
        return self.traits.always_masked and not self.plain_modules

    @functools.cached_property
    def is_moe(self) -> bool:
        return self.traits.moe

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of q and k: nope + rope for MLA, else head_dim."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.traits.mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Per-head width that rotary embeddings rotate (the cos and sin tables' width)."""
        if self.traits.mla:
            return self.qk_rope_head_dim
        return self.rotary_dim or self.head_dim

    @property
    def norms_per_layer(self) -> int:
        """Norm modules per decoder layer: the family's, or Falcon's two (ln_attn, ln_mlp) in its new layout."""
        if self.family == "falcon" and self.new_decoder_architecture:
            return 2
        return self.traits.norms_per_layer

    @property
    def rope_tables(self) -> int:
        """Rotary cos/sin tables built per forward: one per layer kind in use (gemma3_text: local and global)."""
        return len(set(self.layer_types)) or 1 if self.traits.rope_per_layer_kind else 1

    @property
    def mask_kinds(self) -> int:
        """4-D masks built per forward under eager attention: Gemma-2's full and sliding ones, one per layer kind in
        use for gemma3_text, else one."""
        return 2 if self.family == "gemma2" else len(set(self.layer_types) - {"conv"}) or 1

    @functools.cached_property
    def layer_is_conv(self) -> tuple[bool, ...]:
        """Per decoder layer, whether it runs a short convolution instead of attention (``layer_types`` "conv" in a
        ``short_conv`` family: LFM2), computed once."""
        if not self.traits.short_conv or not self.layer_types:
            return (False,) * self.num_layers
        return tuple(kind == "conv" for kind in self.layer_types)

    @functools.cached_property
    def num_conv_layers(self) -> int:
        return sum(self.layer_is_conv)

    @functools.cached_property
    def layer_slides(self) -> tuple[bool, ...]:
        """Per decoder layer, whether it attends within ``sliding_window`` tokens: the layers a config's
        ``layer_types`` marks "sliding_attention" or "chunked_attention" (gemma3_text, cohere2, gpt_oss, llama4_text:
        transformers gives them a sliding-window cache layer and mask, ``cache_utils.py`` L1527-1528, L2050-2055);
        Gemma-2's even layers ((i + 1) % 2, ``Gemma2Config.layer_types``); every layer of Mistral, Mixtral and Phi-3
        when the config sets a window. All False without a window."""
        if not self.sliding_window:
            return (False,) * self.num_layers
        if self.layer_types:
            return tuple(kind in ("sliding_attention", "chunked_attention") for kind in self.layer_types)
        if self.family == "gemma2":
            return tuple(bool((i + 1) % 2) for i in range(self.num_layers))
        return (self.family in ("mistral", "mixtral", "phi3"),) * self.num_layers

    @property
    def num_attention_layers(self) -> int:
        """Decoder layers with attention (every layer but a hybrid's convolution layers): those with a KV cache."""
        return self.num_layers - self.num_conv_layers

    @property
    def mlp_width(self) -> int:
        """Width of one MLP branch: intermediate_size, or half of it for Qwen v1 (w1, w2: h -> I/2)."""
        return self.intermediate_size // 2 if self.family == "qwen" else self.intermediate_size

    @property
    def v_dim(self) -> int:
        """Per-head width of v (and of the attention output)."""
        return self.v_head_dim if self.traits.mla else self.head_dim

    def is_moe_layer(self, index: int) -> bool:
        """qwen3_moe: not in mlp_only_layers and (i+1) % decoder_sparse_step == 0; deepseek_v3: i >= first_k_dense_replace."""
        return self.layer_is_moe[index]

    @functools.cached_property
    def layer_is_moe(self) -> tuple[bool, ...]:
        """Per decoder layer, whether its MLP is a mixture of experts (``is_moe_layer``), computed once."""
        if not self.is_moe:
            return (False,) * self.num_layers
        return tuple(index not in self.mlp_only_layers and index >= self.first_k_dense_replace
                     and (index + 1) % self.decoder_sparse_step == 0 for index in range(self.num_layers))

    @functools.cached_property
    def num_moe_layers(self) -> int:
        return sum(self.layer_is_moe)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def expert_width(self) -> int:
        """Expert MLP width: Mixtral's experts are full-width (intermediate_size), others use moe_intermediate_size."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def shared_expert_width(self) -> int:
        """Width of the shared expert MLP: Qwen2-MoE's shared_expert_intermediate_size, else DeepSeek's
        moe_intermediate_size · n_shared_experts."""
        return self.shared_expert_intermediate_size or self.moe_intermediate_size * self.n_shared_experts

    @property
    def head_width(self) -> int:
        """Output features of the head: V for the causal LM's lm_head, ``num_labels`` for a sequence classifier's
        ``score`` (``reward_spec``)."""
        return self.score_labels or self.vocab_size

    @property
    def inventory(self) -> "Inventory":
        return _inventory(self)

    @functools.cached_property
    def params(self) -> int:
        """Total weights as stored in the checkpoint (parameters plus persistent router buffers; a VLM's vision tower
        and projector included)."""
        return self.inventory.total_numel + (self.vision.params if self.vision is not None else 0)

    @functools.cached_property
    def active_params(self) -> int:
        """Weights one token touches: everything but the routed experts, plus K of them per MoE layer."""
        inv = self.inventory
        if not self.is_moe:
            return self.params
        routed = sum(t.total_numel for t in inv.tensors if t.kind is ParamKind.EXPERTS)
        return self.params - routed + routed * self.experts_per_token // self.num_experts


@dataclass(frozen=True)
class Inventory:
    tensors: tuple[ParamTensor, ...]
    linears: tuple[LinearModule, ...]

    @functools.cached_property
    def total_numel(self) -> int:
        return sum(t.total_numel for t in self.tensors)

    def numel(self, *kinds: ParamKind) -> int:
        return sum(t.total_numel for t in self.tensors if t.kind in kinds)


def _linear(name: str, in_features: int, out_features: int, count: int, bias: bool = False, role: str = "attention"):
    """An nn.Linear module and its parameter tensors."""
    module = LinearModule(name, in_features, out_features, count, bias, role)
    scope = module.scope
    tensors = [ParamTensor(f"{name}.weight", ParamKind.LINEAR, (out_features, in_features), count, scope=scope)]
    if bias:
        tensors.append(ParamTensor(f"{name}.bias", ParamKind.LINEAR, (out_features,), count, scope=scope))
    return module, tensors


def _attention(m: ModelSpec, count: int):
    """Attention projections of one kind of layer, repeated ``count`` times."""
    h, a, k, d = m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim
    t = m.traits
    parts = []
    norms: list[ParamTensor] = []
    if t.mla:
        # DeepseekV3Attention: q_a_proj -> q_a_layernorm -> q_b_proj; kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj
        qk = m.qk_head_dim
        if m.q_lora_rank:
            parts.append(_linear("q_a_proj", h, m.q_lora_rank, count, m.qkv_bias))
            norms.append(ParamTensor("q_a_layernorm.weight", ParamKind.NORM, (m.q_lora_rank,), count, scope="layer"))
            parts.append(_linear("q_b_proj", m.q_lora_rank, a * qk, count))
        else:
            parts.append(_linear("q_proj", h, a * qk, count))
        parts.append(_linear("kv_a_proj_with_mqa", h, m.kv_lora_rank + m.qk_rope_head_dim, count, m.qkv_bias))
        norms.append(ParamTensor("kv_a_layernorm.weight", ParamKind.NORM, (m.kv_lora_rank,), count, scope="layer"))
        parts.append(_linear("kv_b_proj", m.kv_lora_rank, a * (m.qk_nope_head_dim + m.v_head_dim), count))
        parts.append(_linear("o_proj", a * m.v_head_dim, h, count, m.o_bias))
    elif len(t.qkv_names) == 1:  # one fused projection: Phi-3 qkv_proj, GPT-NeoX/Falcon query_key_value, Qwen c_attn
        parts.append(_linear(t.qkv_names[0], h, (a + 2 * k) * d, count, m.qkv_bias))
        parts.append(_linear(t.o_name, a * d, h, count, m.o_bias))
    else:
        q, k_name, v = t.qkv_names
        parts.append(_linear(q, h, a * d, count, m.qkv_bias))
        parts.append(_linear(k_name, h, k * d, count, m.qkv_bias))
        parts.append(_linear(v, h, k * d, count, m.qkv_bias))
        parts.append(_linear(t.o_name, a * d, h, count, m.o_bias))
    if t.attention_sinks:
        norms.append(ParamTensor("self_attn.sinks", ParamKind.NORM, (a,), count, scope="layer"))
    if m.qk_norm and not t.weightless_qk_norm:
        q_width, k_width = (a * d, k * d) if t.qk_norm_whole else (d, d)
        norms += [ParamTensor("q_norm.weight", ParamKind.NORM, (q_width,), count, scope="layer"),
                  ParamTensor("k_norm.weight", ParamKind.NORM, (k_width,), count, scope="layer")]
    return parts, norms


def _short_conv(m: ModelSpec, count: int):
    """LFM2's gated short convolution (``Lfm2ShortConv``, transformers 5.25 modeling_lfm2.py L383-392), ``count``
    times: in_proj nn.Linear(h, 3h), out_proj nn.Linear(h, h) (biases with conv_bias) and the depthwise
    nn.Conv1d(h, h, conv_L_cache, groups=h) weight [h, 1, K] (and bias [h]): not an nn.Linear, so neither LoRA's
    all-linear nor bitsandbytes reach it; it trains in full fine-tuning like a norm."""
    h = m.hidden_size
    parts = [_linear("in_proj", h, 3 * h, count, m.conv_bias), _linear("conv.out_proj", h, h, count, m.conv_bias)]
    tensors = [ParamTensor("conv.conv.weight", ParamKind.NORM, (h, 1, m.conv_kernel), count, scope="layer")]
    if m.conv_bias:
        tensors.append(ParamTensor("conv.conv.bias", ParamKind.NORM, (h,), count, scope="layer"))
    return parts, tensors


def _gated_mlp(m: ModelSpec, width: int, count: int, role: str = "mlp"):
    """gate/up/down (or Phi-3's fused gate_up) of a SwiGLU/GeGLU MLP of the given width; up/down of a plain GELU MLP
    (phi fc1/fc2, GPT-NeoX and Falcon dense_h_to_4h/dense_4h_to_h); Qwen v1's w1, w2 and mlp.c_proj."""
    h = m.hidden_size
    t = m.traits
    if not t.gated_mlp:
        up, down = t.mlp_names
        return [_linear(up, h, width, count, m.mlp_bias, role), _linear(down, width, h, count, m.mlp_bias, role)]
    if role != "shared_expert" and t.mlp_names != ("gate_proj", "up_proj", "down_proj") and not t.fused_gate_up:
        gate, up, down = t.mlp_names
        return [_linear(gate, h, width, count, m.mlp_bias, role), _linear(up, h, width, count, m.mlp_bias, role),
                _linear(down, width, h, count, m.mlp_bias, role)]
    if m.traits.fused_gate_up:
        return [_linear("gate_up_proj", h, 2 * width, count, m.mlp_bias, role),
                _linear("down_proj", width, h, count, m.mlp_bias, role)]
    prefix = t.shared_expert_prefix if role == "shared_expert" else ""
    return [_linear(f"{prefix}gate_proj", h, width, count, m.mlp_bias, role),
            _linear(f"{prefix}up_proj", h, width, count, m.mlp_bias, role),
            _linear(f"{prefix}down_proj", width, h, count, m.mlp_bias, role)]


@functools.cache
def reward_spec(spec: ModelSpec, labels: int = 1) -> ModelSpec:
    """The model as ``AutoModelForSequenceClassification`` builds it (``--task reward``: TRL 1.16 RewardTrainer
    loads it with ``num_labels=1``, ``trl/trainer/reward_trainer.py:396-400``): the backbone, no lm_head, and
    ``score = nn.Linear(hidden_size, num_labels, bias=False)`` on the last hidden state (transformers 5.25
    ``modeling_layers.py:138`` ``GenericForSequenceClassification``), never tied to the embedding."""
    return dataclasses.replace(spec, score_labels=labels, tie_word_embeddings=False)


@functools.cache
def _inventory(m: ModelSpec) -> Inventory:
    h, V, L = m.hidden_size, m.vocab_size, m.num_layers
    n_moe = m.num_moe_layers
    n_dense = L - n_moe
    parts = []
    tensors = [ParamTensor("embed_tokens.weight", ParamKind.EMBEDDING, (V, h))]
    if m.traits.encoder:  # BertEmbeddings: three nn.Embedding (Trainer's 8-bit optimizer keeps each 32-bit) + LayerNorm
        tensors += [ParamTensor("position_embeddings.weight", ParamKind.EMBEDDING, (m.max_position_embeddings, h)),
                    ParamTensor("token_type_embeddings.weight", ParamKind.EMBEDDING, (m.type_vocab_size, h)),
                    ParamTensor("embeddings.LayerNorm.weight", ParamKind.NORM, (h,)),
                    ParamTensor("embeddings.LayerNorm.bias", ParamKind.NORM, (h,))]
    if m.traits.learned_positions:  # OPT: not an nn.Linear nor the token embedding; trains in full fine-tuning
        rows = (m.max_position_embeddings or 2048) + OPT_POSITION_OFFSET
        tensors.append(ParamTensor("embed_positions.weight", ParamKind.NORM, (rows, h)))
    if m.traits.embedding_norm:  # BLOOM's word_embeddings_layernorm
        tensors += [ParamTensor("word_embeddings_layernorm.weight", ParamKind.NORM, (h,)),
                    ParamTensor("word_embeddings_layernorm.bias", ParamKind.NORM, (h,))]
    attn, attn_norms = _attention(m, m.num_attention_layers)
    parts += attn
    tensors += attn_norms
    if m.num_conv_layers:
        conv, conv_tensors = _short_conv(m, m.num_conv_layers)
        parts += conv
        tensors += conv_tensors
    tensors.append(ParamTensor("layernorm.weight", ParamKind.NORM, (h,), L * m.norms_per_layer, scope="layer"))
    if m.traits.layer_norm:
        tensors.append(ParamTensor("layernorm.bias", ParamKind.NORM, (h,), L * m.norms_per_layer, scope="layer"))
    if n_dense:
        parts += _gated_mlp(m, m.mlp_width, n_dense)
    if n_moe:
        E, I_m = m.num_experts, m.expert_width
        fp32 = m.traits.router_fp32
        tensors.append(ParamTensor("mlp.gate.weight", ParamKind.ROUTER, (E, h), n_moe, keep_fp32=fp32, scope="moe"))
        if m.traits.router_fp32 and m.traits.router_score_bias:
            tensors.append(ParamTensor("mlp.gate.e_score_correction_bias", ParamKind.ROUTER, (E,), n_moe,
                                       keep_fp32=True, scope="moe"))
        tensors.append(ParamTensor("mlp.experts.gate_up_proj", ParamKind.EXPERTS, (E, 2 * I_m, h), n_moe, scope="moe"))
        tensors.append(ParamTensor("mlp.experts.down_proj", ParamKind.EXPERTS, (E, h, I_m), n_moe, scope="moe"))
        if m.traits.moe_biases:  # GptOssTopKRouter.bias, GptOssExperts.gate_up_proj_bias and down_proj_bias
            tensors.append(ParamTensor("mlp.router.bias", ParamKind.ROUTER, (E,), n_moe, scope="moe"))
            tensors.append(ParamTensor("mlp.experts.gate_up_proj_bias", ParamKind.EXPERTS, (E, 2 * I_m), n_moe,
                                       scope="moe"))
            tensors.append(ParamTensor("mlp.experts.down_proj_bias", ParamKind.EXPERTS, (E, h), n_moe, scope="moe"))
        if m.n_shared_experts:
            parts += _gated_mlp(m, m.shared_expert_width, n_moe, role="shared_expert")
        if m.traits.shared_expert_gate:
            parts.append(_linear("shared_expert_gate", h, 1, n_moe, role="shared_expert"))
    if m.traits.encoder:  # no final norm; BertPooler's dense (not a decoder Linear) and the biased classifier
        tensors += [ParamTensor("pooler.dense.weight", ParamKind.LINEAR, (h, h)),
                    ParamTensor("pooler.dense.bias", ParamKind.LINEAR, (h,)),
                    ParamTensor("classifier.weight", ParamKind.LM_HEAD, (m.score_labels, h)),
                    ParamTensor("classifier.bias", ParamKind.LM_HEAD, (m.score_labels,))]
        linears = tuple(module for module, _ in parts)
        for _, module_tensors in parts:
            tensors += module_tensors
        return Inventory(tuple(tensors), linears)
    tensors.append(ParamTensor("norm.weight", ParamKind.NORM, (h,)))
    if m.traits.layer_norm:
        tensors.append(ParamTensor("norm.bias", ParamKind.NORM, (h,)))
    if m.score_labels:  # a sequence classifier's score = nn.Linear(h, num_labels, bias=False) (``reward_spec``)
        tensors.append(ParamTensor("score.weight", ParamKind.LM_HEAD, (m.score_labels, h)))
    elif not m.tie_word_embeddings:
        tensors.append(ParamTensor("lm_head.weight", ParamKind.LM_HEAD, (V, h)))
    if m.traits.lm_head_bias and not m.score_labels:
        tensors.append(ParamTensor("lm_head.bias", ParamKind.LM_HEAD, (V,)))
    linears = tuple(module for module, _ in parts)
    for _, module_tensors in parts:
        tensors += module_tensors
    return Inventory(tuple(tensors), linears)
