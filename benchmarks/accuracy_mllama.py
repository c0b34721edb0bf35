"""Llama-3.2-Vision (``mllama``): estimate vs trace of the peak tensor bytes, on the tiny config of
``tests/tiny_mllama.py`` and on the published Llama-3.2-11B-Vision config.json (real size, fake tensors).

    python benchmarks/accuracy_mllama.py [--tiny] [--real]

Prints one markdown row per setup: model, setup, estimate, trace, error = (estimate - trace) / trace."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vramcalc  # noqa: E402
from vramcalc.hf_config import spec_from_config  # noqa: E402
from tests.tiny_mllama import LLAMA_32_11B_VISION, TINY_MLLAMA  # noqa: E402
from tests.test_vision_mllama_trace import SETUPS as TINY_SETUPS  # noqa: E402

REAL_SETUPS = [
    dict(images=1, seq_len=2048, method="lora", grad_ckpt=True),  # tower adapted by q_proj, v_proj
    dict(images=1, seq_len=1024, method="lora", vision="frozen", lora_targets="all-linear"),
    dict(images=2, seq_len=1024, vision="frozen", grad_ckpt=True),  # full language model
]


def rows(name: str, config: dict, setups: list[dict]):
    from vramcalc.tracing.runner import trace

    spec = spec_from_config(config, name=name)
    for options in setups:
        estimated = vramcalc.estimate(spec, **options).peak_tensor_bytes
        traced = trace(spec, progress=False, **options).peak_tensor_bytes
        words = " ".join(f"{key}={value}" for key, value in options.items())
        yield f"| {name} | {words} | {estimated:,} | {traced:,} | {100 * (estimated / traced - 1):+.2f}% |"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--real", action="store_true")
    args = parser.parse_args(argv)
    both = not (args.tiny or args.real)
    print("| model | setup | estimate | trace | error |\n|---|---|---:|---:|---:|")
    if args.tiny or both:
        for row in rows("tiny-mllama", TINY_MLLAMA, TINY_SETUPS):
            print(row, flush=True)
    if args.real or both:
        for row in rows("llama-3.2-11b-vision", LLAMA_32_11B_VISION, REAL_SETUPS):
            print(row, flush=True)


if __name__ == "__main__":
    main()
