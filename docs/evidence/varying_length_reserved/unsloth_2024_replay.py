"""``--loss unsloth-2024``'s K(T) against the caching-allocator replay of a traced run whose steps grow in length.

usage: python unsloth_2024_replay.py MODEL LOSS PRECISION   (e.g. llama-3.2-1b unsloth-2024 fp16)

Traces (``varlen_trace.trace_varlen``, fake tensors) QLoRA with checkpointing at batch 2 through steps of 512 tokens
twice, and through records 512, 1024, 1536, 2048; replays each run's allocation events through
``tracing.caching_allocator.CachingAllocator``; prints the growth the records add over the 512-only run against the
estimate's rule, sum over the later records of ``reserved_growth_per_longer_step_bytes``. Output of session 37 in
``unsloth_2024_replay.jsonl``.
"""

import json
import sys

import _paths  # noqa: F401  (puts the repository root on sys.path)
from varlen_trace import trace_varlen

import vramcalc as vc
from vramcalc.tracing.caching_allocator import replay


model, loss, precision = sys.argv[1], sys.argv[2], sys.argv[3]
opts = dict(method="qlora", precision=precision, grad_ckpt=True, batch_size=2, loss=loss)
if precision == "fp16":
    opts["compute_dtype"] = "fp16"
short, records = [512, 512], [512, 1024, 1536, 2048]
r_short = replay(trace_varlen(model, short, gpu="t4", seq_len=2048, **opts)["events"]).reserved_peak_bytes
r_rec = replay(trace_varlen(model, records, gpu="t4", seq_len=2048, **opts)["events"]).reserved_peak_bytes
K = {T: vc.estimate(model, seq_len=T, **opts).details.get("reserved_growth_per_longer_step_bytes", 0)
     for T in records[1:]}
print(json.dumps(dict(model=model, loss=loss, precision=precision, replay_512=r_short, replay_records=r_rec, K=K,
                      growth_replay=r_rec - r_short, growth_rule=sum(K.values()),
                      rule_error=(sum(K.values()) - (r_rec - r_short)) / (r_rec - r_short))), flush=True)
