"""``infer()``: the memory of serving a model, as a ``MemoryBreakdown`` keyed by ``InferenceTerm``.

Per engine (rules and sources in ``engines.py``):
- ``hf`` (transformers ``generate``): the tensor terms of the larger of the prefill (a prompt of ``prompt_len`` tokens,
  default ``context - 2``) and the last decode step (the cache at ``context - 1`` tokens), exactly as the serving
  trace records them (``hf_engine.py``); runtime as ``terms/runtime.py``; no engine reservation.
- ``vllm``: weights, the KV blocks ``concurrency`` requests of ``context`` tokens need, the profiling peak of a
  ``max_num_batched_tokens`` chunk and its dummy sampler, non-torch memory, and ``engine_reserved`` = CUDA graphs +
  the ``1 - gpu_memory_utilization`` share vLLM never touches. ``total_bytes <= GPU memory`` is then exactly "the
  requests fit in vLLM's KV pool".
- ``sglang``: weights, the token-pool slots the requests need, non-torch memory; the ``1 - mem_fraction_static``
  share is the reservation, activations and logits of a prefill chunk shown inside it.
"""

from __future__ import annotations

from ..breakdown import MemoryBreakdown
from ..catalogue import get_gpu, get_model
from ..errors import VramcalcError
from ..model import ModelSpec
from ..terms import runtime
from .engines import (
    VLLM_BLOCK_SIZE,
    VLLM_CUDA_GRAPH_BYTES,
    VLLM_DEFAULT_GPU_MEMORY_UTILIZATION,
    VLLM_DEFAULT_MAX_NUM_SEQS,
    non_torch_bytes,
    sglang_default_mem_fraction,
    vllm_default_max_num_batched_tokens,
)
from .bisection import largest
from .hf_engine import decode_moment, prefill_moment
from .kv_cache import kv_bytes_per_token, paged_bytes_per_request
from .terms import Engine, HfCache, InferencePhase, InferenceTerm, KvDtype, Weights
from .throughput import throughput, usd_per_million_tokens
from .weights import engine_rope_cache_bytes, hf_buffer_bytes, lora_bytes, weight_bytes

T = InferenceTerm
MAX_SEARCH = 1 << 24


def _positive(name: str, value, minimum: int = 1) -> int:
    """An integer >= minimum; integer text ("8192", as the CLI and the web form pass it) is accepted."""
    if isinstance(value, str):
        try:
            value = int(value.strip().replace("_", ""))
        except ValueError:
            raise VramcalcError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise VramcalcError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _fraction(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise VramcalcError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not 0 < number <= 1:
        raise VramcalcError(f"{name} must be in (0, 1], got {value!r}")
    return number


def vllm_activation_bytes(spec: ModelSpec, tokens: int, tp: int, element_bytes: int) -> int:
    """Peak transients of vLLM's profiling forward over ``tokens`` tokens (fused kernels, per GPU): residual, hidden
    and normed [M, h]; then either the attention (qkv [M, (a+2k)d/tp] and output [M, a·d/tp]) or the MLP (merged
    gate_up [M, 2I/tp] and SiluAndMul [M, I/tp], or a plain fc1 [M, I/tp] and its GELU; fused MoE ``intermediate_cache1..3`` [M, K, 2I/tp], [M·K, I/tp],
    [M, K, h])."""
    e, h, M = element_bytes, spec.hidden_size, tokens
    a, k = spec.num_heads // tp or 1, max(1, spec.num_kv_heads // tp)
    if spec.traits.mla:
        attention = M * (a * spec.qk_head_dim * 2 + a * (spec.qk_nope_head_dim + spec.v_head_dim) + a * spec.v_head_dim)
    else:
        attention = M * ((a + 2 * k) * spec.head_dim + a * spec.head_dim)
    mlp = 0
    if spec.num_dense_layers:  # gated: gate_up [M, 2I] + SiluAndMul [M, I]; plain (phi, gpt_neox): fc1 + its GELU
        mlp = M * (3 if spec.traits.gated_mlp else 2) * -(-spec.intermediate_size // tp)
    if spec.num_moe_layers:
        I = -(-spec.expert_width // tp)
        mlp = max(mlp, M * spec.experts_per_token * (3 * I + h) + M * spec.num_experts * 2)
    return e * (3 * M * h + max(attention, mlp))


def vllm_sampler_bytes(spec: ModelSpec, max_num_seqs: int, tp: int) -> int:
    """The dummy sampler run of the profile: fp32 logits [max_num_seqs, V] and two fp32 copies (softmax, logprobs);
    assumption, counted once per GPU (vLLM gathers the logits on every rank)."""
    return 3 * max_num_seqs * spec.vocab_size * 4


def infer(model, *, context: int = 4096, concurrency: int = 1, batch_size: int | None = None,
          prompt_len: int | None = None, weights="bf16", kv_dtype="auto", engine=None, gpu=None, tp: int = 1,
          lora_rank: int = 0, hf_cache="dynamic", gpu_memory_utilization: float | None = None,
          max_num_batched_tokens: int | None = None, mem_fraction_static: float | None = None,
          trace: bool = False, answers: bool = True) -> MemoryBreakdown:
    """The memory of serving ``model``: ``concurrency`` sequences of ``context`` tokens (prompt + generated) each.

    ``engine`` defaults to ``vllm``, or ``hf`` with ``trace=True`` (the trace runs transformers' ``generate``).
    ``batch_size``: sequences per forward (offline batch inference; defaults to ``concurrency``).
    With a GPU, ``details`` also answers the largest concurrency that fits, decode tokens/s and $ per million
    generated tokens (``answers=False`` skips them: the searches call it so).
    """
    spec = get_model(model)
    context = _positive("context", context, 2)
    concurrency = _positive("concurrency", concurrency)
    tp = _positive("tp", tp)
    lora_rank = _positive("lora_rank", lora_rank or 0, 0)
    fmt = Weights.parse(weights, "weights")
    kv = KvDtype.parse(kv_dtype, "kv-dtype")
    if engine is None:
        engine = Engine.HF if trace else Engine.VLLM
    if max_num_batched_tokens is not None:
        max_num_batched_tokens = _positive("max_num_batched_tokens", max_num_batched_tokens)
    eng = Engine.parse(engine, "engine")
    cache = HfCache.parse(hf_cache, "hf-cache")
    device = get_gpu(gpu) if gpu is not None else None
    batch = _positive("batch_size", batch_size) if batch_size is not None else concurrency
    if spec.num_heads % tp:
        raise VramcalcError(f"tp {tp} must divide the {spec.num_heads} attention heads of {spec.name}")
    if trace and eng is not Engine.HF:
        raise VramcalcError("the serving trace runs transformers' generate: use --engine hf with --trace")
    if trace and lora_rank:
        raise VramcalcError("the serving trace runs the base model only; --lora-rank is estimated, not traced "
                            "(drop --trace, or --lora-rank)")
    if eng is Engine.HF:
        if tp > 1:
            raise VramcalcError("the hf engine runs one GPU; use --engine vllm or sglang for --tp > 1")
        if kv is KvDtype.FP8:
            raise VramcalcError("transformers' DynamicCache/StaticCache store the compute dtype; --kv-dtype fp8 "
                                "needs --engine vllm or sglang")
    prompt = context - 2 if prompt_len is None else _positive("prompt_len", prompt_len)
    if prompt >= context:
        raise VramcalcError(f"prompt_len {prompt} must be below context {context}")
    e = fmt.compute_dtype.bytes
    kv_e = kv.element_bytes(fmt)
    w_bytes = weight_bytes(spec, fmt, tp) + lora_bytes(spec, lora_rank, tp, e)
    inputs = {"model": spec.name, "engine": eng.value, "context": context, "concurrency": concurrency,
              "batch_size": batch, "prompt_len": prompt, "weights": fmt.value, "kv_dtype": kv.value, "tp": tp,
              "lora_rank": lora_rank, "gpu": device.name if device else None}
    details = {"params": spec.params, "active_params": spec.active_params,
               "kv_bytes_per_token": kv_bytes_per_token(spec, kv_e, tp)}
    warnings: list[str] = []
    if lora_rank and eng is Engine.HF:
        warnings.append("hf engine with a LoRA adapter: the adapter's weights are counted, its forward transients "
                        "(peft's lora_B outputs beside each base output) are not")
    if spec.max_position_embeddings and context > spec.max_position_embeddings:
        warnings.append(f"context {context} exceeds {spec.name}'s max_position_embeddings {spec.max_position_embeddings}")

    if eng is Engine.HF:
        inputs["hf_cache"] = cache.value
        w_bytes += hf_buffer_bytes(spec)
    else:
        w_bytes += engine_rope_cache_bytes(spec, e)
    if eng is Engine.HF:
        terms, phase, extra = _hf_terms(spec, fmt, cache, batch, prompt, context, e, device, trace, w_bytes)
        details.update(extra)
    elif eng is Engine.VLLM:
        util = _fraction("gpu_memory_utilization", gpu_memory_utilization
                         if gpu_memory_utilization is not None else VLLM_DEFAULT_GPU_MEMORY_UTILIZATION)
        chunk = max_num_batched_tokens or vllm_default_max_num_batched_tokens(device)
        chunk = _positive("max_num_batched_tokens", chunk)
        inputs.update(gpu_memory_utilization=util, max_num_batched_tokens=chunk, block_size=VLLM_BLOCK_SIZE)
        terms, phase, extra = _vllm_terms(spec, fmt, kv_e, tp, concurrency, context, chunk, util, device, w_bytes)
        details.update(extra)
    else:
        frac = _fraction("mem_fraction_static", mem_fraction_static
                         if mem_fraction_static is not None else sglang_default_mem_fraction(tp))
        chunk = _positive("max_num_batched_tokens",
                          max_num_batched_tokens or vllm_default_max_num_batched_tokens(device))
        inputs.update(mem_fraction_static=frac, chunked_prefill_size=chunk)
        terms, phase, extra = _sglang_terms(spec, fmt, kv_e, tp, concurrency, context, chunk, frac, device, w_bytes)
        details.update(extra)

    breakdown = MemoryBreakdown(spec.name, terms, phase, inputs, "trace" if trace else "estimate", device,
                                tuple(warnings), details)
    if device is not None and answers:
        _answers(breakdown, spec, fmt, kv_e, tp, concurrency, context, prompt, device, eng,
                 dict(model=spec, context=context, prompt_len=prompt_len, weights=fmt, kv_dtype=kv, engine=eng,
                      gpu=device, tp=tp, lora_rank=lora_rank, hf_cache=cache,
                      gpu_memory_utilization=gpu_memory_utilization, max_num_batched_tokens=max_num_batched_tokens,
                      mem_fraction_static=mem_fraction_static))
    return breakdown


def _hf_terms(spec, fmt, cache, batch, prompt, context, e, device, trace, w_bytes):
    static_len = context - 1 if cache is HfCache.STATIC else None
    pre = prefill_moment(spec, batch, prompt, element_bytes=e, static_len=static_len)
    dec = decode_moment(spec, batch, context, element_bytes=e, static_len=static_len, prompt=prompt) \
        if context - prompt >= 2 else None
    extra = {"prefill_tensor_bytes": w_bytes + pre.total,
             "decode_tensor_bytes": w_bytes + dec.total if dec else None}
    phase, moment = (InferencePhase.DECODE, dec) if dec and dec.total >= pre.total else (InferencePhase.PREFILL, pre)
    tensor = {T.WEIGHTS: w_bytes, T.KV_CACHE: moment.kv_cache, T.ACTIVATIONS: moment.activations,
              T.LOGITS: moment.logits}
    if trace:
        from .trace import run_inference_trace

        result = run_inference_trace(spec, batch_size=batch, prompt_len=prompt, new_tokens=context - prompt,
                                     weights=fmt, cache=cache)
        phase = result.peak_phase
        tensor = {term: int(result.phase_terms[phase][term]) for term in act_terms()}
        extra.update(trace_seconds=round(result.seconds, 3),
                     trace_prefill_tensor_bytes=sum(result.phase_terms[InferencePhase.PREFILL].values()),
                     trace_decode_tensor_bytes=sum(result.phase_terms.get(InferencePhase.DECODE, {}).values()) or None,
                     trace_cache_bytes_final=result.cache_bytes_final)
    peak = sum(tensor.values())
    terms = dict(tensor)
    terms[T.RUNTIME_OVERHEAD] = non_torch_bytes(device, 1)
    terms[T.ALLOCATOR_SLACK] = int(runtime.INFERENCE_SLACK_FRACTION * peak)
    terms[T.ENGINE_RESERVED] = 0
    return terms, phase, extra


def act_terms():
    return (T.WEIGHTS, T.KV_CACHE, T.ACTIVATIONS, T.LOGITS)


def _vllm_terms(spec, fmt, kv_e, tp, concurrency, context, chunk, util, device, w_bytes):
    e = fmt.compute_dtype.bytes
    per_request = paged_bytes_per_request(spec, context, element_bytes=kv_e, block_size=VLLM_BLOCK_SIZE, tp=tp)
    activations = vllm_activation_bytes(spec, chunk, tp, e)
    # the profile's peak is the larger of the forward and the sampler run after it: logits count only the excess
    logits = max(0, vllm_sampler_bytes(spec, VLLM_DEFAULT_MAX_NUM_SEQS, tp) - activations)
    non_torch = non_torch_bytes(device, tp)
    reserved = VLLM_CUDA_GRAPH_BYTES
    extra = {"kv_bytes_per_request": per_request}
    if device is not None:
        budget = int(util * device.memory_bytes)
        reserved += device.memory_bytes - budget
        pool = max(0, budget - w_bytes - activations - logits - non_torch - VLLM_CUDA_GRAPH_BYTES)
        block_bytes = VLLM_BLOCK_SIZE * kv_bytes_per_token(spec, kv_e, tp)
        blocks = pool // block_bytes
        extra.update(kv_pool_bytes=pool, gpu_blocks=blocks, kv_pool_tokens=blocks * VLLM_BLOCK_SIZE,
                     vllm_log_max_concurrency=round(blocks * VLLM_BLOCK_SIZE / context, 2))
    terms = {T.WEIGHTS: w_bytes, T.KV_CACHE: concurrency * per_request, T.ACTIVATIONS: activations, T.LOGITS: logits,
             T.RUNTIME_OVERHEAD: non_torch, T.ALLOCATOR_SLACK: 0, T.ENGINE_RESERVED: reserved}
    return terms, InferencePhase.DECODE, extra


def _sglang_terms(spec, fmt, kv_e, tp, concurrency, context, chunk, frac, device, w_bytes):
    e = fmt.compute_dtype.bytes
    per_token = kv_bytes_per_token(spec, kv_e, tp)
    activations = vllm_activation_bytes(spec, chunk, tp, e)
    logits = 0
    non_torch = non_torch_bytes(device, tp)
    reserved = 0
    extra = {"kv_bytes_per_request": per_token * context}
    if device is not None:
        headroom = device.memory_bytes - int(frac * device.memory_bytes)
        reserved = max(0, headroom - activations - logits)
        pool = max(0, int(frac * device.memory_bytes) - w_bytes - non_torch)
        extra.update(kv_pool_bytes=pool, kv_pool_tokens=pool // per_token)
    terms = {T.WEIGHTS: w_bytes, T.KV_CACHE: concurrency * context * per_token, T.ACTIVATIONS: activations,
             T.LOGITS: logits, T.RUNTIME_OVERHEAD: non_torch, T.ALLOCATOR_SLACK: 0, T.ENGINE_RESERVED: reserved}
    return terms, InferencePhase.DECODE, extra


def max_concurrency(model, *, gpu, context: int, **options) -> int:
    """Largest number of concurrent sequences of ``context`` tokens that fit on ``gpu`` (0 if none)."""
    options.pop("concurrency", None)
    options.pop("batch_size", None)
    options.pop("answers", None)
    return largest(lambda n: infer(model, gpu=gpu, context=context, concurrency=n, answers=False, **options).fits(), 1)


def _answers(breakdown, spec, fmt, kv_e, tp, concurrency, context, prompt, device, eng, options) -> None:
    """Add the largest concurrency that fits at this context, decode speed and cost to ``details``."""
    details = breakdown.details
    best = max_concurrency(**options)
    details["fits"] = breakdown.fits()
    details["max_concurrency"] = best
    batch = breakdown.inputs["batch_size"]
    speed = throughput(spec, device, weights=fmt, kv_element_bytes=kv_e, batch=batch, context=context, prompt=prompt,
                       tp=tp)
    if speed is not None:
        details.update(speed.to_dict())
        if best >= 1 and best != batch:
            at_best = throughput(spec, device, weights=fmt, kv_element_bytes=kv_e, batch=best, context=context,
                                 prompt=prompt, tp=tp)
            details["decode_tokens_per_s_at_max_concurrency"] = round(at_best.decode_tokens_per_s, 1)
        price = usd_per_million_tokens(device, tp, speed.decode_tokens_per_s)
        if price is not None:
            details["usd_per_million_generated_tokens"] = round(price, 4)
            details["price_basis"] = f"{device.cloud_usd_per_gpu_hour} $/GPU-h ({device.cloud_price_basis}, {device.cloud_price_date})"
    from .hosted import hosted_prices_for  # reads data/hosted_inference.csv once, on first use

    details["hosted_api_prices"] = [p.to_dict() for p in hosted_prices_for(spec)]
