"""import vramcalc stays light: the analytic core needs the standard library only."""

import subprocess
import sys


def test_import_vramcalc_loads_no_torch_transformers_or_pandas():
    code = "import sys, vramcalc; vramcalc.estimate('llama-3.1-8b'); print(sorted(m for m in ('torch', 'transformers', 'pandas', 'numpy', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
