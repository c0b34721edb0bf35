#!/usr/bin/env python3
"""Per-sample token lengths of an Alpaca-format dataset, tokenized as torchtune 0.1 did.

Reproduces, for every row, the length of ``input_ids`` that torchtune's
``alpaca_cleaned_dataset`` / ``alpaca_dataset`` (``InstructDataset`` with
``AlpacaInstructTemplate``, ``train_on_input=True``) built with the Llama-2
SentencePiece tokenizer at torchtune commit ff594c231 (2024-04-15; identical
logic in the torchtune 0.1.0 wheel and at 20747cd87), *before* the
``max_seq_len`` truncation, so a caller can apply any cap itself
(torchtune truncates to ``tokens[:max_seq_len]``, so a capped length is
``min(n, max_seq_len)``).

torchtune's tokenize_messages for [user(prompt), assistant(output)] gives::

    [BOS] + encode(prompt.rstrip(" "))
          + encode("\\n" + output.rstrip(" "))[len(encode("\\n")):]   # trim_leading_whitespace
          + [EOS]

The second message is encoded with the "\\n" prefix trick because the Llama-2
vocabulary encodes whitespace and the prompt does not end with a space.

Inputs by path only (no network). Standard library + sentencepiece.

Usage:
    python benchmarks/datasets/alpaca_lengths.py --tokenizer tokenizer.model \\
        --data alpaca_data_cleaned.json --out benchmarks/datasets/alpaca_cleaned_llama2_lengths.csv

Several --data files (JSON arrays or JSONL) are concatenated in the order given.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import csv
import hashlib
import json
import sys

# torchtune/data/_instruct_templates.py @ ff594c231, AlpacaInstructTemplate.template (lines 46-57)
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
WHITESPACE_CHARS = [" ", "\n", "\t", "\r", "\v"]


def format_prompt(sample: dict) -> str:
    """AlpacaInstructTemplate.format (lines 59-87): the input variant only when input is non-empty."""
    if "input" in sample and sample["input"]:
        return PROMPT_INPUT.format(instruction=sample["instruction"], input=sample["input"])
    return PROMPT_NO_INPUT.format(instruction=sample["instruction"])


class TorchtuneLlama2Tokenizer:
    """torchtune/modules/tokenizer.py @ ff594c231 (Tokenizer.encode, tokenize_messages), length only."""

    def __init__(self, path: str):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        self.sp.load(path)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # line 51: encodes_whitespace = any(encode(c) for c in WHITESPACE_CHARS)
        self.encodes_whitespace = any(self.sp.encode(c) for c in WHITESPACE_CHARS)
        # lines 95-100: prefix "\n", start_idx = len(encoded_prefix) + int(add_bos=False)
        self.prefix = "\n"
        self.start_idx = len(self.sp.encode(self.prefix, add_bos=False, add_eos=False))

    def encode(self, text: str, trim_leading_whitespace: bool) -> list[int]:
        if trim_leading_whitespace:
            return self.sp.encode(self.prefix + text, add_bos=False, add_eos=False, out_type=int)[self.start_idx:]
        return self.sp.encode(text, add_bos=False, add_eos=False, out_type=int)

    def input_ids(self, sample: dict) -> list[int]:
        """InstructDataset._prepare_sample + tokenize_messages (lines 163-209) without truncation."""
        prompt = format_prompt(sample)
        output = sample["output"]
        ids = [self.bos_id]  # start of turn: BOS
        ids += self.encode(prompt.rstrip(" "), trim_leading_whitespace=False)
        trim = self.encodes_whitespace and not prompt.endswith(" ")
        ids += self.encode(output.rstrip(" "), trim_leading_whitespace=trim)
        ids.append(self.eos_id)  # end of the assistant turn: EOS
        return ids


def load_rows(paths: list[str]) -> tuple[list[dict], list[tuple[str, str, str, int]]]:
    rows, prov = [], []
    for path in paths:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
        stripped = text.lstrip()
        if stripped.startswith("["):
            part = json.loads(text)
        else:
            part = [json.loads(line) for line in text.splitlines() if line.strip()]
        # the git blob id lets a copy be matched against gururise/AlpacaDataCleaned's history
        blob = hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest()
        prov.append((path, hashlib.sha256(raw).hexdigest(), blob, len(part)))
        rows.extend(part)
    return rows, prov


def percentile(sorted_vals: list[int], q: float) -> int:
    """Nearest-rank percentile (the smallest value with at least q% of samples at or below it)."""
    k = max(1, -(-len(sorted_vals) * q // 100))  # ceil(n*q/100)
    return sorted_vals[int(k) - 1]


def batch_reach(sorted_vals: list[int], batch: int, cap: int) -> float:
    """P(max of `batch` samples drawn uniformly with replacement >= cap): padded-to-longest hits the cap."""
    below = bisect.bisect_left(sorted_vals, cap) / len(sorted_vals)
    return 1.0 - below**batch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="Llama-2 SentencePiece tokenizer.model")
    ap.add_argument("--data", required=True, nargs="+", help="Alpaca-format JSON array or JSONL file(s)")
    ap.add_argument("--out", help="histogram CSV to write (tokens,samples)")
    ap.add_argument("--per-sample", help="optional CSV of index,tokens per row")
    args = ap.parse_args(argv)

    tok = TorchtuneLlama2Tokenizer(args.tokenizer)
    print(f"tokenizer {args.tokenizer}: vocab {tok.sp.vocab_size()}, bos {tok.bos_id}, eos {tok.eos_id}, "
          f"encodes_whitespace {tok.encodes_whitespace}")
    rows, prov = load_rows(args.data)
    for path, sha, blob, n in prov:
        print(f"data {path}: sha256 {sha}, git blob {blob}, {n} rows")

    lengths = [len(tok.input_ids(r)) for r in rows]
    hist = collections.Counter(lengths)
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["tokens", "samples"])
            for t in sorted(hist):
                w.writerow([t, hist[t]])
    if args.per_sample:
        with open(args.per_sample, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["index", "tokens"])
            w.writerows(enumerate(lengths))

    s = sorted(lengths)
    n = len(s)
    print(f"samples {n}, mean {sum(s) / n:.2f}, median {percentile(s, 50)}, P90 {percentile(s, 90)}, "
          f"P99 {percentile(s, 99)}, max {s[-1]}, min {s[0]}")
    for cap in (512, 1024, 2048):
        over = n - bisect.bisect_right(s, cap)
        print(f"  > {cap} tokens: {over} samples ({100 * over / n:.3f}%)")
    for batch, cap in ((1, 512), (2, 512), (4, 512), (8, 512), (2, 2048), (4, 2048), (8, 2048)):
        print(f"  batch {batch}: P(longest >= {cap}, so padded to the {cap} cap) = {100 * batch_reach(s, batch, cap):.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
