"""The estimate and the trace of one setup side by side: the pair every estimate-vs-trace test compares."""

from vramcalc.estimator import step_moments
from vramcalc.training_setup import resolve_setup


def estimated_and_traced(spec, **options):
    """(the estimate's peak moment, the trace's result) of ``spec`` under ``options``, resolved once."""
    from vramcalc.tracing.runner import run_trace

    resolved = resolve_setup(spec, **options)
    peak = max(step_moments(spec, resolved), key=lambda moment: moment.tensor_bytes)
    return peak, run_trace(spec, resolved, progress=False)


def peak_error(spec, **options) -> float:
    """(estimated - traced) / traced of the step's peak tensor bytes."""
    peak, traced = estimated_and_traced(spec, **options)
    total = sum(traced.terms.values())
    return (peak.tensor_bytes - total) / total


def setup_id(value) -> str:
    """A pytest id for a (family, options) parameter: the family as it is, the options as ``key=value`` joined."""
    return value if isinstance(value, str) else "-".join(f"{k}={w}" for k, w in value.items())
