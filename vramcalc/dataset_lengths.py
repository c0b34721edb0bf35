"""A local dataset's token count per sample (``vramcalc lengths``), for ``--sample-lengths`` (``sample_lengths.py``).

Each record becomes the token ids a trainer feeds the model, with the model's own tokenizer
(``transformers.AutoTokenizer``, a local folder or a Hub repo id; needs the ``trace`` extra):

- ``messages`` (or ``conversations``): a chat, ``tokenizer.apply_chat_template(messages, tokenize=True)``, as TRL's
  SFTTrainer tokenizes a conversational dataset;
- ``text``: the text with the end-of-sequence token appended where it does not end with it, then ``tokenizer(text)``
  (TRL 1.16.0 ``trainer/sft_trainer.py:1292-1297`` ``add_eos``, then ``tokenize_fn``);
- ``prompt`` and ``completion``: ``tokenizer(prompt + completion)``, the completion ending with the end-of-sequence
  token likewise (same lines);
- ``instruction``, ``input`` (optional) and ``output``: Stanford Alpaca's prompt (tatsu-lab/stanford_alpaca
  ``train.py`` ``PROMPT_DICT``, the template torchtune's and most recipes' Alpaca loaders copy) followed by the
  output, plus the end-of-sequence token;
- ``field=NAME``: that field's text, as ``text``.

Files: JSON Lines (``.jsonl``), a JSON list of records (``.json``), CSV (``.csv``) and Parquet (``.parquet``, needs
pyarrow). The counts are untruncated: ``--seq-len`` truncates when the estimate reads them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import VramcalcError
from .progress import Progress
from .sample_lengths import LengthProfile

# tatsu-lab/stanford_alpaca train.py PROMPT_DICT (commit 761dc5bf)
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def read_records(path) -> list[dict]:
    """The records of a local dataset file (module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
            if not isinstance(data, list):
                raise VramcalcError(f"{path}: a JSON dataset must be a list of records")
            return data
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as handle:
                return list(csv.DictReader(handle))
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as parquet
            except ImportError:
                raise ImportError("reading .parquet needs pyarrow: pip install pyarrow") from None
            return parquet.read_table(path).to_pylist()
    except json.JSONDecodeError as error:
        raise VramcalcError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    except UnicodeDecodeError:
        raise VramcalcError(f"{path}: not UTF-8 text") from None
    raise VramcalcError(f"{path}: unknown dataset format {suffix or '(no suffix)'!r}; use .jsonl, .json, .csv or "
                        ".parquet")


def load_tokenizer(name: str):
    """``transformers.AutoTokenizer`` for a local folder or a Hub repo id."""
    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise ImportError(f"vramcalc lengths needs the 'trace' extra ({error.name} is missing): "
                          "pip install 'vramcalc[trace]'") from None
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VramcalcError(f"--tokenizer {name}: cannot load a tokenizer ({first})") from None


def sample_tokens(record: dict, tokenizer, field: str | None = None) -> int:
    """The token count of one record (module docstring)."""
    if not isinstance(record, dict):
        raise VramcalcError(f"a record must be an object with named fields, got {type(record).__name__}")
    if field is not None:
        if field not in record:
            raise VramcalcError(f"a record has no field {field!r}; its fields: {', '.join(map(str, record))}")
        return _tokens_with_eos(tokenizer, str(record[field]))
    chat = record.get("messages", record.get("conversations"))
    if chat is not None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise VramcalcError("the records are chats (messages) but the tokenizer has no chat template")
        return len(_ids(tokenizer.apply_chat_template(chat, tokenize=True)))
    if "text" in record:
        return _tokens_with_eos(tokenizer, str(record["text"]))
    if "prompt" in record and "completion" in record:
        return _tokens_with_eos(tokenizer, str(record["prompt"]) + str(record["completion"]))
    if "instruction" in record and "output" in record:
        template = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
        text = template.format(instruction=record["instruction"], input=record.get("input", "")) + str(record["output"])
        ids = tokenizer(text)["input_ids"]
        eos = tokenizer.eos_token_id
        return len(ids) + (1 if eos is not None and (not ids or ids[-1] != eos) else 0)
    raise VramcalcError("a record has none of messages, conversations, text, prompt+completion or "
                        f"instruction+output; name the text with --field (its fields: {', '.join(map(str, record))})")


def _ids(encoded) -> list:
    """The token ids of ``apply_chat_template(..., tokenize=True)``: a list, or a mapping holding ``input_ids``."""
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


def _tokens_with_eos(tokenizer, text: str) -> int:
    """``tokenizer(text)`` after TRL's ``add_eos``: the end-of-sequence token appended unless the text ends with it."""
    eos = tokenizer.eos_token
    if eos and not text.endswith(eos):
        text += eos
    return len(tokenizer(text)["input_ids"])


def dataset_lengths(path, tokenizer, *, field: str | None = None, progress: bool | None = None) -> LengthProfile:
    """The token count of every record of ``path`` as a ``LengthProfile`` (``tokenizer``: a loaded tokenizer or a
    name for ``load_tokenizer``)."""
    records = read_records(path)
    if not records:
        raise VramcalcError(f"{path}: no records")
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    counts: list[int] = []
    with Progress(len(records), f"tokenizing {Path(path).name}", "samples", enabled=progress) as bar:
        for record in records:
            counts.append(sample_tokens(record, tokenizer, field))
            bar.update()
    return LengthProfile.of(counts)


def histogram_csv(profile: LengthProfile) -> str:
    """The profile as the ``tokens,samples`` CSV that ``--sample-lengths`` reads."""
    return "tokens,samples\n" + "".join(f"{t},{n}\n" for t, n in zip(profile.tokens, profile.samples) if n)
