"""The ``load`` phase's reserved memory under ``--load requantize`` (torchtune 0.1.x with torchao 0.1): the device
allocations and frees of the model build and ``load_state_dict``, generated from the model's tensor inventory in
torchtune 0.1.1's order and replayed through the caching allocator model (``tracing/caching_allocator.py``,
standard library only).

Why a replay: the load phase's transients are [n, 16] bf16 blocks (32 B per weight each) that torchao 0.1's
nearest-NF4 search cuts from fresh segments; the permanent NF4 codes made right after split those segments, so the
next, larger search (an MLP Linear after the attention ones) cannot reuse them and ``cudaMalloc``s again. The
high-water mark of ``torch.cuda.memory_reserved`` is set there, well above the allocated peak
(``loading.load_peak_bytes``), and no ``empty_cache`` gives it back before training (the recipe never calls it):
Llama-2-7B 9.13 GB reserved after model init against about 7.3 GB allocated (torchtune's QLoRA tutorial;
docs/stacks-research.md section 2, docs/evidence/torchtune01_reserved/). These blocks decide the fit too: replayed
with less device memory (``capacity_bytes``: the cached whole segments released and the ``cudaMalloc`` retried),
the same sequence runs out of memory below 9.13 GB, so the estimate counts them in ``allocator_slack``.

The sequence (``torchtune_01_load_events``) and its sources (torchtune 0.1.1 and torchao 0.1 wheels from PyPI):

1. ``lora_llama2`` builds ONE decoder layer on the GPU under ``set_default_dtype(bf16)``
   (``models/llama2/_component_builders.py:198-250``): q, k, v, output_proj (``lora_llama2_self_attention``
   :319-364), the rotary embedding, w1, w2, w3 (``lora_llama2_mlp`` :390-416), then the two RMSNorm scales
   (arguments of ``TransformerDecoderLayer``), the embedding, the output Linear and the final norm (an argument of
   ``TransformerDecoder``, evaluated before its ``__init__`` runs). A quantized ``LoRALinear`` builds an
   ``nn.Linear`` in bf16 and ``to_nf4``s its weight, the bf16 weight dying when ``_create_weight_and_bias``
   returns, then makes lora_a [r, in] and lora_b [out, r] (``modules/peft/lora.py:58-69,87-94``). The rotary
   embedding computes ``theta`` and its [max_seq_len, d/2, 2] fp32 cache (``modules/position_embeddings.py:52-73``).
2. ``TransformerDecoder`` deep-copies that layer ``num_layers`` times (``modules/transformer.py:81-93,137``), in
   module order: sa_norm, attn (q, k, v, output_proj, each weight then lora_a, lora_b; the rotary buffers),
   mlp_norm, mlp (w1, w2, w3). ``Parameter.__deepcopy__`` clones each weight: a plain tensor is copied once; an NF4
   weight goes through torchtune's ``aten.clone`` override, ``to_nf4(get_original_weight())``
   (``utils/_register_nf4_dispatch_ops.py:11-19``): it dequantizes, then quantizes again. The template layer dies
   when the builder returns.
3. ``model.load_state_dict`` (``recipes/lora_finetune_single_device.py:254-269``) in module order; each NF4
   weight's ``copy_`` is torchtune's override (``_register_nf4_dispatch_ops.py:22-42``): ``to_nf4(src.to(device))``,
   the checkpoint tensor moved to the GPU in its own dtype, quantized beside the whole model, then the old codes
   replaced. A plain tensor's ``param.copy_(cpu_tensor)`` converts on the host and copies in place (a blocking
   host-to-device copy converts on the CPU: ``aten/src/ATen/native/cuda/Copy.cu`` ``copy_kernel_cuda``): nothing
   on the device.

``to_nf4`` of n weights (torchao 0.1 ``dtypes/nf4tensor.py``; ``_to_nf4_events``), with b = n/64 blocks and
c = b/256 scaler blocks, in bytes: ``tensor.to(bf16)`` (2n, only for a non-bf16 source, :588), the 16-entry LUT
(:237-258), ``double_quantize_scalers`` (:292-349: ``get_block_absmax``'s ``abs`` 2n with ``max(dim=1)``'s values
2b and int64 indices 8b, the mean, ``scalers_1 - mean`` 2b, the second absmax 2b / 2c / 8c, ``256 / (2 *
absmax)`` materialised at [c, 256]: 2b three times, the quantized scalers 2b three times and their int8 copy b),
``convert_to_norm_float_weight`` (:378-407: the absmax again, ``blocks / scales`` 2n, then
``quantize_tensor_nearest`` :438-446: ``value - nf4`` and ``.abs()`` 32n each, ``min(dim=-1)``'s values 2n and
indices 8n, the packing ``<< 4`` and ``|`` on int64 4n each, the uint8 codes n/2). The NF4 weight keeps the LUT,
the mean, the [c, 256] factor (2b: ``quantization_factor[:, 0]`` is a view), the int8 scalers (b) and the codes
(n/2). ``get_original_weight`` (:409-435): ``>> 4`` and ``& 0b1111`` (n/2 each) widened to int64 (4n each), the
LUT lookups (n each), the scalers dequantized (2b twice), each half scaled (a contiguous copy of the expanded
scalers, n, then the product, n), then ``torch.stack`` (2n).

Each storage is the size torch gives it (the allocator model rounds it); the order of the frees within one run of
frees (a function's locals on return) does not change the allocator's state. Checked against the sequence torchao
0.1's own code records on fake tensors (``docs/evidence/torchtune01_reserved/events.py``, tests/test_load_reserved.py).
Assumed as ``loading.py`` does: the checkpoint is 16-bit and not bf16 (Llama-2-7b-hf ships fp16), so ``to_nf4``
copies it once more. Left out: the CUDA reduction kernels' own scratch (a few KB), the CUDA context. Inventories
torchtune 0.1.1's builders cannot make (a layer unlike the others, mixture-of-experts) get no replay
(``torchtune_01_load_reserved_bytes`` returns 0 and the allocated peak stands).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..model import ModelSpec
from ..options import LoadPath, Method
from .parameters import COPY_INFIX, stored_tensors

_BF16 = 2  # torchtune 0.1.x QLoRA builds in bf16 (torchao 0.1 ``NF4Tensor.from_tensor`` asserts bfloat16)
_F32 = 4
_INT64 = 8
_NF4_BLOCK = 64  # to_nf4(block_size=64, scaler_block_size=256) (nf4tensor.py:587)
_NF4_SCALER_BLOCK = 256
_NF4_LUT_BYTES = 16 * _BF16  # the 16 NF4 values, bf16, on the weight's device
_SCALAR_BF16_BYTES = _BF16  # scalers_1.mean()
# torchtune 0.1.1's decoder layer, in its attribute (deep-copy and load) order: the attention projections, then the
# MLP's w1 (gate), w2 (down), w3 (up) (modules/attention.py:115-119, modules/feed_forward.py:31-33)
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "down_proj", "up_proj")
_CHECKPOINT_BYTES = 2  # a 16-bit checkpoint tensor moved to the GPU (fp16: to_nf4 converts it to bf16 again)


@dataclass(frozen=True)
class BuiltLinear:
    """One of a decoder layer's Linears as torchtune 0.1.1 builds it: ``numel`` weights, NF4 (``quantized``) or a
    plain tensor of ``weight_bytes``, and its LoRA matrices' bytes (lora_a, lora_b; empty without LoRA)."""

    numel: int
    quantized: bool
    weight_bytes: int
    adapter_bytes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Rope:
    """``RotaryPositionalEmbeddings(dim=head_dim, max_seq_len)``: the sizes its ``_rope_init`` allocates."""

    head_dim: int
    max_seq_len: int


class _Recorder:
    """Allocation and free events for ``caching_allocator.replay``, each allocation under a fresh key."""

    def __init__(self):
        self.events: list[tuple] = []
        self._next = 0

    def alloc(self, nbytes: int) -> int:
        key = self._next
        self._next += 1
        self.events.append(("alloc", key, nbytes))
        return key

    def free(self, *keys: int) -> None:
        self.events.extend(("free", key) for key in keys)


def _block_absmax(rec: _Recorder, n: int, block: int) -> int:
    """``get_block_absmax`` (nf4tensor.py:133-150) over n bf16 values: ``abs`` then ``max(dim=1)``; the values live."""
    absolute = rec.alloc(_BF16 * n)
    values = rec.alloc(_BF16 * (n // block))
    indices = rec.alloc(_INT64 * (n // block))
    rec.free(absolute, indices)
    return values


def _to_nf4_events(rec: _Recorder, n: int, source_is_bf16: bool) -> tuple[int, ...]:
    """torchao 0.1 ``to_nf4`` of n weights (module docstring): the keys of what the NF4 weight keeps."""
    b, c = n // _NF4_BLOCK, n // (_NF4_BLOCK * _NF4_SCALER_BLOCK)
    cast = None if source_is_bf16 else rec.alloc(_BF16 * n)  # tensor.to(torch.bfloat16) (:588)
    lut = rec.alloc(_NF4_LUT_BYTES)  # from_tensor's nf4 table (:237-258)
    # double_quantize_scalers (:292-349)
    scalers = _block_absmax(rec, n, _NF4_BLOCK)
    mean = rec.alloc(_SCALAR_BF16_BYTES)
    centred = rec.alloc(_BF16 * b)  # scalers_1 - scalers_1_mean
    rec.free(scalers)
    scaler_absmax = _block_absmax(rec, b, _NF4_SCALER_BLOCK)
    doubled = rec.alloc(_BF16 * b)  # 2 * scaler_absmax, expanded to [c, 256] (c * 256 = b values)
    reciprocal = rec.alloc(_BF16 * b)  # 256 / (...) = reciprocal * 256
    factor = rec.alloc(_BF16 * b)
    rec.free(reciprocal, doubled)
    product = rec.alloc(_BF16 * b)  # scaler_blocks * quantization_factor
    rounded = rec.alloc(_BF16 * b)
    rec.free(product)
    clamped = rec.alloc(_BF16 * b)
    rec.free(rounded)
    int8_scalers = rec.alloc(b)  # .to(torch.int8)
    rec.free(centred, scaler_absmax, clamped)
    # convert_to_norm_float_weight (:378-407)
    block_scalers = _block_absmax(rec, n, _NF4_BLOCK)
    scaled = rec.alloc(_BF16 * n)  # blocks / scales
    diff = rec.alloc(16 * _BF16 * n)  # quantize_tensor_nearest: value.unsqueeze(-1) - nf4, [n, 16]
    distance = rec.alloc(16 * _BF16 * n)  # .abs()
    rec.free(diff)
    nearest = rec.alloc(_BF16 * n)  # min(dim=-1): values
    indices = rec.alloc(_INT64 * n)  # and the int64 indices kept
    rec.free(nearest, distance)
    shifted = rec.alloc(_INT64 * (n // 2))  # quantized_blocks[::2] << 4
    packed = rec.alloc(_INT64 * (n // 2))  # ... | quantized_blocks[1::2]
    rec.free(shifted)
    codes = rec.alloc(n // 2)  # .to(torch.uint8)
    rec.free(block_scalers, scaled, indices, packed)
    if cast is not None:
        rec.free(cast)
    return lut, mean, factor, int8_scalers, codes


def _original_weight_events(rec: _Recorder, n: int) -> int:
    """torchao 0.1 ``NF4Tensor.get_original_weight`` (nf4tensor.py:409-435): the key of the bf16 weight it returns."""
    b = n // _NF4_BLOCK
    high = rec.alloc(n // 2)  # quantized_data >> 4
    first = rec.alloc(_INT64 * (n // 2))  # .to(torch.long)
    rec.free(high)
    low = rec.alloc(n // 2)  # quantized_data & 0b1111
    second = rec.alloc(_INT64 * (n // 2))
    rec.free(low)
    first_values = rec.alloc(_BF16 * (n // 2))  # nf4[value]
    second_values = rec.alloc(_BF16 * (n // 2))
    divided = rec.alloc(_BF16 * b)  # dequantize_scalers: inpt / quantization_factor
    scalers = rec.alloc(_BF16 * b)  # + scaler_mean
    rec.free(divided)
    scaled = []
    for _ in range(2):  # dequantized * repeated.flatten(): the expanded scalers copied, then the product
        repeated = rec.alloc(_BF16 * (n // 2))
        scaled.append(rec.alloc(_BF16 * (n // 2)))
        rec.free(repeated)
    stacked = rec.alloc(_BF16 * n)  # torch.stack([...], dim=-1)
    rec.free(first, second, first_values, second_values, scalers, *scaled)
    return stacked


def _rope_events(rec: _Recorder, rope: Rope) -> tuple[int, int]:
    """``RotaryPositionalEmbeddings._rope_init`` (torchtune 0.1.1 modules/position_embeddings.py:52-73): the keys of
    its ``theta`` and ``cache`` buffers."""
    half = rope.head_dim // 2
    steps = rec.alloc(_INT64 * (-(-rope.head_dim // 2)))  # torch.arange(0, dim, 2)
    as_float = rec.alloc(_F32 * half)  # [: dim // 2].float()
    rec.free(steps)
    divided = rec.alloc(_F32 * half)  # / dim
    rec.free(as_float)
    powered = rec.alloc(_F32 * half)  # base ** (...)
    rec.free(divided)
    reciprocal = rec.alloc(_F32 * half)  # 1.0 / (...): Tensor.__rdiv__ = reciprocal() * 1.0
    theta = rec.alloc(_F32 * half)
    rec.free(reciprocal, powered)
    positions = rec.alloc(_F32 * rope.max_seq_len)  # build_rope_cache: torch.arange(max_seq_len)
    angles = rec.alloc(_F32 * rope.max_seq_len * half)  # einsum("i, j -> ij")
    cos = rec.alloc(_F32 * rope.max_seq_len * half)
    sin = rec.alloc(_F32 * rope.max_seq_len * half)
    cache = rec.alloc(2 * _F32 * rope.max_seq_len * half)  # torch.stack([cos, sin], dim=-1)
    rec.free(sin, cos, positions, angles)
    return theta, cache


def _rope_buffer_bytes(rope: Rope) -> tuple[int, int]:
    """``theta`` and ``cache``: what a deep copy of the rotary embedding allocates."""
    half = rope.head_dim // 2
    return _F32 * half, 2 * _F32 * rope.max_seq_len * half


def torchtune_01_load_events(attention: tuple[BuiltLinear, ...], mlp: tuple[BuiltLinear, ...], norm_bytes: int,
                             rope: Rope | None, num_layers: int, embedding_bytes: int, output: BuiltLinear | None,
                             checkpoint_is_bf16: bool = False) -> tuple[tuple, ...]:
    """The device allocations and frees of torchtune 0.1.1's QLoRA (or LoRA) model build and ``load_state_dict``,
    in program order, as ``caching_allocator.replay`` events (module docstring: the three stages and their sources).

    ``attention``: q, k, v, output_proj; ``mlp``: w1 (gate), w2 (down), w3 (up), each a ``BuiltLinear``;
    ``norm_bytes``: one RMSNorm scale; ``rope``: the layer's rotary embedding (None: none); ``embedding_bytes``:
    tok_embeddings; ``output``: the output Linear (None: tied, nothing built); ``checkpoint_is_bf16``: whether
    ``to_nf4`` can skip its cast of the checkpoint tensor (Llama-2-7b-hf's is fp16: no)."""
    rec = _Recorder()

    def build_linear(linear: BuiltLinear) -> tuple[list[int], list[int]]:
        """(the weight's keys, the adapters' keys) of a Linear the builder makes"""
        if linear.quantized:  # LoRALinear(quantize_base=True): nn.Linear in bf16, to_nf4, the bf16 weight dies
            weight = rec.alloc(_BF16 * linear.numel)
            kept = list(_to_nf4_events(rec, linear.numel, source_is_bf16=True))
            rec.free(weight)
        else:
            kept = [rec.alloc(linear.weight_bytes)]
        return kept, [rec.alloc(nbytes) for nbytes in linear.adapter_bytes]

    def clone_linear(linear: BuiltLinear) -> list[int]:
        """the weight's keys of a Linear's deep copy (its adapters copied after it)"""
        if linear.quantized:  # torchtune's aten.clone: to_nf4(get_original_weight())
            original = _original_weight_events(rec, linear.numel)
            weight = list(_to_nf4_events(rec, linear.numel, source_is_bf16=True))
            rec.free(original)
        else:
            weight = [rec.alloc(linear.weight_bytes)]
        for nbytes in linear.adapter_bytes:
            rec.alloc(nbytes)
        return weight

    def requantize(linear: BuiltLinear, old: list[int]) -> None:
        """torchtune's NF4 ``copy_``: to_nf4(src.to(device)) beside the model, then the old parts replaced"""
        source = rec.alloc(_CHECKPOINT_BYTES * linear.numel)
        _to_nf4_events(rec, linear.numel, source_is_bf16=checkpoint_is_bf16)
        rec.free(source)
        rec.free(*old)

    # 1. the template layer (lora_llama2, _component_builders.py:198-250), the embedding, output and final norm
    template = []
    for linear in attention:
        template += [key for keys in build_linear(linear) for key in keys]
    if rope is not None:
        template += _rope_events(rec, rope)
    for linear in mlp:
        template += [key for keys in build_linear(linear) for key in keys]
    template += [rec.alloc(norm_bytes), rec.alloc(norm_bytes)]  # sa_norm, mlp_norm
    rec.alloc(embedding_bytes)
    output_weight, _ = build_linear(output) if output is not None else ([], [])
    rec.alloc(norm_bytes)  # TransformerDecoder(norm=RMSNorm(...)): built before its __init__ runs
    # 2. _get_clones: copy.deepcopy(layer) num_layers times, in module order; then the template dies
    layers = []
    for _ in range(num_layers):
        rec.alloc(norm_bytes)  # sa_norm
        weights = [clone_linear(linear) for linear in attention]
        if rope is not None:
            for nbytes in _rope_buffer_bytes(rope):
                rec.alloc(nbytes)
        rec.alloc(norm_bytes)  # mlp_norm
        weights += [clone_linear(linear) for linear in mlp]
        layers.append(weights)
    rec.free(*template)
    # 3. load_state_dict in module order (layers, then output): each NF4 weight re-quantized
    for weights in layers:
        for linear, old in zip(attention + mlp, weights):
            if linear.quantized:
                requantize(linear, old)
    if output is not None and output.quantized:
        requantize(output, output_weight)
    return tuple(rec.events)


@functools.lru_cache(maxsize=64)
def torchtune_01_load_replay(attention: tuple[BuiltLinear, ...], mlp: tuple[BuiltLinear, ...], norm_bytes: int,
                             rope: Rope | None, num_layers: int, embedding_bytes: int, output: BuiltLinear | None,
                             checkpoint_is_bf16: bool = False):
    """``torchtune_01_load_events`` replayed through the caching allocator (``caching_allocator.replay``): its
    ``ReplayResult`` (``reserved_peak_bytes``: what ``torch.cuda.max_memory_reserved`` reads after model init).
    Cached: a few ms to tens of ms (about 31,000 events for Llama-2-7B), once per inventory."""
    from ..tracing.caching_allocator import replay  # standard library only (its module docstring)

    return replay(torchtune_01_load_events(attention, mlp, norm_bytes, rope, num_layers, embedding_bytes, output,
                                           checkpoint_is_bf16))


def torchtune_01_layout(model: ModelSpec, resolved) -> tuple | None:
    """The arguments of ``torchtune_01_load_events`` for a model's tensor inventory (``stored_tensors``), or None
    where torchtune 0.1.1's llama builders could not have built it: a decoder-layer tensor other than the seven
    Linears, their LoRA matrices and the two norms, or layers that differ (mixture-of-experts, dense-first)."""
    tensors = [t for t in stored_tensors(model, resolved) if COPY_INFIX not in t.name]
    per_layer = {t.name: t for t in tensors if t.scope != "model"}
    whole = {t.name: t for t in tensors if t.scope == "model"}
    layers = model.num_layers
    norm = per_layer.pop("layernorm.weight", None)
    if norm is None or norm.count != 2 * layers:
        return None

    def linear(name: str, pool: dict, count: int) -> BuiltLinear | None:
        weight = pool.pop(f"{name}.weight", None)
        if weight is None or weight.count != count:
            return None
        adapters = tuple(pool.pop(f"{name}.{part}").bytes_each for part in ("lora_A", "lora_B")
                         if f"{name}.{part}" in pool)
        return BuiltLinear(weight.numel, weight.kind == "quantized", weight.bytes_each, adapters)

    attention = tuple(linear(name, per_layer, layers) for name in _ATTENTION)
    mlp = tuple(linear(name, per_layer, layers) for name in _MLP)
    if per_layer or None in attention + mlp:
        return None
    embedding = whole.get("embed_tokens.weight")
    final_norm = whole.get("norm.weight")
    if embedding is None or final_norm is None:
        return None
    output = linear("lm_head", whole, 1) if "lm_head.weight" in whole else None
    rope = Rope(model.head_dim, model.max_position_embeddings or 4096)  # torchtune builders' max_seq_len
    return attention, mlp, norm.bytes_each, rope, layers, embedding.bytes_each, output


def torchtune_01_load_reserved_bytes(model: ModelSpec, resolved) -> int:
    """``max_memory_reserved`` at the end of the ``load`` phase under ``--load requantize`` (QLoRA): the replay of
    torchtune 0.1.1's build and ``load_state_dict`` (module docstring); 0 for any other load path or method, and for
    an inventory torchtune 0.1.1 could not build (``torchtune_01_layout``)."""
    setup = resolved.setup
    if setup.load is not LoadPath.REQUANTIZE or setup.method is not Method.QLORA:
        return 0
    layout = torchtune_01_layout(model, resolved)
    return torchtune_01_load_replay(*layout).reserved_peak_bytes if layout is not None else 0
