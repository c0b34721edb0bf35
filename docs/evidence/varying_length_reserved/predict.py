"""The candidate rule in expectation over a length distribution (no replay): Monte Carlo over length sequences.

   R_var = E[ R(T_1) + sum_{records r >= 2} K(T_r) ]
   R(T): the estimator's reserved at T (linear in T between T_lo and L here); K(T): the [T,V] bytes live at the
   loss's backward-start moment (the estimator's logits term there), linear in T: K(T) = K(L)·T/L.
"""
import numpy as np

def record_stats(lengths):
    """lengths: (runs, n) step lengths -> per run (T_1, sum of later record values, number of later records)."""
    runs, n = lengths.shape
    T1 = lengths[:, 0].astype(float)
    prev = np.maximum.accumulate(lengths, axis=1)
    is_rec = np.zeros_like(lengths, dtype=bool)
    is_rec[:, 1:] = lengths[:, 1:] > prev[:, :-1]
    later_sum = (lengths * is_rec).sum(axis=1).astype(float)
    return T1, later_sum, is_rec.sum(axis=1)

def expected_rule(R_of_T, K_L, L, sampler, n, batch=1, runs=400, seed=123):
    from replay_varlen import batch_lengths
    rng = np.random.default_rng(seed)
    Ls = np.stack([batch_lengths(sampler, L, n, batch, rng) for _ in range(runs)])
    T1, later, nrec = record_stats(Ls)
    R1 = np.array([R_of_T(t) for t in T1])
    pred = R1 + K_L * later / L
    p_step = float((Ls == L).mean())
    return dict(mean=float(pred.mean()), p10=float(np.percentile(pred, 10)), p90=float(np.percentile(pred, 90)),
                N_eff=float((later / L).mean()), later_records=float(nrec.mean()), p_step_at_L=p_step,
                mean_T1=float(T1.mean()))
