"""Qwen2.5-VL: the estimate against the trace of the real ``Qwen2_5_VLForConditionalGeneration`` on fake tensors.

    python benchmarks/accuracy_vision_qwen.py [--tiny-only | --real-only]

Tiny setups: ``tests/tiny_vlms.py`` (``qwen2_5_vl``, ``qwen2_5_vl-flat``). Real-size setups: the published config.json
of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct (``benchmarks/configs/qwen2.5-vl-*-instruct``). Error = (estimate -
trace) / trace of the step's peak tensor bytes. Prints one markdown row per setup (the VLM section of
``benchmarks/accuracy.md``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vramcalc  # noqa: E402
from vramcalc.hf_config import load_config, spec_from_config  # noqa: E402
from tests.tiny_vlms import TINY_VLM  # noqa: E402

TINY = [
    ("qwen2_5_vl", dict(images=2, image_size=168, seq_len=128)),
    ("qwen2_5_vl", dict(images=1, image_size=224, seq_len=128, grad_ckpt=True)),
    ("qwen2_5_vl", dict(images=1, image_size=224, seq_len=128, vision="frozen")),
    ("qwen2_5_vl", dict(images=1, image_size=112, seq_len=128, precision="fp32")),
    ("qwen2_5_vl", dict(images=1, image_size=224, seq_len=128, method="lora", lora_targets="all-linear")),
    ("qwen2_5_vl", dict(images=2, image_size=112, seq_len=128, method="lora", lora_targets="all-linear",
                        lora_dropout=0.1)),
    ("qwen2_5_vl", dict(images=1, image_size=224, seq_len=128, method="lora", lora_targets="all-linear",
                        grad_ckpt=True)),
    ("qwen2_5_vl", dict(images=2, image_size=224, seq_len=160, method="lora", vision="frozen")),
    ("qwen2_5_vl", dict(images=1, image_tokens=48, seq_len=128, method="lora")),
    ("qwen2_5_vl-flat", dict(images=1, image_size=224, seq_len=96)),
]
REAL = [
    ("qwen2.5-vl-3b-instruct", dict(images=1, image_size=448, seq_len=1024, method="lora",
                                    lora_targets="all-linear")),
    ("qwen2.5-vl-3b-instruct", dict(images=1, image_size=448, seq_len=1024, grad_ckpt=True)),
    ("qwen2.5-vl-7b-instruct", dict(images=2, image_size=448, seq_len=1024, method="lora", vision="frozen")),
    ("qwen2.5-vl-7b-instruct", dict(images=1, image_size=896, seq_len=2048, method="lora",
                                    lora_targets="all-linear", grad_ckpt=True)),
]


def spec_of(name: str):
    if name in TINY_VLM:
        return spec_from_config(TINY_VLM[name], name=f"tiny-{name}")
    return load_config(ROOT / "benchmarks" / "configs" / name / "config.json", name=name)


def describe(options: dict) -> str:
    words = [options.get("method", "full")]
    if options.get("lora_targets"):
        words.append(options["lora_targets"])
    if options.get("vision"):
        words.append(f"vision {options['vision']}")
    if options.get("lora_dropout"):
        words.append(f"dropout {options['lora_dropout']}")
    if options.get("grad_ckpt"):
        words.append("grad-ckpt")
    if options.get("precision"):
        words.append(options["precision"])
    image = f"{options['image_size']} px" if "image_size" in options else f"{options['image_tokens']} tokens"
    words.append(f"{options['images']} x {image}, seq {options['seq_len']}")
    return ", ".join(words)


def main(argv: list[str]) -> None:
    from vramcalc.tracing.runner import trace

    setups = (TINY if "--real-only" not in argv else []) + (REAL if "--tiny-only" not in argv else [])
    print("| model | setup | estimate | trace | error |\n|---|---|---:|---:|---:|")
    for name, options in setups:
        spec = spec_of(name)
        started = time.perf_counter()
        estimated = vramcalc.estimate(spec, **options).peak_tensor_bytes
        traced = trace(spec, progress=False, **options).peak_tensor_bytes
        print(f"| {name} | {describe(options)} | {estimated:,} | {traced:,} | {estimated / traced - 1:+.2%} |"
              f" <!-- {time.perf_counter() - started:.0f} s -->", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
