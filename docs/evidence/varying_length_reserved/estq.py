"""Estimator quantities at a given T: reserved, tensor peak, and the [T,V] bytes live at the loss's backward."""
import _paths  # noqa: F401  (puts the repository root on sys.path)
from vramcalc.catalogue import get_model, get_gpu
from vramcalc.training_setup import resolve_setup
from vramcalc.estimator import step_moments
from vramcalc.options import Phase
import vramcalc

def est_quantities(model, T, gpu="a100-80gb", **opts):
    opts = dict(opts); opts["seq_len"] = T
    spec = get_model(model)
    resolved = resolve_setup(spec, **opts)
    ms = step_moments(spec, resolved)
    steps = [m for m in ms if m.phase is not Phase.LOAD]
    bs = [m for m in ms if m.phase is Phase.BACKWARD_START]
    reserved_step = max(m.tensor_bytes + m.stranded for m in ms)
    b = vramcalc.estimate(model, gpu=gpu, **opts)
    return dict(T=T, reserved=b.reserved_bytes, peak_tensor=b.peak_tensor_bytes,
                reserved_moments=reserved_step,
                K=max((m.logits for m in bs), default=0),  # [T,V] bytes live at backward-start
                bs_tensor=bs[0].tensor_bytes if bs else 0,
                V=spec.vocab_size, slack=b.terms_bytes[vramcalc.Term.ALLOCATOR_SLACK])
