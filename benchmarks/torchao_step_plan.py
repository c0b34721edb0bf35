"""The scratch memory of torchao's compiled low-bit AdamW step, read from inductor's own buffer plan.

torchao's ``_AdamBase.step`` (``torchao/optim/adam.py``, torchao 0.18) runs
``torch.compile(single_param_adam, fullgraph=True, dynamic=False)`` once per parameter: the quantized states are
dequantized to fp32, updated, and requantized block by block (``quant_utils.scale_tensor``, ``quantize_8bit_with_qmap``,
``quantize_4bit_with_qmap``, ``subclass_fp8.quantize_fp8``) inside one inductor graph. What that step allocates
beyond the parameter, its gradient and its states is the graph's intermediate buffers, which inductor's scheduler
decides (fusion, realized reductions, mutation copies) and its generated wrapper ``call()`` allocates
(``empty_strided_*``, an extern ``aten.cat``) and frees (``del bufN``) in order.

This script compiles the real step on CPU tensors with inductor's Triton scheduler (``cpu_backend="triton"``: the
scheduler and wrapper code generation CUDA uses; kernels are generated, not run), parses the wrapper's ``call()``
and writes each plan's buffers and its peak of live intermediate bytes to ``torchao_step_plan.csv``.
``vramcalc/facts.py::torchao_step_buffers`` states the rule the estimate and the trace charge;
``tests/test_torchao_optim.py`` checks it against every row here.

Needs triton importable (``pip install --target DIR triton`` and ``PYTHONPATH=DIR``); no GPU.

    PYTHONPATH=/tmp/tri python benchmarks/torchao_step_plan.py        # every case: torchao_step_plan.csv
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "torchao_step_plan.csv"

# shapes by class: 1-D, 2-D with the last dim equal to / below / above the block, non-power-of-two rows, 3-D;
# Llama-2-7B's own (embedding and lm_head [32000, 4096], MLP [11008, 4096] and [4096, 11008], q/k/v/o, norms)
SHAPES = [(4096,), (131072,), (512, 128), (512, 256), (48, 4096), (1024, 1024), (4096, 4096), (11008, 4096),
          (4096, 11008), (32000, 4096), (96, 384), (64, 64, 64), (8, 64, 256), (4, 1024, 512), (8, 16, 2048)]
KINDS = ("adamw-8bit-torchao", "adamw-4bit-torchao", "adamw-fp8-torchao")
DTYPES = ("bfloat16", "float32")

_ALLOC = re.compile(r"^\s*(buf\d+) = empty_strided_\w+\((\([^)]*\)), \([^)]*\), torch\.(\w+)\)")
_EXTERN = re.compile(r"^\s*(buf\d+) = torch\.ops\.aten\.(\w+)\.default\(")
_ALIAS = re.compile(r"^\s*(buf\d+) = (buf\d+)(?:; del (buf\d+))?(?:\s*#.*)?$")
_ASSERT = re.compile(r"^\s*assert_size_stride\((buf\d+), (\([^)]*\)), ")
_DEL = re.compile(r"^\s*del (buf\d+)\s*$")
_ITEMSIZE = {"uint8": 1, "int8": 1, "float8_e4m3fn": 1, "bfloat16": 2, "float16": 2, "float32": 4, "int32": 4,
             "int64": 8, "bool": 1}


def _numel(shape_text: str) -> int:
    return math.prod(int(x) for x in re.findall(r"\d+", shape_text))


def plan_of(code: str) -> tuple[list[tuple[str, int]], int]:
    """The intermediate buffers of a wrapper's ``call()`` (name, bytes) and the peak of their live bytes.

    Each allocation is a storage; ``bufA = bufB`` names the same storage again (inductor's ``# reuse``, an extern
    kernel's output bound to a second name); a storage dies when its last name is deleted. An extern ``aten.cat``'s
    size comes from its ``assert_size_stride`` and its inputs' dtype (the same as its output's)."""
    body = code[code.index("def call(self, args)"):]
    body = body[:body.index("return ")]
    lines = body.splitlines()
    names: dict[str, int] = {}  # name -> storage id
    sizes: dict[int, int] = {}
    dtypes: dict[int, str] = {}
    pending_extern: dict[int, str] = {}  # storage -> the dtype it inherits from its first input
    buffers: list[tuple[str, int]] = []
    events: list[tuple[str, int]] = []  # ("alloc"|"free", storage)
    next_id = 0
    for line in lines:
        if m := _ALLOC.match(line):
            name, shape, dtype = m.groups()
            sizes[next_id] = _numel(shape) * _ITEMSIZE[dtype]
            dtypes[next_id] = dtype
            names[name] = next_id
            events.append(("alloc", next_id))
            buffers.append((name, sizes[next_id]))
            next_id += 1
        elif m := _EXTERN.match(line):
            name, op = m.groups()
            inputs = re.findall(r"reinterpret_tensor\((buf\d+)", line) or re.findall(r"\b(buf\d+)\b", line[m.end():])
            sizes[next_id] = 0
            pending_extern[next_id] = dtypes[names[inputs[0]]]
            names[name] = next_id
            events.append(("alloc", next_id))
            buffers.append((name, -1))
            next_id += 1
        elif m := _ASSERT.match(line):
            name, shape = m.groups()
            storage = names.get(name)
            if storage in pending_extern:
                dtype = pending_extern.pop(storage)
                dtypes[storage] = dtype
                sizes[storage] = _numel(shape) * _ITEMSIZE[dtype]
                buffers = [(b, sizes[storage] if s == -1 and names.get(b) == storage else s) for b, s in buffers]
        elif m := _ALIAS.match(line):
            new, old, deleted = m.groups()
            if old in names:
                names[new] = names[old]
            if deleted:
                storage = names.pop(deleted, None)
                if storage is not None and storage not in names.values():
                    events.append(("free", storage))
        elif m := _DEL.match(line):
            storage = names.pop(m.group(1), None)
            if storage is not None and storage not in names.values():
                events.append(("free", storage))
    live = peak = 0
    for kind, storage in events:
        live += sizes[storage] if kind == "alloc" else -sizes[storage]
        peak = max(peak, live)
    return buffers, peak


def _fake_triton_toolchain() -> None:
    """Inductor's Triton codegen on a machine without a GPU driver: a fixed backend hash, kernels never launched."""
    import torch._inductor.async_compile as async_compile
    import torch._inductor.config as inductor_config
    import torch.utils._triton as torch_triton

    inductor_config.cpu_backend = "triton"
    inductor_config.compile_threads = 1
    torch_triton.triton_hash_with_backend = lambda: "no-driver"
    torch_triton.triton_backend = lambda: None

    class _NotLaunched:
        def run(self, *args, **kwargs):
            return None

    async_compile.AsyncCompile.triton = lambda self, *args, **kwargs: _NotLaunched()


def main() -> None:
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    import torch
    import triton
    from torch._inductor.utils import run_and_get_code
    from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8
    import torchao

    _fake_triton_toolchain()
    classes = {"adamw-8bit-torchao": AdamW8bit, "adamw-4bit-torchao": AdamW4bit, "adamw-fp8-torchao": AdamWFp8}
    rows = []
    for kind in KINDS:
        for dtype_name in DTYPES:
            for shape in SHAPES:
                torch._dynamo.reset()
                dtype = getattr(torch, dtype_name)
                p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
                p.grad = torch.zeros_like(p)
                optimizer = classes[kind]([p], lr=1e-3)
                _, codes = run_and_get_code(optimizer.step)
                state = optimizer.state[p]
                quantized = type(state["exp_avg"]).__name__ != "Tensor"
                buffers, peak = plan_of(codes[-1])
                rows.append({"optimizer": kind, "shape": "x".join(map(str, shape)), "param_dtype": dtype_name,
                             "block_size": optimizer.block_size, "quantized_states": quantized,
                             "buffers_bytes": json.dumps([b for _, b in buffers]), "peak_scratch_bytes": peak,
                             "torch": torch.__version__, "triton": triton.__version__,
                             "torchao": torchao.__version__})
                print(kind, dtype_name, shape, peak, [b for _, b in buffers], flush=True)
    with OUT.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {OUT.relative_to(HERE.parent)} ({len(rows)} rows)", file=sys.stderr)


if __name__ == "__main__":
    main()
