"""Serving the model you trained: inference memory (KV cache per family, engine rules), throughput and cost.

    import vramcalc as vc
    b = vc.infer("llama-3.1-8b", context=8192, concurrency=32, gpu="l40s")   # vLLM rules by default
    b.terms()["kv_cache"], b.fits(), b.details["max_concurrency"], b.details["decode_tokens_per_s"]
    vc.infer("llama-3.1-8b", context=4096, concurrency=4, trace=True)          # transformers generate, traced

Standard library only, except ``trace=True`` (torch, transformers: ``serving/trace.py``).
"""

from .estimate import infer
from .search import max_concurrency, max_context, serve_plan
from .terms import Engine, HfCache, InferencePhase, InferenceTerm, KvDtype, Weights

__all__ = ["infer", "max_concurrency", "max_context", "serve_plan", "Engine", "HfCache", "InferencePhase",
           "InferenceTerm", "KvDtype", "Weights"]
