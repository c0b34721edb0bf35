"""The serving trace: transformers' real ``generate`` (prefill, then one-token decode steps) with its real cache
classes (``DynamicCache``, ``StaticCache``, their sliding-window layers, DeepSeek-V3's compressed-latent cache) at
full size on fake tensors, under the training trace's allocation tracker (``tracing/tracker.py``).

Reused as is: ``tracing/build.py`` (the real model on meta, materialised as fake tensors), ``tracing/tracker.py``
(dispatch-level allocation tracking), ``tracing/cuda_emulation.py`` (SDPA takes the CUDA backend's kernel).
What this module adds, each a GPU run's behaviour that fake tensors cannot show by themselves:

- Attribution: parameters and buffers are ``weights``; the keys and values every cache layer holds after each
  ``Cache.update`` are ``kv_cache``; everything from lm_head's forward to the next decoder forward (logits, the
  sampler's fp32 copy, argmax, the grown ``input_ids``) is ``logits``; every other allocation is ``activations``.
- Phases: ``prefill`` runs from the start of ``generate`` to the first sampled token; ``decode`` is every later step.
  Each phase's peak is snapshotted with each tensor's final role.
- Data-dependent reads: fake tensors hold no values, so (a) the stop check answers from the length alone (generation
  runs to ``max_new_tokens``, as serving benchmarks run with ``ignore_eos``); (b) ``masking_utils._ignore_causal_mask_sdpa``
  answers what it answers on a GPU for an unpadded batch (every key position holds a token), which transformers
  cannot read from a fake mask; (c) any other scalar read (``generate``'s right-padding warning) reads 0.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from ..model import ModelSpec
from .terms import HfCache, InferencePhase, InferenceTerm, Weights

_FAMILIES_WITHOUT_CONFIG_WINDOW = ("mistral", "mixtral", "phi3")  # configs whose sliding_window default is not None


@dataclass(frozen=True)
class InferenceTraceResult:
    phase_terms: dict  # InferencePhase -> {InferenceTerm: bytes} at that phase's peak (tensor terms)
    cache_bytes_after_prefill: int  # storage bytes of every cache layer's keys and values after the prefill
    cache_bytes_final: int  # the same after the last decode step
    cache_bytes_by_step: tuple  # after each forward (0: prefill)
    seconds: float
    peak_records: dict  # InferencePhase -> [(term, ATen op, bytes)] live at that phase's peak (diagnostics)

    @property
    def peak_phase(self) -> InferencePhase:
        return max(self.phase_terms, key=lambda phase: sum(self.phase_terms[phase].values()))


def _tracker_class():
    from ..tracing.tracker import AllocationTracker

    class InferenceTracker(AllocationTracker):
        """The training tracker plus an inference label per record and a peak snapshot per serving phase."""

        def __init__(self):
            super().__init__()
            self.live_by_term[InferenceTerm.KV_CACHE] = 0
            self.label = InferencePhase.PREFILL
            self.label_peak: dict = {}
            self._label_pending: set = set()
            self._label_snapshots: dict = {}

        def _grown(self) -> None:
            super()._grown()
            if self.live_bytes > self.label_peak.get(self.label, -1):
                self.label_peak[self.label] = self.live_bytes
                self._label_pending.add(self.label)

        def _free(self, record) -> None:
            self._snapshot_labels()
            super()._free(record)

        def _resized(self, storage) -> None:
            self._snapshot_labels()
            super()._resized(storage)

        def _snapshot_labels(self) -> None:
            for label in self._label_pending:
                self._label_snapshots[label] = [(record, record.nbytes) for record in self._live.values()]
            self._label_pending.clear()

        def phase_terms(self) -> dict:
            from ..options import Term

            self._snapshot_labels()
            names = {Term.WEIGHTS: InferenceTerm.WEIGHTS, Term.LOGITS: InferenceTerm.LOGITS,
                     InferenceTerm.KV_CACHE: InferenceTerm.KV_CACHE}
            out = {}
            for label, records in self._label_snapshots.items():
                terms = {term: 0 for term in (InferenceTerm.WEIGHTS, InferenceTerm.KV_CACHE,
                                              InferenceTerm.ACTIVATIONS, InferenceTerm.LOGITS)}
                for record, nbytes in records:
                    terms[names.get(record.term, InferenceTerm.ACTIVATIONS)] += nbytes
                out[label] = terms
            return out

        def phase_records(self) -> dict:
            self._snapshot_labels()
            return {label: [(str(record.term), record.op, nbytes) for record, nbytes in records]
                    for label, records in self._label_snapshots.items()}

    return InferenceTracker


def hf_inference_config(spec: ModelSpec):
    """The transformers config of the spec with its cache on (the training trace's ``hf_config``, reused)."""
    from ..tracing.build import hf_config

    config = hf_config(spec)
    config.use_cache = True
    if spec.family in _FAMILIES_WITHOUT_CONFIG_WINDOW and not spec.sliding_window:
        config.sliding_window = None  # e.g. Mistral-7B-v0.3's config.json says null; MistralConfig defaults to 4096
    return config


def build_inference_model(spec: ModelSpec, weights: Weights, fake_mode):
    """The causal LM in 16 bits, eval mode, on fake CPU tensors."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..errors import VramcalcError
    from ..tracing.build import _materialise, _quiet, _restore_fp32_modules

    if not weights.is_16bit:
        raise VramcalcError(f"the serving trace runs 16-bit weights (bf16, fp16); got --weights {weights.value}")
    dtype = torch.float16 if weights is Weights.FP16 else torch.bfloat16
    attn = "sdpa" if spec.traits.supports_sdpa else "eager"
    try:
        config = hf_inference_config(spec)
        with _quiet(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
            _restore_fp32_modules(model)
    except Exception as err:  # transformers raises many types for configs it cannot build
        raise VramcalcError(f"transformers cannot build {spec.name} ({spec.family}): {err}".splitlines()[0]) from None
    with fake_mode:
        _materialise(model, "cpu")
    model.eval()
    model.requires_grad_(False)
    return model


class _ScalarReads:
    """A dispatch mode (entered inside the fake mode) that answers ``aten._local_scalar_dense`` with 0."""

    def __new__(cls):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        class ScalarReads(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    tensor = args[0]
                    return False if tensor.dtype == torch.bool else 0
                return func(*args, **(kwargs or {}))

        return ScalarReads()


@contextlib.contextmanager
def _gpu_decisions(state: dict):
    """Stop checks, causal-mask skipping: what a GPU run with real token values decides (module docstring)."""
    from transformers import masking_utils
    from transformers.generation import utils as generation_utils

    original_stop = generation_utils.StopCheck.__call__
    original_ignore = masking_utils._ignore_causal_mask_sdpa

    def stop(self, unfinished_sequences, tokens, length):
        return length >= state["max_length"]

    def ignore_causal_mask(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        # transformers' own rule for a mask whose positions up to the tokens seen so far are ones (unpadded batch)
        seen = state["tokens_before"] + q_length
        if local_attention_size is not None and kv_length >= local_attention_size:
            return False
        all_valid = padding_mask is None or kv_offset + kv_length <= seen
        if (q_length == 1 or kv_length == q_length) and all_valid:
            return True
        return state["tokens_before"] == 0  # empty cache: static padding lies only in future slots

    generation_utils.StopCheck.__call__ = stop
    masking_utils._ignore_causal_mask_sdpa = ignore_causal_mask
    try:
        yield
    finally:
        generation_utils.StopCheck.__call__ = original_stop
        masking_utils._ignore_causal_mask_sdpa = original_ignore


def cache_storage_bytes(cache, round_to: int) -> int:
    """Storage bytes (rounded as the tracker rounds) of every layer's keys and values, and a hybrid's conv states
    (``LinearAttentionLayer.conv_states``), each storage once."""
    seen = {}
    for layer in getattr(cache, "layers", []):
        states = tuple((getattr(layer, "conv_states", None) or {}).values())
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None), *states):
            if tensor is not None and hasattr(tensor, "untyped_storage"):
                storage = tensor.untyped_storage()
                seen[id(storage)] = -(-storage.nbytes() // round_to) * round_to if storage.nbytes() else 0
    return sum(seen.values())


def run_inference_trace(spec: ModelSpec, *, batch_size: int, prompt_len: int, new_tokens: int,
                        weights: Weights = Weights.BF16, cache: HfCache = HfCache.DYNAMIC,
                        sample: bool = False) -> InferenceTraceResult:
    """``model.generate`` of ``batch_size`` prompts of ``prompt_len`` tokens for ``new_tokens`` greedy tokens;
    ``sample``: multinomial sampling at temperature 1, no top-k/top-p (TRL GRPOTrainer's generation config,
    ``grpo_trainer.py:1155-1173`` with ``grpo_config.py`` defaults: ``do_sample=True``, temperature 1.0, top_p 1.0,
    top_k 0)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import cache_utils

    from ..tracing.cuda_emulation import cuda_kernel_emulation

    started = time.perf_counter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = build_inference_model(spec, weights, fake_mode)
    tracker = _tracker_class()()
    state = {"max_length": prompt_len + new_tokens, "tokens_before": 0}
    cache_steps: list[int] = []
    live_cache: list = []
    decoder = model.base_model  # model.model (Llama layout), model.gpt_neox, ...

    def decoder_pre_hook(module, args, kwargs):
        tracker.in_logits = False
        if state.get("forwards", 0) >= 1:
            tracker.label = InferencePhase.DECODE
        past = kwargs.get("past_key_values", kwargs.get("cache"))
        if past is not None:
            live_cache[:] = [past]
        # tokens already in the cache: 0 for the prefill, then prompt + (decode steps so far); a StaticCache's
        # length is a tensor, which a fake tensor cannot report
        forwards = state.get("forwards", 0)
        state["tokens_before"] = 0 if forwards == 0 else prompt_len + forwards - 1

    def decoder_hook(module, args, kwargs, output):
        state["forwards"] = state.get("forwards", 0) + 1
        if live_cache:
            cache_steps.append(cache_storage_bytes(live_cache[0], tracker.round_to))

    def head_pre_hook(module, args):
        tracker.in_logits = True

    original_update = cache_utils.Cache.update

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = original_update(self, key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                tracker.retag(tensor, InferenceTerm.KV_CACHE)
        return out

    original_conv_update = getattr(cache_utils.Cache, "update_conv_state", None)

    def update_conv_state(self, conv_states, layer_idx, *args, **kwargs):  # a hybrid's conv state is cache too
        out = original_conv_update(self, conv_states, layer_idx, *args, **kwargs)
        for tensor in (self.layers[layer_idx].conv_states or {}).values():
            if tensor is not None:
                tracker.retag(tensor, InferenceTerm.KV_CACHE)
        return out

    hooks = [decoder.register_forward_pre_hook(decoder_pre_hook, with_kwargs=True),
             decoder.register_forward_hook(decoder_hook, with_kwargs=True),
             model.get_output_embeddings().register_forward_pre_hook(head_pre_hook)]
    cache_utils.Cache.update = update
    if original_conv_update is not None:
        cache_utils.Cache.update_conv_state = update_conv_state
    implementation = "static" if cache is HfCache.STATIC else None
    try:
        with fake_mode:
            tracker.register_weights(list(model.parameters()) + list(model.buffers()))
            input_ids = torch.zeros(batch_size, prompt_len, dtype=torch.long)
            # the scalar policy innermost: it answers before the training trace's (cuda_emulation._fake_scalar)
            with torch.device("cpu"), tracker, cuda_kernel_emulation(sdpa=True), _ScalarReads(), _gpu_decisions(state):
                output = model.generate(
                    input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sample,
                    pad_token_id=0, eos_token_id=None, cache_implementation=implementation,
                    return_dict_in_generate=True, **(dict(temperature=1.0, top_p=1.0, top_k=0) if sample else {}),
                )
            final = cache_storage_bytes(output.past_key_values, tracker.round_to)
            del output
    finally:
        cache_utils.Cache.update = original_update
        if original_conv_update is not None:
            cache_utils.Cache.update_conv_state = original_conv_update
        for hook in hooks:
            hook.remove()
    return InferenceTraceResult(
        phase_terms=tracker.phase_terms(),
        cache_bytes_after_prefill=cache_steps[0] if cache_steps else 0,
        cache_bytes_final=final,
        cache_bytes_by_step=tuple(cache_steps),
        seconds=time.perf_counter() - started,
        peak_records=tracker.phase_records(),
    )
