"""Time auto-gptq's pure-torch 4-bit dequantization on a CUDA GPU: the measurement the Qwen Q-LoRA rows lack.

Run: ``python benchmarks/throughput_gptq_probe.py [--out FILE.csv]`` on any CUDA machine (torch only; about a minute).

Why: ``vramcalc.step_time.DEQUANT_KERNELS["gptq-torch"]`` charges 16.5 HBM bytes per weight and pass at the GPU's
bandwidth for the op chain that auto-gptq 0.4-0.7's ``qlinear_cuda_old.QuantLinear.forward`` runs once its input has
>= 128 rows (every training micro-batch): an int32 right shift of the packed weights broadcast against the 8 nibble
offsets, a cast to int8, a mask with 15, the subtraction of the (shifted, masked, +1) zero points broadcast over each
group of 128 rows, and the multiplication by the fp16 scales broadcast likewise. The published Qwen tables
(benchmarks/throughput.md) imply about 2.5x that time per weight on an A100 (31-46 ps per quantized weight per layer
and micro-batch, against 16 ps at 2.04 TB/s for two passes); this script measures each op at the Qwen layer shapes so
that the rate can enter ``DEQUANT_KERNELS`` from a measurement instead of a fit to those rows.

The op chain below is written from the description above (shapes and dtypes as the layer stores them: qweight int32
[in/8, out], qzeros int32 [in/128, out/8], scales fp16 [in/128, out]); it does not import auto-gptq.
Output: one CSV row per (shape, op): milliseconds, HBM bytes the op must move, GB/s, and ps per weight.
"""

from __future__ import annotations

import argparse
import csv
import sys

GROUP = 128
# (name, in_features, out_features): Qwen-1.8B / 7B / 14B / 72B w1 (hidden -> MLP width), the largest linear per layer
SHAPES = [("qwen-1.8b w1", 2048, 5504), ("qwen-7b w1", 4096, 11008), ("qwen-14b w1", 5120, 13696),
          ("qwen-72b w1", 8192, 24576)]


def ops(torch, qweight, qzeros, scales):
    """The chain as a list of (name, callable, bytes per weight it must move), each op timed on its own."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    k8, n = qweight.shape
    state = {}

    def shift():
        state["w32"] = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, 8, -1), shifts.view(1, 8, 1))

    def cast():
        state["w8"] = state["w32"].to(torch.int8)

    def mask():
        state["w8m"] = torch.bitwise_and(state["w8"], 15)

    def zeros():
        z = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, 8), shifts.view(1, 1, 8)).to(torch.int8)
        state["z"] = (torch.bitwise_and(z, 15) + 1).reshape(-1, 1, n)

    def sub():
        state["d"] = state["w8m"].reshape(-1, GROUP, n) - state["z"]

    def mul():
        state["w16"] = scales.reshape(-1, 1, n) * state["d"]

    # bytes per weight: shift reads 0.5 and writes 4; cast 4 + 1; mask 1 + 1; sub 1 + 1; mul 1 + 2 (zero points and
    # scales are 1/128 of a weight each and left out)
    return [("shift", shift, 4.5), ("cast_int8", cast, 5.0), ("mask", mask, 2.0), ("zeros", zeros, 0.0),
            ("sub_zeros", sub, 2.0), ("mul_scales", mul, 3.0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="CSV file to write (default: print only)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    import torch  # the probe's only dependency, imported here so that the module stays importable without it

    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    rows = []
    for name, k, n in SHAPES:
        qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=dev)
        qzeros = torch.randint(-2**31, 2**31 - 1, (k // GROUP, n // 8), dtype=torch.int32, device=dev)
        scales = torch.rand(k // GROUP, n, dtype=torch.float16, device=dev)
        chain = ops(torch, qweight, qzeros, scales)
        for _ in range(3):  # warm-up: allocator blocks and kernels
            for _, fn, _ in chain:
                fn()
        torch.cuda.synchronize()
        for op, fn, per_weight in chain:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / args.iters
            weights = k * n
            nbytes = per_weight * weights
            rows.append({"shape": name, "op": op, "ms": f"{ms:.4f}", "bytes": int(nbytes),
                         "gb_s": f"{nbytes / (ms * 1e-3) / 1e9:.0f}" if nbytes else "",
                         "ps_per_weight": f"{ms * 1e-3 / weights * 1e12:.2f}"})
        total_ps = sum(float(r["ps_per_weight"]) for r in rows if r["shape"] == name)
        rows.append({"shape": name, "op": "total", "ms": "", "bytes": int(16.5 * k * n), "gb_s": "",
                     "ps_per_weight": f"{total_ps:.2f}"})
    rows.append({"shape": torch.cuda.get_device_name(), "op": f"torch {torch.__version__}", "ms": "", "bytes": "",
                 "gb_s": "", "ps_per_weight": ""})
    fields = ["shape", "op", "ms", "bytes", "gb_s", "ps_per_weight"]
    writer = csv.DictWriter(sys.stdout, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as handle:
            out = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
            out.writeheader()
            out.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
