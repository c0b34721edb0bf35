"""Replay varying-length runs for each setup and distribution; one JSON line per run, appended to
results_PLAN.jsonl in this folder.

usage: python experiments.py PLAN [MAX_RUNS]
    PLAN: generic2 | swift | swiftdel | torchtune | nock (see the README for what each replays and how long it takes;
    nock: the no-checkpointing setups of its section "Without checkpointing").
    MAX_RUNS: stop after that many runs. The committed results_torchtune.jsonl is the plan's first run only
    (MAX_RUNS=1); the study stopped the plan there for CPU time.
Lines are appended: move the committed results_PLAN.jsonl away first, or report.py counts each run twice.
"""
import json, sys, time
import numpy as np
from _paths import HERE
from replay_varlen import *
from vramcalc.tracing.caching_allocator import round_size, segment_bytes

DISTS = {
    "uniform[L/16,L]": uniform(1 / 16),
    "logn(med .3L,s.6)": lognormal(0.3, 0.6),
    "logn(med .5L,s.5)": lognormal(0.5, 0.5),
    "logn(med .8L,s.5)": lognormal(0.8, 0.5),
}

RUNS_DONE = []
LADDER_OPS = ("_to_copy.default", "_log_softmax.default", "_log_softmax_backward_data.default")  # the loss's [T, V]
plan_name = sys.argv[1] if __name__ == "__main__" and len(sys.argv) > 1 else None
MAX_RUNS = int(sys.argv[2]) if __name__ == "__main__" and len(sys.argv) > 2 else None


def one(S, name, L, dist_name, sample_fn, n, seed, batch, fixed_cache, out, multiple=1):
    if MAX_RUNS is not None and len(RUNS_DONE) >= MAX_RUNS:
        return
    rng = np.random.default_rng(seed)
    Ts = batch_lengths(sample_fn, L, n, batch, rng, multiple)
    t = time.time()
    r = replay_lengths(S, Ts)
    recs, m = [], 0
    for i, T in enumerate(Ts):
        if T > m:
            recs.append((i, int(T), r.per_step[i][1]))
            m = T
    if L not in fixed_cache:
        fixed_cache[L] = replay_lengths(S, [L] * 4).reserved_peak
    row = dict(setup=name, L=L, dist=dist_name, n=n, seed=seed, batch=batch, fixed_L=fixed_cache[L],
               varlen=r.reserved_peak, ratio=r.reserved_peak / fixed_cache[L], records=recs,
               T1=int(Ts[0]), Tmax=int(Ts.max()), frac_at_L=float((Ts == L).mean()), mean_T=float(Ts.mean()),
               big_segments=[(s, T, op, q) for s, T, op, q, _ in r.new_segments if q > 64 << 20],
               seconds=time.time() - t)
    if plan_name == "nock":  # per step with new segments: (step, T, the loss's [T, V] requests, others >= 10 MiB, rest)
        from vramcalc.catalogue import get_model
        V, by_step = get_model(S["model"]).vocab_size, {}
        for s, T, op, q, _ in r.new_segments:
            row_ = by_step.setdefault(s, [s, int(T), 0, 0, 0])
            ladder = op in LADDER_OPS and q == 4 * batch * T * V  # an fp32 [b, T, V] block of the loss
            row_[2 if ladder else 3 if q >= 10 << 20 else 4] += segment_bytes(round_size(q))
        row["new_segment_bytes"] = sorted(by_step.values())
        row["per_step_reserved"] = [int(x[1]) for x in r.per_step]
    out.write(json.dumps(row) + "\n"); out.flush()
    RUNS_DONE.append(1)
    print(name, L, dist_name, n, seed, f"ratio {row['ratio']:.3f} records {len(recs)}", file=sys.stderr, flush=True)

def swift_deleted_sampler(L):
    """swift 1.x truncation_strategy 'delete': samples longer than max_length are dropped, so no step reaches L."""
    g = gamma_tokens(3234.4, 2547.5, lo=91)(0)

    def f(rng, shape):
        out = np.empty(int(np.prod(shape)))
        i = 0
        while i < out.size:
            x = g(rng, (4 * out.size,))
            x = x[x <= L]
            take = min(x.size, out.size - i)
            out[i:i + take] = x[:take]; i += take
        return out.reshape(shape)
    return f


if __name__ == "__main__":
    plan = sys.argv[1]
    if plan not in ("generic2", "swift", "swiftdel", "torchtune", "nock"):
        raise SystemExit(f"unknown plan {plan!r}: use generic2, swift, swiftdel, torchtune or nock")
    out = open(HERE / f"results_{plan}.jsonl", "a")
    if plan == "generic2":
        for name, L, batch in [("q15_lora", 2048, 1), ("l1_full", 2048, 1), ("l1_lora", 2048, 1), ("l27_lora_b2", 512, 2)]:
            S = load_setup(name); fixed = {}
            for dname in ("uniform[L/16,L]", "logn(med .3L,s.6)", "logn(med .8L,s.5)"):
                plan_n = [(200, (0,))] if name == "l27_lora_b2" else [(200, (0,)), (100, (1,))]
                for n, seeds in plan_n:
                    for seed in seeds:
                        one(S, name, L, dname, DISTS[dname](L), n, seed, batch, fixed, out)
    elif plan == "swift":
        S = load_setup("q15_lora"); fixed = {}
        f = gamma_tokens(3234.4, 2547.5, lo=91)
        for L in (512, 1024, 2048, 4096, 8192):
            for seed in (0, 1):
                one(S, "q15_lora", L, "swift gamma(3234,2548)", f(L), 500, seed, 1, fixed, out)
    elif plan == "swiftdel":
        S = load_setup("q15_lora"); fixed = {}
        for L in (512, 1024, 2048, 4096, 8192):
            for seed in (0, 1):
                one(S, "q15_lora", L, "swift gamma, over-L deleted", swift_deleted_sampler(L), 500, seed, 1, fixed, out)
    elif plan == "torchtune":
        S = load_setup("l27_lora_b2"); fixed = {}
        for med, sig in [(170, 0.6), (140, 0.5), (200, 0.7)]:
            f = lognormal_tokens(med, sig, lo=30)
            for seed in (0, 1):
                one(S, "l27_lora_b2", 512, f"alpaca-like logn(med {med},s{sig})", f(512), 1000, seed, 2, fixed, out)
    elif plan == "nock":  # no activation checkpointing, batch 2 (README section "Without checkpointing")
        alpaca = [(170, 0.6), (140, 0.5), (200, 0.7)]
        for name, L, dnames, alp, n_alp, seeds in [
                ("l1_lora_b2_nock", 2048, ("uniform[L/16,L]", "logn(med .3L,s.6)", "logn(med .8L,s.5)"), [], 0, (0, 1)),
                ("l1_lora_b2_nock", 512, ("uniform[L/16,L]",), alpaca, 300, (0,)),
                ("l1_full_b2_nock", 2048, ("uniform[L/16,L]", "logn(med .3L,s.6)", "logn(med .8L,s.5)"), [], 0, (0, 1)),
                ("l1_full_b2_nock", 512, ("uniform[L/16,L]",), alpaca[:1], 300, (0,)),
                ("l27_lora_b2_nock", 512, ("uniform[L/16,L]", "logn(med .3L,s.6)", "logn(med .8L,s.5)"), alpaca, 300,
                 (0, 1))]:
            S = load_setup(name); fixed = {}
            for dname in dnames:
                for seed in seeds:
                    one(S, name, L, dname, DISTS[dname](L), 200 if seed == 0 else 100, seed, 2, fixed, out)
            for med, sig in alp:
                for seed in seeds:
                    one(S, name, L, f"alpaca-like logn(med {med},s{sig})", lognormal_tokens(med, sig, lo=30)(L), n_alp,
                        seed, 2, fixed, out)
