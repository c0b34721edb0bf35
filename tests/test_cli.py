"""The CLI, driven in-process through main(argv): output formats, and one error line with exit code 2 for bad input."""

import dataclasses
import json

import pytest

from vramcalc.cli import SETUP_KEYS, build_parser
from vramcalc.options import Term
from vramcalc.training_setup import TrainingSetup

from .cli_helpers import run_cli


def test_json_has_the_contract_keys_and_terms_sum_to_total(capsys):
    code, out, _ = run_cli(capsys, "estimate", "llama-3.1-8b", "--method", "lora", "--format", "json")
    data = json.loads(out)
    assert code == 0
    assert {"total_bytes", "peak_tensor_bytes", "phase", "terms", "inputs"} <= set(data)
    assert set(data["terms"]) == {t.value for t in Term}
    assert sum(data["terms"].values()) == data["total_bytes"]
    assert data["inputs"]["lora_rank"] == 8 and "lora_rank" in data["inputs"]["defaults"]


def test_table_prints_gib_with_two_decimals_and_says_what_gib_is(capsys):
    code, out, _ = run_cli(capsys, "estimate", "qwen3-8b", "--seq-len", "1024")
    assert code == 0
    assert "GiB = 2^30 bytes" in out
    weights_line = next(line for line in out.splitlines() if line.startswith("weights"))
    assert weights_line.split()[-2].count(".") == 1 and len(weights_line.split()[-2].split(".")[1]) == 2


def test_gpu_flag_says_whether_it_fits_and_the_headroom(capsys):
    _, out, _ = run_cli(capsys, "estimate", "llama-3.1-8b", "--method", "qlora", "--gpu", "rtx-4090")
    assert "rtx-4090" in out and "fits" in out and "headroom" in out


def test_csv_is_one_header_and_one_row_with_unit_suffixed_columns(capsys):
    _, out, _ = run_cli(capsys, "estimate", "phi-4", "--format", "csv")
    header, row = out.strip().splitlines()
    assert "total_bytes" in header.split(",") and "weights_bytes" in header.split(",")
    assert len(header.split(",")) == len(row.split(","))


def test_models_and_gpus_list_the_catalogues_as_json(capsys):
    _, out, _ = run_cli(capsys, "models", "--format", "json")
    models = json.loads(out)
    assert {"name", "params", "active_params"} <= set(models[0])
    _, out, _ = run_cli(capsys, "gpus", "--format", "json")
    assert {"name", "memory_bytes"} <= set(json.loads(out)[0])


BAD_INPUT = [
    (["estimate", "lama-3-8b"], "closest: llama"),
    (["estimate", "llama-3.1-8b", "--gpu", "h1000"], "closest: h200"),
    (["estimate", "llama-3.1-8b", "--batch-size", "0"], "batch size"),
    (["estimate", "llama-3.1-8b", "--seq-len", "-5"], "sequence length"),
    (["estimate", "llama-3.1-8b", "--method", "lora", "--lora-rank", "0"], "LoRA rank"),
    (["estimate", "llama-3.1-8b", "--method", "lora", "--lora-rank", "5000"], "larger than"),
    (["estimate", "llama-3.1-8b", "--optimizer", "adam"], "unknown optimizer 'adam'"),
    (["estimate", "llama-3.1-8b", "--precision", "int3"], "unknown precision"),
    (["estimate", "llama-3.1-8b", "--method", "qlora", "--precision", "fp8"], "qlora with precision fp8"),
    (["estimate", "llama-3.1-8b", "--lora-rank", "16"], "does not apply to --method full"),
    (["estimate", "llama-3.1-8b", "--method", "lora", "--lora-targets", "w_q"], "not a linear layer"),
    (["estimate", "llama-3.1-8b", "--sharding", "fsdp"], "needs --num-gpus"),
    (["estimate", "llama-3.1-8b", "--format", "yaml"], "unknown format"),
    (["estimate", "llama-3.1-8b", "--lora-dropout", "1.5", "--method", "lora"], "LoRA dropout"),
    (["estimate", "llama-3.1-8b", "--batch-size", "nan"], "batch size"),
    (["estimat", "llama-3.1-8b"], "invalid choice"),
]


@pytest.mark.parametrize("argv, fragment", BAD_INPUT, ids=[" ".join(a[1:]) for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_error_line_naming_it(capsys, argv, fragment):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


def test_malformed_config_file_exits_2(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 64}')
    code, _, err = run_cli(capsys, "estimate", str(path))
    assert code == 2 and "lacks the field 'num_attention_heads'" in err


def test_sequence_longer_than_the_context_warns_and_still_estimates(capsys):
    code, out, err = run_cli(capsys, "estimate", "llama-2-7b", "--seq-len", "8192", "--format", "json")
    assert code == 0 and json.loads(out)["total_bytes"] > 0
    assert err.startswith("warning: sequence length 8192 exceeds")


def test_the_table_prints_each_warning_once(capsys):
    code, out, err = run_cli(capsys, "estimate", "llama-2-7b", "--seq-len", "8192")
    assert code == 0
    lines = (out + err).splitlines()
    warned = [line for line in lines if line.startswith("warning: sequence length 8192 exceeds")]
    assert len(warned) == 1 and warned[0] in out.splitlines()


def test_every_training_setup_field_has_a_flag_on_every_verb_that_takes_a_setup():
    fields = {field.name for field in dataclasses.fields(TrainingSetup)}
    assert set(SETUP_KEYS) == fields
    verbs = next(action for action in build_parser()._actions if action.dest == "verb").choices
    for verb in ("estimate", "trace", "plan", "max-batch", "report"):
        dests = {action.dest for action in verbs[verb]._actions}
        assert fields <= dests, (verb, sorted(fields - dests))


BLOCK_IMPORTS = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocker())
from vramcalc.cli import main
raise SystemExit(main({argv!r}))
"""


@pytest.mark.parametrize("blocked, argv, message", [
    (("torch",), ["trace", "llama-3.1-8b"], "error: vramcalc.trace needs the 'trace' extra (torch is missing): "
                                            "pip install 'vramcalc[trace]'"),
    (("peft",), ["trace", "llama-3.1-8b", "--method", "lora"], "error: vramcalc.trace needs the 'trace' extra "
                                                             "(peft is missing)"),
])
def test_a_missing_trace_package_is_one_error_line_naming_the_extra(blocked, argv, message):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", BLOCK_IMPORTS.format(blocked=set(blocked), argv=argv)],
                          capture_output=True, text=True, timeout=300)
    # (importing torch may log its own library warnings first: only vramcalc's lines are the claim)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(message), done.stderr[-2000:]
