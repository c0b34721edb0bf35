"""The trace: the real Hugging Face training step at full size on fake tensors, under an allocation tracker.

``vramcalc.trace()`` (in ``vramcalc/__init__.py``) is the entry point; ``engine.run_trace`` the engine.
"""

import logging

# bitsandbytes' CPU backend logs a warning at import about an optional kernels package it does not need here
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
