"""Evaluate the candidate rule against the replays (results_*.jsonl) and write tables."""
import json, glob, functools, sys
import numpy as np
from _paths import HERE
from estq import est_quantities
from replay_varlen import load_setup, batch_lengths, GiB

SETUPS = {}
def setup(name):
    if name not in SETUPS:
        S = load_setup(name)
        SETUPS[name] = (S["model"], {k: v for k, v in S["options"].items() if k != "seq_len"}, S["meta"]["workspace_bytes"])
    return SETUPS[name]

@functools.lru_cache(maxsize=None)
def est(name, T):
    model, opts, ws = setup(name)
    q = est_quantities(model, int(T), **opts)
    q["reserved_ws"] = q["reserved"] + ws
    return q

def rule_realized(name, records, first_step_kept=True):
    """R_est(T_1) + sum over later records of K(T_r): each new record length adds the loss's [T,V] blocks live at
    its backward (K), because every cached [T,V] block is too small for the new fp32 requests."""
    Ts = [T for _, T, _ in records]
    R = est(name, Ts[0])["reserved_ws"]
    return R + sum(est(name, T)["K"] for T in Ts[1:])

def rows(pattern="results_*.jsonl"):
    out = []
    for f in sorted(HERE.glob(pattern)):
        for line in open(f):
            out.append(json.loads(line))
    return out

if __name__ == "__main__":
    rs = rows()
    for r in rs:
        pred = rule_realized(r["setup"], r["records"])
        eL = est(r["setup"], r["L"])
        print(f"{r['setup']:12s} L={r['L']:5d} {r['dist'][:28]:28s} n={r['n']:4d} s={r['seed']} fixed {r['fixed_L']/GiB:6.2f} var {r['varlen']/GiB:6.2f} "
              f"ratio {r['ratio']:.3f} rec {len(r['records']):2d} atL {r['frac_at_L']:.2f} estL {eL['reserved_ws']/GiB:6.2f} "
              f"rule {pred/GiB:6.2f} err {pred/r['varlen']-1:+.3f}")
