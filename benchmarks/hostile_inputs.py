"""Try vramcalc the way a careless or hostile user would, and count how many runs end cleanly.

Clean means: exit 0 with no traceback on stderr, or exit 2 with exactly one stderr line that starts with
``error:``; and no file the run was asked to write is left damaged (a truncated file or a leftover temporary).
Each case runs the real console entry point in a fresh process (``python -m vramcalc ...``), as a user would.

    python benchmarks/hostile_inputs.py [--quick] [--out benchmarks/hostile_inputs.md]

The closing figures of issue 10 come from this script; tests/test_hostile_inputs.py asserts the same outcomes for
each reproduction the issue lists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


@dataclass(frozen=True)
class Case:
    label: str
    argv: tuple[str, ...]
    module: str = "vramcalc"
    slow: bool = False  # a trace or calibrate run: skipped with --quick


@dataclass(frozen=True)
class Outcome:
    case: Case
    returncode: int
    stderr: str
    clean: bool
    why: str


def _config(folder: Path, name: str, **overrides) -> str:
    """A small llama config.json with some fields replaced by hostile values."""
    config = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 1000,
              "max_position_embeddings": 2048, "tie_word_embeddings": False}
    config.update(overrides)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def cases(tmp: Path) -> list[Case]:
    out: list[Case] = []

    def add(label, *argv, module="vramcalc", slow=False):
        out.append(Case(label, tuple(str(a) for a in argv), module, slow))

    est = ("estimate", "llama-3.1-8b")
    # numbers that are not numbers, or out of range
    for flag in ("--batch-size", "--seq-len", "--lora-rank", "--virtual-tokens", "--grad-accum", "--num-gpus",
                 "--global-batch-size"):
        for value in ("0", "-1", "1.5", "nan", "inf", "-inf", "1e400", "10" * 200, "abc", "", " ", "0x10", "2**40",
                      "1e18", "99999999999999999999"):
            add(f"estimate {flag} {value!r}", *est, "--method", "lora" if "lora" in flag else "full",
                *(("--method", "prompt") if flag == "--virtual-tokens" else ()), flag, value)
    for value in ("-0.1", "1", "1.5", "nan", "abc"):
        add(f"estimate --lora-dropout {value}", *est, "--method", "lora", "--lora-dropout", value)
    # words that are not choices
    for flag in ("--method", "--precision", "--optimizer", "--attn", "--loss", "--sharding", "--offload", "--quant",
                 "--adapter-dtype", "--compute-dtype", "--fsdp-shard", "--format"):
        for value in ("bogus", "", "FULL ", "\x1b[31mred", "lora;rm -rf /"):
            add(f"estimate {flag} {value!r}", *est, flag, value)
    # impossible combinations
    add("fp8 qlora", *est, "--method", "qlora", "--precision", "fp8")
    add("fp32 flash", *est, "--precision", "fp32", "--attn", "flash")
    add("lora options on full", *est, "--lora-rank", "8")
    add("sharding on one GPU", *est, "--sharding", "fsdp")
    add("offload without sharding", *est, "--offload", "optimizer")
    add("lora rank above width", *est, "--method", "lora", "--lora-rank", "100000")
    add("lora target unknown", *est, "--method", "lora", "--lora-targets", "nope")
    add("lora targets empty", *est, "--method", "lora", "--lora-targets", ",,")
    add("global batch not divisible", *est, "--global-batch-size", "7", "--num-gpus", "2", "--sharding", "ddp")
    add("huge seq", *est, "--seq-len", str(2**40))
    add("huge batch", *est, "--batch-size", str(10**18))
    # models: names, paths and configs
    for model in ("", " ", "nope", "llama", "../../etc/passwd", "/dev/null", "/nonexistent/config.json", str(tmp),
                  "\x1b[2J", "a" * 5000, "meta-llama/", "ORG/NAME/extra"):
        add(f"model {model[:30]!r}", "estimate", model)
    bad_fields = {
        "kv heads as text": {"num_key_value_heads": "8"},
        "fractional head_dim": {"head_dim": 64.5},
        "context 'lots'": {"max_position_embeddings": "lots"},
        "model_type list": {"model_type": ["llama"]},
        "kv heads not dividing heads": {"num_key_value_heads": 3},
        "zero layers": {"num_hidden_layers": 0},
        "negative hidden": {"hidden_size": -256},
        "null vocab": {"vocab_size": None},
        "bool heads": {"num_attention_heads": True},
        "huge layers": {"num_hidden_layers": 10**12},
        "float layers": {"num_hidden_layers": 2.0000001},
        "unknown family": {"model_type": "not-a-family"},
        "nan intermediate": {"intermediate_size": float("nan")},
        "moe sparse step 0": {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
                              "moe_intermediate_size": 128, "decoder_sparse_step": 0, "head_dim": 64},
        "moe mlp_only_layers int": {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
                                    "moe_intermediate_size": 128, "mlp_only_layers": 5, "head_dim": 64},
        "experts per token above experts": {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 8,
                                            "moe_intermediate_size": 128, "head_dim": 64},
    }
    for label, fields in bad_fields.items():
        add(f"config {label}", "estimate", _config(tmp, label.replace(" ", "_"), **fields))
    deep = tmp / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    add("config nested 200000 deep", "estimate", deep)
    notjson = tmp / "notjson.json"
    notjson.write_text("{not json")
    add("config not json", "estimate", notjson)
    binary = tmp / "binary.json"
    binary.write_bytes(bytes(range(256)) * 10)
    add("config binary", "estimate", binary)
    add("config is a list", "estimate", _write(tmp / "list.json", "[1, 2, 3]"))
    # gpus
    for gpu in ("", "nope", "h100", "A100", "\x1b[31m", "NVIDIA H100 80GB HBM3"):
        add(f"gpu {gpu!r}", *est, "--gpu", gpu)
    # plan
    plan = ("plan", "llama-3.1-8b", "--method", "lora", "--tokens", "1e9")
    for value in ("0", "-1", "1e300", "1e9", "100000", "nan", "abc", "2.5"):
        add(f"plan --max-gpus {value}", *plan, "--max-gpus", value)
    for value in (",,", "", "nope", "h100-sxm,,nope"):
        add(f"plan --gpus {value!r}", *plan, "--gpus", value)
    for flag in ("--tokens", "--epochs", "--mfu", "--usd-per-kwh", "--amortisation-years"):
        for value in ("0", "-1", "nan", "inf", "abc", "1e400"):
            add(f"plan {flag} {value}", "plan", "llama-3.1-8b", "--method", "lora", "--tokens", "1e9", flag, value)
    add("plan --rank-by bogus", *plan, "--rank-by", "bogus")
    for target in (str(tmp / "nonexistent" / "plan.csv"), "/dev/full", "/proc/version",
                   str(tmp / "file.txt" / "plan.csv"),
                   str(tmp / "readonly" / "plan.csv"), str(tmp)):
        add(f"plan --output {target}", *plan, "--output", target)
    # max-batch
    for gpu in ("nope", "h200"):
        add(f"max-batch {gpu}", "max-batch", "llama-3.1-8b", "--method", "lora", "--gpu", gpu)
    add("max-batch nothing fits", "max-batch", "llama-3.1-405b", "--gpu", "rtx-4090", "--format", "json")
    # report
    for target in (str(tmp / "new" / "dir"), str(tmp / "file.txt"), "/dev/full", str(tmp / "readonly" / "r")):
        add(f"report --output {target}", "report", "--model", "llama-3.1-8b", "--output", target)
    for value in ("0", "-5", "abc", "nan"):
        add(f"report --budget {value}", "report", "--budget", value)
    # trace
    add("trace fp8", "trace", "smollm2-135m", "--precision", "fp8", "--seq-len", "64", slow=True)
    add("trace huge batch", "trace", "smollm2-135m", "--batch-size", "1e18", slow=True)
    add("trace bad model", "trace", "nope")
    # calibrate flags
    cal = ("--device", "cpu", "--out", str(tmp / "cal"))
    for flag, value in (("--budget-minutes", "0"), ("--budget-minutes", "-1"), ("--budget-minutes", "nan"),
                        ("--scenario-timeout", "0"), ("--scenario-timeout", "nan"), ("--warmup", "-1"),
                        ("--memory-limit-mib", "-5"), ("--device", "tpu"), ("--device", "cuda:99")):
        add(f"calibrate {flag} {value}", *cal, flag, value, module="vramcalc.calibrate")
    add("calibrate --out onto a file", "--device", "cpu", "--out", str(tmp / "file.txt"), "--budget-minutes", "0.1",
        module="vramcalc.calibrate")
    add("calibrate --fit-only on an empty folder", "--fit-only", "--out", str(tmp / "empty"),
        module="vramcalc.calibrate")
    # the Python API: a bad value must raise VramcalcError (printed as one error line by the wrapper below), and an
    # answer must never hold a negative or non-integer byte count
    api = {
        "sweep({})": "vc.sweep({})",
        "sweep(None)": "vc.sweep(None)",
        "sweep seq 2**40": "check(vc.sweep({'model':['llama-3.1-8b'],'seq_len':[2**40],'gpu':['h100-sxm']}))",
        "sweep seq -5": "check(vc.sweep({'model':['llama-3.1-8b'],'seq_len':[-5]}))",
        "sweep unknown key": "vc.sweep({'model':['llama-3.1-8b'],'bogus':[1]})",
        "sweep scalar values": "check(vc.sweep({'model':'llama-3.1-8b','seq_len':1024}))",
        "estimate seq 10**400": "check(vc.estimate('llama-3.1-8b', seq_len=10**400))",
        "estimate seq 2**62": "check(vc.estimate('llama-3.1-8b', seq_len=2**62))",
        "estimate batch float": "check(vc.estimate('llama-3.1-8b', batch_size=2.5))",
        "estimate batch bool": "check(vc.estimate('llama-3.1-8b', batch_size=True))",
        "estimate lora_targets=5": "check(vc.estimate('llama-3.1-8b', method='lora', lora_targets=5))",
        "estimate lora_targets=None list": "check(vc.estimate('llama-3.1-8b', method='lora', lora_targets=[None]))",
        "estimate model=None": "check(vc.estimate(None))",
        "estimate model=5": "check(vc.estimate(5))",
        "estimate gpu=5": "check(vc.estimate('llama-3.1-8b', gpu=5))",
        "estimate unknown option": "check(vc.estimate('llama-3.1-8b', bogus=1))",
        "estimate method=list": "check(vc.estimate('llama-3.1-8b', method=['lora']))",
        "max_batch_size 405b on 4090": "print(vc.max_batch_size('llama-3.1-405b', 'rtx-4090'))",
        "plan tokens=-1": "vc.plan('llama-3.1-8b', tokens=-1)",
        "plan tokens=nan": "vc.plan('llama-3.1-8b', tokens=float('nan'))",
        "plan gpus empty": "vc.plan('llama-3.1-8b', tokens=1e9, gpus=[])",
        "fits unknown gpu": "vc.estimate('llama-3.1-8b').fits('nope')",
    }
    for label, code in api.items():
        add(f"api {label}", "-c", API_WRAPPER.replace("{code}", code), module="")
    # a model folder whose name tries to inject a spreadsheet formula and terminal escapes
    for name in ("\r=1+1", " =1+1", "\n=HYPERLINK(\"x\")", "\t@SUM(A1)", "\x1b]0;pwned\x07x"):
        folder = tmp / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        _config(folder, "config")
        add(f"csv injection {name!r}", "estimate", folder, "--format", "csv")
        add(f"plan csv injection {name!r}", "plan", folder, "--tokens", "1e9", "--gpus", "h100-sxm",
            "--output", tmp / "inj.csv")
    # issue 10 items 1, 2, 4, 8, 10 (helper H8): more of the same kind
    add("plan --gpus ' '", *plan, "--gpus", " ")
    add("plan --max-gpus 1e10", *plan, "--max-gpus", "1e10")
    add("max-batch past 65536", "max-batch", "smollm2-135m", "--gpu", "h200", "--seq-len", "1")
    add("max-batch nothing fits csv", "max-batch", "llama-3.1-405b", "--gpu", "rtx-4090", "--format", "csv")
    add("plan empty model", "plan", "", "--tokens", "1e9")
    add("max-batch empty model", "max-batch", "", "--gpu", "h200")
    add("plan --output name too long", *plan, "--output", tmp / ("a" * 5000))
    add("plan --output /dev/null", *plan, "--output", "/dev/null")
    add("report --output /proc/version", "report", "--output", "/proc/version")
    add("report --output under a file", "report", "--output", tmp / "file.txt" / "r")
    add("estimate --help", "estimate", "--help")
    add("models table", "models")
    add("gpus csv", "gpus", "--format", "csv")
    # bare and odd invocations
    add("no arguments")
    add("--version", "--version")
    add("unknown verb", "bogus")
    add("estimate without model", "estimate")
    return out


API_WRAPPER = """
import math, sys
import vramcalc as vc
def check(result):
    if isinstance(result, vc.MemoryBreakdown):  # (a sweep DataFrame has a total_bytes column too)
        rows = [{"total_bytes": result.total_bytes, **{str(k): v for k, v in result.terms().items()}}]
    else:  # a DataFrame
        rows = result.to_dict("records")
    for row in rows:
        if isinstance(row.get("error"), str):  # a sweep row that could not be estimated: its reason, no figures
            continue
        for key, value in row.items():
            if key.endswith("bytes") or key in ("weights", "activations", "logits", "gradients"):
                if not isinstance(value, int) and not (hasattr(value, "item") and float(value).is_integer()) \
                        or value < 0:
                    print(f"bad byte count {key}={value!r}", file=sys.stderr); sys.exit(3)
try:
    {code}
except vc.VramcalcError as err:
    print(f"error: {err}", file=sys.stderr); sys.exit(2)
"""


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def judge(case: Case, result: subprocess.CompletedProcess) -> Outcome:
    err_lines = [line for line in result.stderr.splitlines() if line.strip()]
    if "Traceback" in result.stderr:
        return Outcome(case, result.returncode, result.stderr, False, "traceback")
    if result.returncode == 0:
        return Outcome(case, 0, result.stderr, True, "ok")
    if result.returncode == 2 and len(err_lines) == 1 and err_lines[0].startswith("error:"):
        return Outcome(case, 2, result.stderr, True, "one error line")
    if result.returncode == 2 and err_lines and err_lines[-1].startswith("error:") and \
            all(not line.startswith(("Traceback", "  File")) for line in err_lines):
        return Outcome(case, 2, result.stderr, False, f"{len(err_lines)} stderr lines")
    return Outcome(case, result.returncode, result.stderr, False, f"exit {result.returncode}")


def leftovers(folder: Path) -> list[str]:
    """Temporary files a failed write left behind."""
    return [str(p) for p in folder.rglob("*") if p.name.endswith((".tmp", ".part")) or ".tmp" in p.name]


def run_all(quick: bool) -> list[Outcome]:
    outcomes = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "file.txt").write_text("a file, not a folder\n")
        (tmp / "readonly").mkdir()
        os.chmod(tmp / "readonly", 0o555)
        (tmp / "empty").mkdir()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        todo = [case for case in cases(tmp) if not (quick and case.slow)]
        for index, case in enumerate(todo, 1):
            print(f"\r{index}/{len(todo)} {case.label[:60]:60}", end="", file=sys.stderr, flush=True)
            try:
                command = [sys.executable, *(("-m", case.module) if case.module else ()), *case.argv]
                result = subprocess.run(command, capture_output=True,
                                        text=True, timeout=TIMEOUT_S, env=env, stdin=subprocess.DEVNULL, cwd=tmp)
                outcome = judge(case, result)
            except subprocess.TimeoutExpired:
                outcome = Outcome(case, -1, "", False, f"ran past {TIMEOUT_S} s")
            left = leftovers(tmp)
            if left:
                outcome = Outcome(case, outcome.returncode, outcome.stderr, False, f"left {left[0]}")
                for path in left:
                    Path(path).unlink(missing_ok=True)
            outcomes.append(outcome)
        print(file=sys.stderr)
        os.chmod(tmp / "readonly", 0o755)
    return outcomes


def markdown(outcomes: list[Outcome]) -> str:
    clean = sum(o.clean for o in outcomes)
    lines = [f"# Hostile inputs: {clean} of {len(outcomes)} runs ended cleanly", "",
             "Generated by `python benchmarks/hostile_inputs.py`. Clean: exit 0 without a traceback, or exit 2 with "
             "one `error:` line, and no temporary or damaged file left behind.", ""]
    bad = [o for o in outcomes if not o.clean]
    if bad:
        lines += ["| case | exit | why | last stderr line |", "|---|---|---|---|"]
        for o in bad:
            last = (o.stderr.strip().splitlines() or [""])[-1][:120].replace("|", "\\|")
            lines.append(f"| {o.case.label[:60]} | {o.returncode} | {o.why} | {last} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip trace and calibrate runs")
    parser.add_argument("--out", help="write the Markdown summary here")
    args = parser.parse_args()
    outcomes = run_all(args.quick)
    text = markdown(outcomes)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0 if all(o.clean for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
