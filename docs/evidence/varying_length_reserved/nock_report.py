"""The no-checkpointing replays (results_nock.jsonl, ``experiments.py nock``) against the fixed-length replay, the
realized rules and the estimate's expected-value mode (``vramcalc.estimate(..., sample_lengths=...)``); writes
table_nock.md. README section "Without checkpointing".

- realized rule (ladders): R(T_1) + sum over later records of K(T_r), the estimator's R and K (``analyze.rule_realized``).
- realized rule (max form): R_r = max(R_{r-1} + K(T_r), R(T_r)), R_1 = R(T_1): a record needs at least its own
  fixed-length reserve (``vramcalc.sample_lengths.realized_reserved_bytes`` with ``reserved_at``).
- the estimate's expected value: ``vramcalc.estimate`` with ``sample_lengths`` = n·b sample lengths drawn from the
  run's distribution (seed 1000 + the run's seed; untruncated, the estimate truncates at seq_len), reserved_bytes
  plus the cuBLAS workspace the replay holds (as ``analyze.est``'s reserved_ws).
"""

import numpy as np

from _paths import HERE
from analyze import est, rows, rule_realized, setup
from replay_varlen import GiB
from report import sampler_for
import vramcalc
from vramcalc.sample_lengths import realized_reserved_bytes


def max_rule(name, records, L):
    """``realized_reserved_bytes`` with ``reserved_at``: R_r = max(R_{r-1} + K(T_r), R(T_r)), the estimator's R, K."""
    lengths = [T for _, T, _ in records]
    R = lambda T: est(name, T)["reserved_ws"]
    return realized_reserved_bytes(R(lengths[0]), est(name, L)["K"] / L, lengths, R)


def estimate_expected(name, L, dist, n, batch, seed):
    model, opts, ws = setup(name)
    rng = np.random.default_rng(1000 + seed)
    lengths = [int(x) for x in sampler_for(dist, L)(rng, (n * batch,))]
    b = vramcalc.estimate(model, gpu="a100-80gb", sample_lengths=lengths, seq_len=L, **opts)
    return b.reserved_bytes + ws, b.details.get("length_ladders_bytes", 0)


if __name__ == "__main__":
    lines = ["| setup | L | distribution | steps | seed | share of steps at L | later records | fixed-length reserved at L (replay) | "
             "varying-length max reserved (replay) | ratio | record steps' new segments: loss [T, V] / other >= 10 MiB | "
             "ladder form (err) | max form (err) | estimate at L (err) | estimate, sample_lengths (err) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows("results_nock.jsonl"):
        name, L = r["setup"], r["L"]
        var = r["varlen"]
        rec_steps = {s for s, _, _ in r["records"][1:]}
        ladder = sum(x[2] for x in r["new_segment_bytes"] if x[0] in rec_steps)
        other = sum(x[3] for x in r["new_segment_bytes"] if x[0] in rec_steps)
        old = rule_realized(name, r["records"])
        new = max_rule(name, r["records"], L)
        at_L = est(name, L)["reserved_ws"]
        expected, ladders = estimate_expected(name, L, r["dist"], r["n"], r["batch"], r["seed"])
        lines.append(f"| {name} | {L} | {r['dist']} | {r['n']} | {r['seed']} | {r['frac_at_L']:.2f} | {len(r['records']) - 1} | "
                     f"{r['fixed_L']/GiB:.2f} | {var/GiB:.2f} | {var/r['fixed_L']:.2f} | {ladder/GiB:.2f} / {other/GiB:.2f} | "
                     f"{old/GiB:.2f} ({old/var-1:+.3f}) | {new/GiB:.2f} ({new/var-1:+.3f}) | {at_L/GiB:.2f} ({at_L/var-1:+.3f}) | "
                     f"{expected/GiB:.2f} ({expected/var-1:+.3f}) |")
        print(lines[-1], flush=True)
    open(HERE / "table_nock.md", "w").write("\n".join(lines) + "\n")
