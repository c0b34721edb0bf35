"""Paths for the scripts of this folder: HERE (this folder, where templates, results and tables live) and REPO (the
repository root, put on sys.path so that ``vramcalc`` is this checkout's, not another installed copy)."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))
