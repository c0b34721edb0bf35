"""--device-map auto (issue 14 item 2): the placement against transformers' own ``_get_device_map`` and every GPU's
estimated peak against the per-GPU trace (``vramcalc/tracing/device_map.py``), printed as two Markdown tables.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_device_map.py [--full]

``--full`` adds six full-size traces on fake tensors (0.5B to 70B, 2 to 8 GPUs; about four minutes on one core).
"""

import dataclasses
import logging
import sys
import warnings

sys.path.insert(0, ".")

from tests.test_device_map import PLACEMENT_MODELS, TRACED, _real_device_map  # noqa: E402
from tests.tiny_models import TINY  # noqa: E402
from vramcalc.catalogue import get_model  # noqa: E402
from vramcalc.device_map_step import gpu_peaks  # noqa: E402
from vramcalc.options import Precision, Quant  # noqa: E402
from vramcalc.terms.device_map import placement  # noqa: E402
from vramcalc.tracing.device_map import trace_device_map  # noqa: E402
from vramcalc.training_setup import resolve_setup  # noqa: E402

FULL = [("llama-3.1-8b", dict(method="lora", num_gpus=4, seq_len=512)),
        ("qwen2.5-0.5b", dict(method="full", num_gpus=2, seq_len=1024, grad_ckpt=True)),
        ("llama-3.2-1b", dict(method="qlora", num_gpus=4, seq_len=1024)),
        ("qwen3-30b-a3b", dict(method="lora", num_gpus=4, seq_len=256)),
        ("mistral-7b", dict(method="full", num_gpus=2, seq_len=512)),
        ("llama-3.1-70b", dict(method="lora", num_gpus=8, seq_len=256, grad_ckpt=True))]


def main() -> None:
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    print("| model | method | GPUs | layers per GPU (vramcalc) | same as transformers |\n|---|---|---|---|---|")
    for name in PLACEMENT_MODELS:
        spec = get_model(name)
        for quant in (None, Quant.NF4) if name in ("llama-3.1-8b", "llama-3.2-1b") else (None,):
            for n in (2, 4, 8):
                where = placement(spec, Precision.BF16, quant, n)
                mine = (where.embed, where.layers, where.norm, where.rotary, where.head)
                same = mine == _real_device_map(spec, n, quant is not None)
                counts = [len(where.layers_on(g)) for g in range(n)]
                print(f"| {name} | {'qlora' if quant else 'bf16'} | {n} | {counts} | {'yes' if same else 'NO'} |")
    setups = [(dataclasses.replace(TINY[f], num_layers=L), o) for f, L, o in TRACED]
    if "--full" in sys.argv:
        setups += [(get_model(name), o) for name, o in FULL]
    print("\n| model | options | GPU | estimate MiB | trace MiB | error |\n|---|---|---|---|---|---|")
    for spec, options in setups:
        options = dict(dict(seq_len=256), **options)
        resolved = resolve_setup(spec, device_map="auto", **options)
        traced = trace_device_map(spec, resolved)
        for peak in gpu_peaks(spec, resolved):
            t = traced[peak.gpu]
            error = f"{100 * (peak.tensor_bytes - t) / t:+.1f}%" if t else "(empty)"
            print(f"| {spec.name} L={spec.num_layers} | {options} | {peak.gpu} | {peak.tensor_bytes / 2**20:.2f} | "
                  f"{t / 2**20:.2f} | {error} |", flush=True)


if __name__ == "__main__":
    main()
