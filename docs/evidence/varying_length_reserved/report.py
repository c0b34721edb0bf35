import json, csv, collections, sys
import numpy as np
from _paths import HERE
from analyze import rows, est, rule_realized, setup
from predict import expected_rule
from replay_varlen import GiB, gamma_tokens, lognormal_tokens, uniform, lognormal
from experiments import DISTS

_RG = {}
def R_of(name, L):
    if (name, L) not in _RG:
        grid = sorted(set([16, 32, 64] + [int(L * f) for f in np.linspace(0.05, 1, 20)] + [L]))
        _RG[(name, L)] = (grid, [est(name, t)["reserved_ws"] for t in grid])
    grid, Rg = _RG[(name, L)]
    return lambda T: float(np.interp(T, grid, Rg))

def sampler_for(dist, L):
    if dist in DISTS: return DISTS[dist](L)
    if dist.startswith("swift gamma(3234"): return gamma_tokens(3234.4, 2547.5, lo=91)(L)
    if dist.startswith("swift gamma, over-L deleted"): return swift_deleted(L)
    if dist.startswith("alpaca-like"):
        med = float(dist.split("med ")[1].split(",")[0]); sig = float(dist.split(",s")[1].rstrip(")"))
        return lognormal_tokens(med, sig, lo=30)(L)
    raise KeyError(dist)

def swift_deleted(L):
    g = gamma_tokens(3234.4, 2547.5, lo=91)(0)
    def f(rng, shape):
        out = np.empty(int(np.prod(shape))); i = 0
        while i < out.size:
            x = g(rng, (4 * out.size,)); x = x[x <= L]
            take = min(x.size, out.size - i); out[i:i + take] = x[:take]; i += take
        return out.reshape(shape)
    return f

if __name__ == "__main__":
    rs = [r for r in rows() if not r["setup"].endswith("_nock")]  # the runs without checkpointing: nock_report.py
    groups = collections.defaultdict(list)
    for r in rs:
        groups[(r["setup"], r["L"], r["dist"], r["n"], r["batch"])].append(r)
    lines = ["| setup | L | distribution | steps | seeds | share of steps at L | records after the first (mean) | single-step reserved at L (replay) GiB | replayed max reserved GiB (mean; min-max) | ratio | estimate's reserved at L GiB | realized rule err (mean; max abs) | expected rule GiB | expected rule err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    out_rows = []
    for (name, L, dist, n, b), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
        var = np.array([r["varlen"] for r in g]); fixed = g[0]["fixed_L"]
        errs = np.array([rule_realized(name, r["records"]) / r["varlen"] - 1 for r in g])
        eL = est(name, L)
        K_L = eL["K"]
        exp = expected_rule(R_of(name, L), K_L, L, sampler_for(dist, L), n, batch=b, runs=200)
        nrec = np.mean([len(r["records"]) - 1 for r in g])
        lines.append(f"| {name} | {L} | {dist} | {n} | {len(g)} | {np.mean([r['frac_at_L'] for r in g]):.2f} | {nrec:.1f} | {fixed/GiB:.2f} | "
                     f"{var.mean()/GiB:.2f} ({var.min()/GiB:.2f}-{var.max()/GiB:.2f}) | {var.mean()/fixed:.2f} | {eL['reserved_ws']/GiB:.2f} | "
                     f"{errs.mean():+.3f}; {np.abs(errs).max():.3f} | {exp['mean']/GiB:.2f} (P10-P90 {exp['p10']/GiB:.1f}-{exp['p90']/GiB:.1f}) | {exp['mean']/var.mean()-1:+.3f} |")
        out_rows.append(dict(setup=name, L=L, dist=dist, n=n, seeds=len(g), fixed=fixed, varlen_mean=var.mean(), ratio=var.mean()/fixed,
                             est_L=eL["reserved_ws"], K_L=K_L, realized_err_mean=errs.mean(), realized_err_max=np.abs(errs).max(),
                             expected=exp["mean"], N_eff=exp["N_eff"], later_records=exp["later_records"], p_step=exp["p_step_at_L"]))
    open(HERE / "table_replays.md", "w").write("\n".join(lines) + "\n")
    with open(HERE / "table_replays.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=list(out_rows[0])); w.writeheader(); w.writerows(out_rows)
    print("\n".join(lines))
