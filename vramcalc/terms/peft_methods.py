"""Estimate formulas of the peft methods beyond LoRA (``vramcalc/peft_methods.py`` lists the methods and their facts):
DoRA (below), AdaLoRA, IA3, LN tuning, p-tuning, LoHa, LoKr, VeRA, OFT and prefix tuning (their functions say what
each trains, saves and holds for a moment, with the peft 0.21.2 lines). On a ``--quant`` 4-bit base DoRA (QDoRA) is
estimated by composition (``composes_quantized_base``); the other methods on a quantized base are traced.

A method without formulas here is refused by the estimate in one line that points to ``vramcalc trace``
(``check_estimable``); the trace builds every method with real peft.

DoRA (peft 0.21.2, ``LoraConfig(use_dora=True)``; symbols: T tokens, n_in/n_out a target Linear's features, r rank,
c compute bytes (the autocast dtype), a adapter bytes, w the base weight's bytes). ``tuners/lora/variants.py:230-256``
(``DoraLinearVariant.forward``) calls ``tuners/lora/dora.py:132-165`` (``DoraLinearLayer.forward``) after the base
Linear's own output ``result``; without dropout ``base_result = result``:

- parameters: LoRA's A [r, n_in] and B [n_out, r] plus the magnitude ``lora_magnitude_vector`` [n_out] per target, at
  the adapter dtype (``dora.py:130``: ``nn.Parameter(weight_norm)``; cast like every adapter); its gradient and
  optimizer states follow (``terms/states.py``);
- saved for backward, per token and target (``dora_saved_per_token``): ``(mag_norm_scale - 1) * base_result`` saves
  the base output (c·n_out: it requires no grad but the scale does) and ``mag_norm_scale * lora_result`` saves
  lora_B's output (c·n_out); LoRA's own ``lora_B(...) * scaling`` saves nothing (a Python scalar). Per layer and
  target, three [n_out] tensors at the adapter dtype: ``weight_norm`` (saved by the division), ``mag_norm_scale``
  and ``mag_norm_scale - 1`` (saved by the products) (``dora_per_layer_bytes``);
- temporaries of each target's forward (``dora_forward_transient_bytes``), all freed when the module returns, all
  [n_in x n_out]-sized, not per token: ``get_lora_weight`` (``dora.py:94-99``) multiplies an fp32 identity
  ``torch.eye(n_in)`` (a·n_in², the adapter's dtype) through lora_A and lora_B; autocast casts it (c·n_in², kept by
  lora_A's graph while the module runs, as is lora_A's output c·n_in·r); ``.to(x.dtype)`` makes the [n_in, n_out]
  weight a (a·n_in·n_out; x is already cast to the adapter dtype by ``_cast_input_dtype``); ``weight.to(x.dtype)``
  copies the frozen base weight (a·n_in·n_out when w != a); ``get_weight_norm`` (``dora.py:86-91``) builds
  ``scaling * lora_weight`` and ``weight + ...`` (2·a·n_in·n_out) before ``linalg.norm``. Peak: the larger of
  (a + c)·n_in² + c·n_in·(r + n_out) (at lora_B) and c·n_in² + c·n_in·r + (3 or 4)·a·n_in·n_out (at the sum).
  Under checkpointing the recompute of each layer in backward runs it again. The weight norm is recomputed every
  forward: peft's ``ENABLE_DORA_CACHING`` (``dora.py:27``) caches it only in eval mode, so training never caches;
  ``ephemeral_gpu_offload`` (``variants.py:148``) only matters for adapters kept on the CPU, which a training step
  on one GPU does not do: neither is an option.
"""

from __future__ import annotations

from ..errors import VramcalcError
from ..model import ModelSpec, ParamKind
from ..options import Attention, Method, Quant
from ..peft_methods import IA3_FEEDFORWARD, LN_TUNING_ESTIMATED_FAMILIES
from ..units import maximum, round_up
from .stored_tensor import StoredTensor

# adapter tensors that are vectors multiplied elementwise, never a matmul operand (so no autocast copy of them)
VECTOR_ADAPTERS = ("lora_magnitude_vector", "ia3_l", "ln_tuning", "lora_E", "vera_lambda_d", "vera_lambda_b",
                   "lokr_w1", "lokr_w2",  # LoKr's full factors go through torch.kron, which autocast does not cast
                   "oft_R")  # OFT's parameter is scattered into skew-symmetric blocks first (oft_saved)
# adapter tensors multiplied only inside a custom autograd Function (LoHa's ``HadaWeight``, loha/layer.py:366-371),
# which saves the fp32 leaves themselves: autocast caches their 16-bit copies until forward ends, nothing saves them
CACHED_ONLY_ADAPTERS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
VERA_PROJECTION_BITS = 32  # vera_A / vera_B: peft makes them in fp32 (vera/model.py ``_init_vera_A_vera_B``)
# frozen shared projections that layers slice and cast on every call (no cached autocast copy of the whole buffer):
# their per-call copies are in ``vera_saved``
SLICED_PROJECTIONS = ("vera_A", "vera_B")


def check_estimable(setup, family: str = "", attn_used=None) -> None:
    """Refuse, in one line, a peft method the estimate has no formulas for, or a quantized base under one."""
    facts = setup.method.peft_facts
    if facts is None:
        return
    word = setup.method.value
    if not facts.formulas:
        raise VramcalcError(f"--method {word} has no estimate formulas yet; use vramcalc trace MODEL --method {word} "
                            "(real peft on fake tensors, no GPU needed)")
    if setup.method is Method.LN_TUNING and family not in LN_TUNING_ESTIMATED_FAMILIES:
        raise VramcalcError(f"--method ln-tuning on {family} is traced, not estimated (peft's target norms differ "
                            f"by family); use vramcalc trace MODEL --method ln-tuning")
    if setup.method is Method.PREFIX:
        if setup.grad_ckpt:
            raise VramcalcError("--method prefix with --grad-ckpt does not run: transformers sets the layers' cache to "
                                "None under gradient checkpointing, so the key/value prefixes never reach the "
                                "attention and the mask's key length (seq + virtual tokens) no longer matches; drop "
                                "--grad-ckpt")
        if attn_used is not None and attn_used is not Attention.SDPA:
            raise VramcalcError(f"--method prefix with --attn {attn_used.value} is traced, not estimated (the "
                                "estimate covers SDPA's masked attention); use vramcalc trace MODEL --method prefix")
    if setup.quant is not Quant.NONE and not composes_quantized_base(setup):
        raise VramcalcError(f"--method {word} on a --quant {setup.quant.value} base is traced, not estimated; use "
                            f"vramcalc trace MODEL --method {word} --quant {setup.quant.value}")


# the methods whose estimate on a bitsandbytes 4-bit base is composed (``composes_quantized_base``): peft's
# bitsandbytes layers (``tuners/lora/bnb.py``, incl. DoRA) run the method's own adapter path on the Linear4bit's
# output exactly as on a 16-bit Linear's
QUANTIZED_BASE_ESTIMATED = (Method.DORA,)


def composes_quantized_base(setup) -> bool:
    """``--quant nf4|fp4`` under a method of ``QUANTIZED_BASE_ESTIMATED``: the estimate is QLoRA's (the same 4-bit
    base, quant state, dequantization temporaries and ``prepare_model_for_kbit_training`` casts, ``temporaries``,
    ``parameters``) plus what the method adds over LoRA on a 16-bit base, moment by moment
    (``estimator.step_moments``): it assumes the base's and the method's extras add, which the trace confirms
    for QDoRA on tiny llama (``benchmarks/accuracy_methods.md``). int8 (LLM.int8) bases are traced."""
    return setup.method in QUANTIZED_BASE_ESTIMATED and setup.quant in (Quant.NF4, Quant.FP4)


def dora_saved_per_token(out_features: int, base_out_bytes: int, lora_out_bytes: int) -> int:
    """DoRA's two saved [T, n_out] tensors per target beyond LoRA's: the base output and lora_B's output."""
    return (base_out_bytes + lora_out_bytes) * out_features


def dora_dropout_weight_saved_bytes(in_features: int, out_features: int, c: int, adapter: int, base_bytes: int,
                                    autocast: bool, quantized: bool) -> int:
    """With LoRA dropout in training, ``DoraLinearVariant.forward`` (``variants.py:242-244``) passes
    ``base_result=None`` and ``DoraLinearLayer.forward`` (``dora.py:141-142, 163``) recomputes the base output as
    ``F.linear(dropout(x), weight.to(x.dtype))``, x in the adapter's dtype a: that F.linear saves the weight it
    multiplies for x's gradient, per target and layer: under autocast its cast to c when a != c, else
    ``weight.to(a)``'s copy when the weight (w bytes; a 4-bit base's dequantized weight is always new) is not a
    already; nothing new when it is the base weight itself."""
    n = in_features * out_features
    if autocast and adapter != c:
        return round_up(c * n)
    if quantized or base_bytes != adapter:
        return round_up(adapter * n)
    return 0


def dora_per_layer_bytes(out_features: int, adapter_bytes: int) -> int:
    """weight_norm, mag_norm_scale and mag_norm_scale - 1: three [n_out] tensors, each its own 512 B-rounded block."""
    return 3 * round_up(adapter_bytes * out_features)


def dora_forward_transient_bytes(model: ModelSpec, lora_modules: tuple[str, ...], rank: int, c: int, adapter: int,
                                 base_bytes: int) -> int:
    """The largest target's forward temporaries (module docstring), alive only while that module runs. ``c``: the
    bytes lora_A and lora_B compute in (the autocast dtype, or the adapter's without autocast)."""
    linears = {module.name: module for module in model.inventory.linears}
    peak = 0
    for name in lora_modules:
        module = linears.get(name)
        if module is None:  # lm_head / embed_tokens
            continue
        n_in, n_out = module.in_features, module.out_features
        # the identity as lora_A multiplies it (autocast's cast, or the identity itself) and lora_A's output, kept by
        # lora_A's and lora_B's graph while the module runs
        held = round_up(c * n_in * n_in) + round_up(c * n_in * rank)
        eye = round_up(adapter * n_in * n_in) if adapter != c else 0  # the fp32 identity, until get_lora_weight returns
        at_lora_b = eye + held + round_up(c * n_in * n_out)
        weight = round_up(adapter * n_in * n_out)
        base_copy = weight if base_bytes != adapter else 0  # weight.to(x.dtype)
        at_sum = held + weight + base_copy + 2 * weight  # lora_weight, base copy, scaling * lora_weight, the sum
        peak = max(peak, at_lora_b, at_sum)
    return peak


def dora_backward_per_token(model: ModelSpec, lora_modules: tuple[str, ...], c: int) -> int:
    """DoRA's backward of the widest target, per token: the result's fp32 gradient (``result + result_dora`` is fp32,
    cast back by ``result.to(torch_result_dtype)``, ``lora/layer.py:1113``), and inside ``mag_norm_scale *
    lora_result``'s MulBackward the two fp32 products ``grad * lora_result`` (summed to the magnitude's [n_out]) and
    ``grad * mag_norm_scale`` with its cast to lora_result's dtype: (3·4 + c)·n_out."""
    linears = {module.name: module for module in model.inventory.linears}
    widest = max((linears[name].out_features for name in lora_modules if name in linears), default=0)
    return (3 * 4 + c) * widest


def has_forward_transients(method: Method) -> bool:
    """Whether ``forward_transient_bytes`` has a term for the method (a moment of its own in forward)."""
    return method in (Method.DORA, Method.LOHA, Method.LOKR, Method.VERA, Method.OFT)


def forward_transient_bytes(model: ModelSpec, resolved, dt, tokens=0, recompute: bool = False):
    """A method's per-module forward temporaries (0 for a method without): DoRA's weight-norm path
    (``dora_forward_transient_bytes``), LoHa's and LoKr's rebuilt weight, VeRA's per-token temporaries
    (``vera_forward_transient_bytes``; ``recompute``: as checkpointing's recompute of the layer runs it)."""
    setup = resolved.setup
    c = dt.c if dt.autocast else dt.adapter
    if setup.method is Method.VERA:
        return vera_forward_transient_bytes(model, resolved.lora_modules, setup.lora_rank, dt, recompute) * tokens
    if setup.method is Method.OFT:
        return oft_forward_transient_bytes(model, resolved.lora_modules, setup.lora_rank, dt, recompute) * tokens
    if setup.method is Method.LOHA:  # HadaWeight.forward: the two c-byte [out, in] products and their product
        return 3 * _widest_weight(model, resolved.lora_modules) * c
    if setup.method is Method.LOKR:  # make_kron: torch.kron's output and ``* scale``, both at the adapter's bytes
        return 2 * dt.adapter * _widest_weight(model, resolved.lora_modules)
    if setup.method is not Method.DORA:
        return 0
    weight_norm = dora_forward_transient_bytes(model, resolved.lora_modules, setup.lora_rank, c, dt.adapter, dt.r)
    last = _last_target(model, resolved.lora_modules)
    if last is None:
        return weight_norm
    # the layer's last target runs beside every tensor the layer saves: its weight-norm path there also has the
    # module's c-byte input (the MLP's product, which nothing else saves), its cast to the adapter dtype
    # (``_cast_input_dtype``, when it differs) and the base Linear's c-byte output (``result``, computed first)
    io_per_token = c * last.in_features + (dt.adapter * last.in_features if dt.adapter != dt.c else 0) \
        + c * last.out_features
    at_last = dora_forward_transient_bytes(model, (last.name,), setup.lora_rank, c, dt.adapter, dt.r)
    return maximum(weight_norm, at_last + io_per_token * tokens)


def _last_target(model: ModelSpec, lora_modules: tuple[str, ...]):
    """The layer's last Linear when the method wraps it and it ends the layer (a dense MLP's down projection, not
    experts the inventory does not list as Linears); else None."""
    linears = model.inventory.linears
    last = linears[-1] if linears else None
    if last is None or last.name not in lora_modules or last.name.split(".")[-1] not in IA3_FEEDFORWARD:
        return None
    return last


def oft_forward_transient_bytes(model: ModelSpec, lora_modules: tuple[str, ...], rank: int, dt,
                                recompute: bool) -> int:
    """OFT's temporaries per token in the forward of the layer's last Linear when OFT wraps it (beside every tensor
    the layer saves; as ``vera_forward_transient_bytes``, with the module's c-byte input). ``tuners/oft/layer.py:649-655`` and 245-284: the input
    cast to the adapter dtype (a·n_in when x is not at it, until the module returns), the einsum's bmm output and
    the reshape's contiguous copy (2·c·n_in, its [r, T, b] layout back to [T, n_in]), then ``x_rotated.to(fp32)``
    (a·n_in); the c-byte cast of the input the einsum saves is in ``oft_saved``. Peak: at that last cast, 2·a·n_in +
    3·c·n_in (a checkpointed recompute stops after the einsum, the last saving op, as well: the same); a forward
    then also holds the base Linear's c·n_out output beside the rotated input and its c-byte cast (at most the
    same for a down projection)."""
    last = _last_target(model, lora_modules)
    if last is None:
        return 0
    c = dt.c if dt.autocast else dt.adapter
    a = dt.adapter
    n_in = last.in_features
    x_cast = a * n_in if a != dt.c else 0
    rotated = a * n_in if a != c else 0
    return c * n_in + x_cast + max(2 * c * n_in + rotated, 0 if recompute else rotated + c * n_in + c * last.out_features)


def recompute_incoming_grad_bytes(model: ModelSpec, dt, tokens):
    """The gradients alive when the last decoder layer's checkpointed forward is recomputed (the first recompute of
    backward, where the layers' saved tensors peak): lm_head's c-byte input gradient, the final RMSNorm's fp32 input
    gradient and its c-byte cast (``x.to(float32)``'s backward), all [T, h], still referenced until the layer's
    backward consumes them (traced on tiny llama, tracing/tracker.py live records at the peak): (2·c + 4)·h·T."""
    return (2 * dt.c + 4) * model.hidden_size * tokens


def vera_forward_transient_bytes(model: ModelSpec, lora_modules: tuple[str, ...], rank: int, dt,
                                 recompute: bool) -> int:
    """VeRA's temporaries per token in the forward of the layer's last Linear when VeRA wraps it (it then runs beside
    every tensor the layer saves; a VeRA target earlier in the layer runs before the layer's later saved tensors,
    which are larger, and adds nothing here). The module's input (c·n_in: the MLP's product, which nothing else
    saves) lives until the module returns. ``tuners/vera/layer.py:263-286`` (``Linear.forward``): the base
    output ``result`` (c·n_out, alive until the sum), ``x = self._cast_input_dtype(x, lambda_d.dtype)`` (a·n_in when
    x is not yet at the adapter dtype, alive until the module returns; vera_A is frozen, so nothing saves it), then
    in turn: autocast's c-byte copy of it for the first F.linear (c·n_in, freed once the product exists);
    ``lambda_d * h1`` (a·r, type promotion to the fp32 lambda) with its autocast copy for the second F.linear
    (c·r); ``lambda_b * h2`` and ``result + ...`` (2·a·n_out, promoted). h1 and h2 are saved (``vera_saved``).
    Checkpointing's recompute (non-reentrant ``torch.utils.checkpoint`` stops once the last saved tensor, h2 for
    ``lambda_b * h2``, is back) ends at the second F.linear: (c + a)·n_in + c·n_out + max(c·n_in, (a + c)·r); a
    forward runs on: (c + a)·n_in + c·n_out + max(c·n_in, (a + c)·r, 2·a·n_out)."""
    last = _last_target(model, lora_modules)
    if last is None:
        return 0
    c = dt.c if dt.autocast else dt.adapter
    a = dt.adapter
    x_cast = a * last.in_features if a != dt.c else 0
    steps = [c * last.in_features, (a + c) * rank] + ([] if recompute else [2 * a * last.out_features])
    return c * last.in_features + x_cast + c * last.out_features + max(steps)


def backward_transient_bytes(model: ModelSpec, resolved, dt, tokens):
    """A method's own backward temporaries in one layer's backward (widest target), beside the layer's own backward
    transients: DoRA's per-token fp32 gradients (``dora_backward_per_token``)."""
    setup = resolved.setup
    if setup.method is Method.DORA:
        return dora_backward_per_token(model, resolved.lora_modules, dt.c) * tokens
    return 0


def backward_beside_bytes(model: ModelSpec, resolved, dt, tokens):
    """LoHa's and LoKr's backward temporaries of the widest target, which peak inside that module's backward, beside
    the layer's saved tensors and the incoming c-byte [T, h] gradient only (the MLP's own backward gradients come
    after it: ``backward`` takes the larger of the two). F.linear's backward has by then made the input's gradient
    (c·n_in per token) and released the input it saved (the same bytes) and the c-byte [out, in] update. LoHa's
    ``HadaWeight.backward`` (``loha/layer.py:374-386``, outside autocast): the incoming c-byte [out, in] gradient
    (F.linear's weight gradient), ``grad_out * scale`` (c), ``w2a @ w2b`` and ``temp`` in fp32, then ``w1a @ w1b``
    and the new ``temp`` while the old one is still bound: (2·c + 12)·out·in, less the released update: (c +
    12)·out·in. LoKr (``lokr/layer.py:497-503``): F.linear's weight gradient cast to the adapter dtype, then ``*
    scale``'s gradient (a) and kron's backward's two a-byte [out, in] products while it is still bound, the c-byte
    weight gradient freed: 3·a·out·in, less the released update: (3·a - c)·out·in (traced on tiny llama at seq 64,
    where this is the step's peak)."""
    setup = resolved.setup
    if setup.method is Method.LOHA:
        per_weight = dt.c + 12
    elif setup.method is Method.LOKR:
        per_weight = 3 * dt.adapter - (dt.c if dt.autocast else dt.adapter)
    else:
        return 0
    return per_weight * _widest_weight(model, resolved.lora_modules) + dt.c * model.hidden_size * tokens


def _widest_weight(model: ModelSpec, lora_modules: tuple[str, ...]) -> int:
    """out·in of the largest targeted Linear."""
    linears = {module.name: module for module in model.inventory.linears}
    return max((linears[name].in_features * linears[name].out_features for name in lora_modules if name in linears),
               default=0)


def method_tensors(model: ModelSpec, method: Method, modules: tuple[str, ...], rank: int, bits: int,
                   virtual_tokens: int = 0) -> list:
    """The trainable tensors of a peft method other than LoRA/DoRA (``parameters.parameter_tensors``), at the adapter
    dtype (``bits``):
    - AdaLoRA (``tuners/adalora/layer.py``, ``update_layer``): lora_A [r, in], lora_E [r, 1], lora_B [out, r]
      (r = init_r) and a frozen fp32 ``ranknum`` [1] per target;
    - VeRA (``tuners/vera/layer.py``, ``vera/model.py``): ``vera_lambda_d`` [r] and ``vera_lambda_b`` [out] per
      target, and one pair of frozen fp32 projections shared by every target, vera_A [r, widest in] and vera_B
      [widest out, r];
    - LoHa (``tuners/loha/layer.py:67-70``, Linear): hada_w1_a, hada_w2_a [out, r] and hada_w1_b, hada_w2_b [r, in];
    - LoKr (``tuners/lokr/layer.py:65-90, 195-204``, Linear, decompose_both=False): lokr_w1 [out_l, in_m] and
      lokr_w2_a [out_k, r], lokr_w2_b [r, in_n] (or a full lokr_w2 [out_k, in_n] when r >= max(out_k, in_n) / 2),
      with out = out_l·out_k and in = in_m·in_n from ``lokr_factorization``;
    - IA3 (``tuners/ia3/layer.py:62-68``, ``update_layer``): ``ia3_l`` [out, 1] per target, [1, in] for a feed-forward
      target (``IA3_FEEDFORWARD``);
    - LN tuning (``tuners/ln_tuning/layer.py:48``: ``deepcopy(layer)``): a trainable copy of each targeted norm's
      weight beside the frozen original (the decoder layers' two norms and the final norm);
    - p-tuning (``tuners/p_tuning/model.py``, ``PromptEncoder`` with the default MLP reparameterization):
      ``embedding`` [n, h] and ``mlp_head`` Linear(h, e), Linear(e, e), Linear(e, h) with biases, e =
      ``encoder_hidden_size`` (None: peft sets it to the token dim h, ``peft_model.py::_setup_prompt_encoder``);
    - prefix tuning (``tuners/prefix_tuning/model.py:62-75``, ``PrefixEncoder`` with the default
      ``prefix_projection=False``): ``embedding`` [n, L·2·k·d], a key and a value prefix per layer
      (``prefix_width``);
    - OFT (``tuners/oft/layer.py:380-463``, ``update_layer`` with r=0): ``oft_R.weight`` [in/b, b(b-1)/2], the
      upper triangles of in/b skew-symmetric b x b blocks (b = ``oft_block_size``, adjusted to divide in:
      ``oft_block_size``), and two frozen int64 index buffers ``rows``, ``cols`` [b(b-1)/2] (``triu_indices``)."""
    out = []
    if method is Method.IA3:
        linears = {module.name: module for module in model.inventory.linears}
        for name in modules:
            module = linears[name]
            feedforward = name.split(".")[-1] in IA3_FEEDFORWARD
            shape = (1, module.in_features) if feedforward else (module.out_features, 1)
            out.append(StoredTensor(f"{name}.ia3_l", "adapter", shape, module.count, bits, True, scope=module.scope))
    elif method is Method.ADALORA:
        linears = {module.name: module for module in model.inventory.linears}
        for name in modules:
            module, scope = linears[name], linears[name].scope
            out += [StoredTensor(f"{name}.lora_A", "adapter", (rank, module.in_features), module.count, bits, True,
                                 scope=scope),
                    StoredTensor(f"{name}.lora_E", "adapter", (rank, 1), module.count, bits, True, scope=scope),
                    StoredTensor(f"{name}.lora_B", "adapter", (module.out_features, rank), module.count, bits, True,
                                 scope=scope),
                    StoredTensor(f"{name}.ranknum", "adapter", (1,), module.count, 32, False, scope=scope)]
    elif method is Method.VERA:
        linears = {module.name: module for module in model.inventory.linears}
        for name in modules:
            module = linears[name]
            out += [StoredTensor(f"{name}.vera_lambda_d", "adapter", (rank,), module.count, bits, True,
                                 scope=module.scope),
                    StoredTensor(f"{name}.vera_lambda_b", "adapter", (module.out_features,), module.count, bits, True,
                                 scope=module.scope)]
        widest_in = max(linears[name].in_features for name in modules)
        widest_out = max(linears[name].out_features for name in modules)
        out += [StoredTensor("vera_A", "adapter", (rank, widest_in), 1, VERA_PROJECTION_BITS, False),
                StoredTensor("vera_B", "adapter", (widest_out, rank), 1, VERA_PROJECTION_BITS, False)]
    elif method is Method.LOHA:
        linears = {module.name: module for module in model.inventory.linears}
        for name in modules:
            module = linears[name]
            for factor in ("w1", "w2"):
                out += [StoredTensor(f"{name}.hada_{factor}_a", "adapter", (module.out_features, rank), module.count,
                                     bits, True, scope=module.scope),
                        StoredTensor(f"{name}.hada_{factor}_b", "adapter", (rank, module.in_features), module.count,
                                     bits, True, scope=module.scope)]
    elif method is Method.LOKR:
        linears = {module.name: module for module in model.inventory.linears}
        for name in modules:
            module = linears[name]
            (out_l, out_k), (in_m, in_n) = lokr_shape(module.out_features, module.in_features)
            out.append(StoredTensor(f"{name}.lokr_w1", "adapter", (out_l, in_m), module.count, bits, True,
                                    scope=module.scope))
            if rank < max(out_k, in_n) / 2:
                out += [StoredTensor(f"{name}.lokr_w2_a", "adapter", (out_k, rank), module.count, bits, True,
                                     scope=module.scope),
                        StoredTensor(f"{name}.lokr_w2_b", "adapter", (rank, in_n), module.count, bits, True,
                                     scope=module.scope)]
            else:
                out.append(StoredTensor(f"{name}.lokr_w2", "adapter", (out_k, in_n), module.count, bits, True,
                                        scope=module.scope))
    elif method is Method.P_TUNING:
        h = model.hidden_size
        out.append(StoredTensor("prompt_encoder.embedding", "prompt", (virtual_tokens, h), 1, bits, True))
        for index in (0, 2, 4):  # mlp_head = Sequential(Linear, ReLU, Linear, ReLU, Linear)
            out.append(StoredTensor(f"prompt_encoder.mlp_head.{index}.weight", "adapter", (h, h), 1, bits, True))
            out.append(StoredTensor(f"prompt_encoder.mlp_head.{index}.bias", "adapter", (h,), 1, bits, True))
    elif method is Method.OFT:
        linears = {module.name: module for module in model.inventory.linears}
        for name in modules:
            module = linears[name]
            block = oft_block_size(module.in_features, rank)
            blocks, elements = module.in_features // block, block * (block - 1) // 2
            out += [StoredTensor(f"{name}.oft_R", "adapter", (blocks, elements), module.count, bits, True,
                                 scope=module.scope),
                    StoredTensor(f"{name}.oft_R.rows", "adapter", (elements,), module.count, 64, False,
                                 scope=module.scope),
                    StoredTensor(f"{name}.oft_R.cols", "adapter", (elements,), module.count, 64, False,
                                 scope=module.scope)]
    elif method is Method.PREFIX:
        out.append(StoredTensor("prompt_encoder.embedding", "prompt",
                                (virtual_tokens, model.num_layers * 2 * prefix_width(model)), 1, bits, True))
    elif method is Method.LN_TUNING:
        for tensor in model.inventory.tensors:
            if tensor.kind is ParamKind.NORM and tensor.name.endswith("weight"):
                out.append(StoredTensor(f"{tensor.name}.ln_tuning", "adapter", tensor.shape, tensor.count, bits, True,
                                        scope=tensor.scope))
    return out


def ia3_saved(walk, width_in: int, width_out: int, feedforward: bool, x_bytes: int, x_saved: bool) -> bool:
    """What IA3 saves on one target (``tuners/ia3/layer.py:172-199``), added to the layer walk; returns whether the
    shared input is now saved. Output-scaled: ``(result * ia3_scaling).to(result_dtype)`` saves the base output
    (its bytes per element times n_out) and, when the output requires grad, ``ia3_scaling`` ([n_out], its own block).
    Feed-forward: ``x.to(ia3 dtype) * ia3_scaling`` saves the cast input (a·n_in; x itself when already that dtype)
    and, when x requires grad, ``ia3_scaling`` [n_in]; the product goes back to x's dtype into the frozen Linear."""
    dt = walk.dt
    a = dt.adapter
    if feedforward:
        if a != x_bytes:
            walk.per_token += a * width_in
        elif not x_saved:
            walk.per_token += x_bytes * width_in
            x_saved = True
        if walk.grad:
            walk.per_layer += round_up(a * width_in)
        return x_saved
    base_out = dt.c if dt.autocast else max(x_bytes, dt.r)
    walk.per_token += base_out * width_out
    if walk.grad:
        walk.per_layer += round_up(a * width_out)
    return x_saved


def prompt_encoder_saved_bytes(model: ModelSpec, method: Method, dt, sequences, virtual_tokens: int):
    """p-tuning's encoder (``tuners/p_tuning/model.py::PromptEncoder.forward``) on the [b, n] virtual token ids, per
    forward, kept until backward: each of the three Linears saves its input (autocast's c-byte cast of the fp32
    embedding output for the first; the ReLU outputs, which the ReLUs save too, for the others: the same tensors)
    and the third Linear's bias is added in place: 3·c·h per virtual token and sequence (autocast; the adapter's
    bytes without). Its autocast weight copies are in ``temporaries.weight_copy_bytes`` (outside the layers)."""
    if method is not Method.P_TUNING:
        return 0
    return 3 * (dt.c if dt.autocast else dt.adapter) * model.hidden_size * virtual_tokens * sequences


def vera_saved(walk, width_in: int, width_out: int, rank: int) -> None:
    """What VeRA saves on one target (``tuners/vera/layer.py:285``: ``result + lambda_b * F.linear(lambda_d *
    F.linear(dropout(x), sliced_A), sliced_B)``), added to the layer walk. Per token: the first projection's output
    h1 (saved by ``lambda_d *`` for lambda_d's gradient, c·r) and the second's h2 (saved by ``lambda_b *``, c·n_out);
    x is not saved (vera_A is frozen; mm saves an operand only for the other operand's gradient). Per layer:
    autocast's copies of the sliced frozen projections (``vera_A[:, :in]``, ``vera_B[:out]``, cast on every call:
    autocast caches only leaves that require grad), which F.linear saves for its input's gradient: c·r·n_in only
    when x requires grad, c·n_out·r always (its input requires grad through lambda_d). The lambdas the products
    save are the parameters themselves (no copy)."""
    dt = walk.dt
    c = dt.c if dt.autocast else dt.adapter
    walk.per_token += c * rank + c * width_out
    walk.per_layer += round_up(c * rank * width_out)
    if walk.grad:
        walk.per_layer += round_up(c * rank * width_in)


def prefix_width(model: ModelSpec) -> int:
    """The width of one layer's key (or value) prefix, k·d: peft's ``utils/other.py:1198-1232``
    (``_prepare_prompt_learning_config``) sets ``token_dim = head_dim * num_key_value_heads`` for a config with
    ``num_key_value_heads`` (grouped-query attention), else the hidden size (a·d)."""
    return model.num_kv_heads * model.head_dim


def prefix_masked(method: Method) -> bool:
    """Prefix tuning always gives SDPA a 4-D mask: peft passes the prefixes as a ``DynamicCache`` of n positions
    (``peft_model.py:2150-2156``, ``get_prompt`` 779-893), so the key length is s + n and transformers cannot use
    ``is_causal`` (``masking_utils``: the causal skip needs equal query and key lengths)."""
    return method is Method.PREFIX


def prefix_saved_bytes(model: ModelSpec, method: Method, dt, sequences, seq_len, virtual_tokens: int):
    """What prefix tuning adds to the decoder layers' saved tensors beyond a masked attention over s keys
    (``activations``: the efficient kernel's q, k, v, output and logsumexp and the additive mask, per layer, with
    the walk's ``prefix`` flag: every layer's attention needs a gradient, the first one's too). Each layer's
    ``DynamicLayer.update`` (transformers ``cache_utils.py``) concatenates the n prefix positions before the
    layer's own keys and values, so the k and v the kernel saves are n positions longer: 2·c·w·n per sequence, w =
    a·d (``repeat_kv`` copies, a > k > 1, as SDPA gets them with a mask) or k·d; and the additive mask SDPA makes
    per call from the boolean one (``convert_boolean_attn_mask``) and the kernel saves is [b, 1, s, s + n]: c·s·n
    more per sequence. The prefix itself (the embedding's output and its cast) is not saved: the cat, the cast and
    the view need nothing for backward. Bytes: L·b·(2·c·w·n + c·s·n)."""
    if method is not Method.PREFIX:
        return 0
    c = dt.c if dt.autocast else dt.r
    a, k, d = model.num_heads, model.num_kv_heads, model.head_dim
    width = a * d if a > k > 1 else k * d
    return model.num_layers * sequences * (2 * c * width * virtual_tokens + c * seq_len * virtual_tokens)


def oft_block_size(in_features: int, block: int) -> int:
    """peft ``tuners/oft/layer.py:430-435, 490-508`` (``adjust_oft_parameters``): a block size that does not divide
    in_features becomes the nearest divisor (the lower one on a tie; in_features itself when larger)."""
    if in_features % block == 0 and block <= in_features:
        return block
    if block >= in_features:
        return in_features
    higher = block
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = block
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if block - lower <= higher - block else higher


# OFT's [in/b, b, b] tensors each target's forward saves (``oft_saved``): autocast's c-byte casts of the
# skew-symmetric Q for the three bmm calls of ``_cayley_batch`` (bmm(Q, Q) casts both operands: 4 casts) and the
# two bmm outputs the next bmm saves (Q², Q³); and the einsum's cast of the rotation R, saved only when the input
# needs a gradient
OFT_SAVED_BLOCK_TENSORS = 4 + 2


def oft_saved(walk, width_in: int, x_bytes: int, x_saved: bool, block_size: int) -> bool:
    """What OFT saves on one target (``tuners/oft/layer.py:638-659``, ``Linear.forward``, and ``OFTRotationModule``
    245-284), added to the layer walk; returns whether the shared input is now saved. The input is cast to the
    adapter dtype and rotated block by block, ``einsum("...rk,rkc->...rc", x, R)`` with R from
    ``_cayley_batch`` (118-156: the Neumann series I + 2Q + 2Q² + 2Q³ + Q⁴ with the default 5 terms, three bmm),
    then the frozen base Linear runs on the rotated input (it saves nothing: its weight is frozen). Per token: the
    einsum's bmm saves its c-byte cast of the input (for R's gradient), c·n_in per target (under autocast; without,
    the input itself, shared). Per layer: ``OFT_SAVED_BLOCK_TENSORS`` c-byte [n_in/b, b, b] tensors, one more
    (R's cast) when the input needs a gradient."""
    dt = walk.dt
    c = dt.c if dt.autocast else dt.adapter
    if dt.autocast and dt.adapter != c:
        walk.per_token += c * width_in
    elif dt.adapter != x_bytes:
        walk.per_token += dt.adapter * width_in
    elif not x_saved:
        walk.per_token += x_bytes * width_in
        x_saved = True
    walk.per_layer += (OFT_SAVED_BLOCK_TENSORS + (1 if walk.grad else 0)) * round_up(c * width_in * block_size)
    return x_saved


def adalora_orth_reg_bytes(model: ModelSpec, method: Method, lora_modules: tuple[str, ...], rank: int, dt) -> int:
    """AdaLoRA's orthogonal regularization (``tuners/adalora/model.py:229-257``), added to the loss after the model's
    forward: ``p @ p.T`` for every lora_A [r, in] and ``p.T @ p`` for every lora_B [out, r], under autocast. ``p`` (a
    leaf) is cast once into autocast's cache, ``p.T`` (a view, never cached) is cast again, and the matmul saves both
    16-bit copies for backward: 2·c·r·(in + out) per target and layer, alive from the loss to the start of backward
    (0 without autocast in 16 bits, where no copy is made, or for another method)."""
    if method is not Method.ADALORA or not dt.autocast or dt.c == dt.adapter:
        return 0
    linears = {module.name: module for module in model.inventory.linears}
    total = 0
    for name in lora_modules:
        module = linears[name]
        total += module.count * 2 * (round_up(dt.c * rank * module.in_features)
                                     + round_up(dt.c * module.out_features * rank))
    return total


def delta_weight_saved(walk, width_in: int, width_out: int, x_bytes: int, x_saved: bool, kron: bool,
                       rank: int = 0) -> bool:
    """LoHa and LoKr rebuild the target's whole weight update every forward and apply it with ``F.linear(input,
    delta_weight)`` (``tuners/loha/layer.py:266-273``, ``tuners/lokr/layer.py:336-343``), which saves the input and,
    when the input requires grad, the [out, in] update: a full 16-bit copy of every targeted weight per layer.
    LoHa: ``HadaWeight.forward`` (``loha/layer.py:366-371``) runs its two matmuls under autocast, so the update is
    c-byte and the input goes in as it is (saved once with the other readers of x). LoKr: ``torch.kron(w1, w2_a @
    w2_b)`` (``lokr/layer.py:497-503``) promotes to the adapter dtype, the input is cast to it
    (``_cast_input_dtype``) and autocast casts both back to c bytes: F.linear saves those copies (c·n_in per token,
    c·n_out·n_in per layer), and kron saves w2 (c·o2·i2, small). Without autocast a LoHa update is in the adapter
    dtype too, and ``_cast_input_dtype`` (``loha/layer.py:271``) casts an input of another dtype to it, per target:
    F.linear saves that cast (adapter bytes · n_in per token), not x. Returns whether x itself is now saved."""
    dt = walk.dt
    c = dt.c if dt.autocast else dt.adapter
    if kron:
        walk.per_token += c * width_in
        (_, out_k), (_, in_n) = lokr_shape(width_out, width_in)
        if rank < max(out_k, in_n) / 2:  # w2 = w2_a @ w2_b, a c-byte product kron saves (for w1's gradient)
            walk.per_layer += round_up(c * out_k * in_n)
    elif c != x_bytes:  # the input cast to the update's dtype, saved by this target's F.linear
        walk.per_token += c * width_in
    elif not x_saved:
        walk.per_token += x_bytes * width_in
        x_saved = True
    if walk.grad:
        walk.per_layer += round_up(c * width_out * width_in)
    return x_saved


def lokr_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft ``tuners/lokr/layer.py::factorization`` (lines 440-489), restated: the divisor pair of ``dimension``
    closest to its square root (with the default factor -1), smaller first."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def lokr_shape(out_features: int, in_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((out_l, out_k), (in_m, in_n)) of a Linear target (``lokr/layer.py:199-201``)."""
    return lokr_factorization(out_features), lokr_factorization(in_features)
