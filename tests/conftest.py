import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def has_torch() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


needs_torch = pytest.mark.skipif(not has_torch(), reason="needs the trace extra: pip install 'vramcalc[trace]'")


try:
    from hypothesis import settings

    # the same examples on every run: CI never flips on a newly drawn case (run with HYPOTHESIS_PROFILE=explore
    # to draw new ones)
    settings.register_profile("ci", derandomize=True, deadline=None)
    settings.register_profile("explore", deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is in the test extra
    pass
