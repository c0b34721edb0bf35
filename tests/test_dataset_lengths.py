"""``vramcalc lengths``: a local dataset's token counts with the model's tokenizer, as ``--sample-lengths`` reads them.
The tokenizer here splits on whitespace (one token per word, BOS in front), so every count is checked against the
words of the text the record becomes."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from vramcalc.dataset_lengths import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, dataset_lengths, read_records
from vramcalc.errors import VramcalcError
from vramcalc.sample_lengths import read

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A whitespace tokenizer saved as a transformers folder: BOS before every text, EOS a special token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return str(folder)


RECORDS = [
    {"text": "one two three"},
    {"prompt": "say hi", "completion": " hi there"},
    {"instruction": "Name a colour.", "output": "Blue is one."},
    {"instruction": "Add them.", "input": "2 and 3", "output": "5"},
    {"messages": [{"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]},
]


def _words(text: str) -> int:
    return len(text.split())


def _expected():
    alpaca_plain = ALPACA_NO_INPUT.format(instruction="Name a colour.") + "Blue is one."
    alpaca_input = ALPACA_WITH_INPUT.format(instruction="Add them.", input="2 and 3") + "5"
    return [
        1 + 3 + 1,  # BOS, three words, EOS (TRL's add_eos)
        1 + _words("say hi hi there") + 1,
        1 + _words(alpaca_plain) + 1,
        1 + _words(alpaca_input) + 1,
        _words("user: how are you assistant: fine"),  # the chat template adds no BOS
    ]


def test_each_record_kind_counts_the_tokens_its_trainer_feeds(tmp_path, word_tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    profile = dataset_lengths(path, word_tokenizer, progress=False)
    expected = _expected()
    assert profile.count == len(RECORDS)
    assert sorted(t for t, n in zip(profile.tokens, profile.samples) for _ in range(n)) == sorted(expected)


def test_json_csv_and_jsonl_files_hold_the_same_records(tmp_path):
    rows = [{"text": "a b"}, {"text": "c"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps({"train": rows}))
    (tmp_path / "d.csv").write_text("text\na b\nc\n")
    assert read_records(tmp_path / "d.jsonl") == read_records(tmp_path / "d.json") == read_records(tmp_path / "d.csv")
    with pytest.raises(VramcalcError, match="unknown dataset format"):
        read_records(tmp_path / "d.txt")


def test_a_record_without_a_known_field_asks_for_one(tmp_path, word_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x y"}) + "\n")
    with pytest.raises(VramcalcError, match="--field"):
        dataset_lengths(path, word_tokenizer, progress=False)
    assert dataset_lengths(path, word_tokenizer, field="body", progress=False).tokens == (1 + 2 + 1,)


def test_the_cli_writes_the_histogram_the_estimate_reads(tmp_path, word_tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS * 3) + "\n")
    out = tmp_path / "lengths.csv"
    done = subprocess.run([sys.executable, "-m", "vramcalc", "lengths", str(path), "--tokenizer", word_tokenizer,
                           "--output", str(out), "--format", "json"], capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    assert summary["samples"] == 15 and summary["longest_tokens"] == max(_expected())
    profile = read(out)
    assert profile.count == 15 and sorted(set(profile.tokens)) == sorted(set(_expected()))
    missing = subprocess.run([sys.executable, "-m", "vramcalc", "lengths", str(path), "--tokenizer",
                              str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: --tokenizer") and \
        missing.stderr.count("\n") == 1
