"""`vramcalc web`'s JSON API over plain HTTP: the real server on a free port, the CLI as the reference.

Claims: the API answers what the CLI prints for the same setup (estimate JSON, plan JSON, the plan CSV byte for byte);
the form is generated from TrainingSetup; every malformed request gets a 4xx with a one-line message and the server
keeps serving; the server refuses traces without --allow-trace, foreign Host headers, bursts and big bodies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import http.client
import io
import json
import re
import subprocess
import sys
import threading
import typing
import urllib.error
import urllib.parse
import urllib.request

import pytest

import vramcalc
from vramcalc.cli import main as cli_main
from vramcalc.planning.ranking import PLAN_TABLE_COLUMNS

pytest.importorskip("pandas")  # /api/plan and the plan CSV come from vramcalc.plan (a DataFrame)

from vramcalc.web.server import MAX_BODY_BYTES, make_server  # noqa: E402


@contextlib.contextmanager
def running(**options):
    server = make_server("127.0.0.1", 0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server():
    with running(rate_per_s=1000.0, burst=1000) as running_server:  # the rate limit has its own test below
        yield running_server


def request(server, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, headers, body bytes) of one request; never raises on an HTTP error status."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    sent = {"Content-Type": "application/json"} if data is not None else {}
    sent.update(headers or {})
    connection.request(method, path, body=data, headers=sent)
    response = connection.getresponse()
    out = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return out


def post(server, path: str, body):
    status, _, data = request(server, "POST", path, body)
    return status, data


def cli(*argv: str) -> str:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli_main(list(argv))
    assert code == 0, stderr.getvalue()
    return stdout.getvalue()


def flags(setup: dict) -> list[str]:
    out = []
    for key, value in setup.items():
        if key in ("model",):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out


SETUPS = [
    {"model": "llama-3.1-8b", "method": "lora", "gpu": "rtx-4090", "seq_len": 4096, "grad_ckpt": True},
    {"model": "qwen3-8b", "method": "qlora", "precision": "mixed-bf16", "batch_size": 4, "gpu": "a100-40gb",
     "lora_targets": "all-linear", "lora_rank": 64},
    {"model": "llama-3.1-70b", "method": "full", "optimizer": "adamw-8bit", "num_gpus": 8, "sharding": "fsdp",
     "gpu": "h100-sxm", "attn": "flash"},
    {"model": "smollm2-135m", "method": "prompt", "virtual_tokens": 50, "loss": "chunked"},
]


# -- the page -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/style.css", "/api/options"])
def test_every_response_carries_the_security_headers(server, path):
    status, headers, _ = request(server, "GET", path)
    assert status == 200
    policy = headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_the_page_loads_nothing_from_other_origins(server):
    page = request(server, "GET", "/")[2].decode() + request(server, "GET", "/static/app.js")[2].decode()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert "<script>" not in page and " style=" not in page  # no inline script or style: the CSP forbids them
    assert ".innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page


def test_the_form_is_generated_from_training_setup(server):
    status, _, data = request(server, "GET", "/api/options")
    fields = {field["name"]: field for field in json.loads(data)["fields"]}
    hints = typing.get_type_hints(vramcalc.TrainingSetup)
    assert list(fields) == [item.name for item in dataclasses.fields(vramcalc.TrainingSetup)]
    for name, field in fields.items():
        assert field["help"], f"{name} has no help text"
        kind = hints[name]
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            assert [choice["value"] for choice in field["choices"]] == [member.value for member in kind]
            assert field["default"] == getattr(vramcalc.TrainingSetup, name).value
    assert fields["lora_rank"]["methods"] and "full" not in fields["lora_rank"]["methods"]


class _Stack(str, enum.Enum):
    HF = "hf"  # transformers Trainer
    TRL = "trl"  # trl SFTTrainer


@dataclasses.dataclass(frozen=True)
class _FutureSetup:
    method: vramcalc.Method = vramcalc.Method.FULL
    stack: _Stack = _Stack.HF  # which training library runs the step
    packing: bool = False


def test_an_option_added_to_the_setup_appears_in_the_form_without_page_changes():
    from vramcalc.web.schema import fields_of

    fields = {field["name"]: field for field in fields_of(_FutureSetup)}
    stack = fields["stack"]
    assert stack["kind"] == "choice" and stack["default"] == "hf"
    assert stack["choices"] == [{"value": "hf", "help": "transformers Trainer"},
                                {"value": "trl", "help": "trl SFTTrainer"}]
    assert "which training library runs the step" in stack["help"]
    assert fields["packing"]["kind"] == "bool" and fields["packing"]["default"] is False


# -- the numbers agree with the CLI ---------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: f"{s['model']}-{s['method']}")
def test_api_estimate_is_the_cli_json(server, setup):
    status, data = post(server, "/api/estimate", setup)
    assert status == 200, data
    expected = json.loads(cli("estimate", setup["model"], *flags(setup), "--format", "json"))
    assert json.loads(data) == expected


def test_get_with_a_query_string_answers_like_post(server):
    setup = SETUPS[0]
    status, _, data = request(server, "GET", "/api/estimate?" + urllib.parse.urlencode(
        {key: str(value).lower() if isinstance(value, bool) else value for key, value in setup.items()}))
    assert status == 200
    assert json.loads(data) == json.loads(post(server, "/api/estimate", setup)[1])


def without_columns(document: dict) -> dict:
    """/api/plan's document less the table's columns it adds to the CLI's JSON (their own test is below)."""
    return {key: value for key, value in document.items() if key != "columns"}


def cli_table_header(text: str) -> list[str]:
    """The headers of the table that `vramcalc plan` prints: the line after the summary and its blank line."""
    lines = text.splitlines()
    return lines[lines.index("") + 1].split()


@pytest.mark.parametrize("budget", [{}, {"tokens": "2e8"}], ids=["per-million", "token-budget"])
def test_api_plan_carries_the_cli_table_columns_in_order(server, budget):
    setup = {"model": "llama-3.1-8b", "method": "lora", "seq_len": 1024, **budget}
    status, data = post(server, "/api/plan", setup)
    assert status == 200, data
    document = json.loads(data)
    header = cli_table_header(cli("plan", "llama-3.1-8b", *flags(setup)))
    assert header[:3] == ["rank", "offer", "gpu"] and "parallelism" in header and "host_ram_gib" in header
    assert [column["label"] for column in document["columns"]] == header
    keys = [column["key"] for column in document["columns"]]
    assert keys == list(PLAN_TABLE_COLUMNS)
    assert all(set(keys) <= set(row) for row in document["rows"])  # every column is a figure each row carries


def test_api_plan_and_its_csv_are_the_cli_plan(server, tmp_path):
    setup = {"model": "llama-3.1-8b", "method": "lora", "seq_len": 1024}
    status, data = post(server, "/api/plan", dict(setup, tokens=2e8))
    assert status == 200, data
    expected = json.loads(cli("plan", "llama-3.1-8b", *flags(setup), "--tokens", "2e8", "--format", "json"))
    assert without_columns(json.loads(data)) == expected
    status, headers, csv_bytes = request(server, "POST", "/api/plan.csv", dict(setup, tokens=2e8))
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    assert "attachment" in headers["Content-Disposition"]
    cli("plan", "llama-3.1-8b", *flags(setup), "--tokens", "2e8", "--output", str(tmp_path / "plan.csv"))
    assert csv_bytes == (tmp_path / "plan.csv").read_bytes()


def test_api_plan_without_tokens_is_the_cli_plan_per_million_tokens(server):
    setup = {"model": "llama-3.1-8b", "method": "lora", "seq_len": 1024}
    status, data = post(server, "/api/plan", setup)
    assert status == 200, data
    expected = json.loads(cli("plan", "llama-3.1-8b", *flags(setup), "--format", "json"))
    assert without_columns(json.loads(data)) == expected
    rows = [row for row in expected["rows"] if row.get("usd_per_million_tokens") is not None]
    assert rows and all(row.get("train_tokens") in (None, "") for row in expected["rows"])


def test_fits_gives_the_largest_micro_batch_that_fits(server):
    setup = {"model": "llama-3.1-8b", "method": "lora", "seq_len": 1024, "gpu": "h100-sxm"}
    status, data = post(server, "/api/fits", setup)
    assert status == 200
    rows = {row["gpu"]: row for row in json.loads(data)["rows"]}
    assert set(rows) == {gpu.name for gpu in vramcalc.gpus()}
    options = {"method": "lora", "seq_len": 1024}
    for name in ("h100-sxm", "rtx-4090", "t4"):
        largest = rows[name]["max_batch_size"]
        if largest > 0:
            assert vramcalc.estimate("llama-3.1-8b", gpu=name, batch_size=largest, **options).fits()
        assert not vramcalc.estimate("llama-3.1-8b", gpu=name, batch_size=largest + 1, **options).fits()


def test_an_uploaded_config_estimates_like_the_same_file_on_the_cli(server, tmp_path):
    config = {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16,
              "num_key_value_heads": 4, "intermediate_size": 4096, "vocab_size": 32000, "max_position_embeddings": 4096}
    status, data = post(server, "/api/estimate", {"config": config, "config_name": "my-model", "method": "lora"})
    assert status == 200, data
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = json.loads(cli("estimate", str(tmp_path / "config.json"), "--method", "lora", "--format", "json"))
    answer = json.loads(data)
    assert answer["model"] == "my-model"
    assert answer["terms"] == expected["terms"] and answer["total_bytes"] == expected["total_bytes"]


# -- a dataset's sample lengths (vramcalc/sample_lengths.py), as `vramcalc estimate --sample-lengths FILE` -----------
# torchtune LoRA at seq_len 512 (tests/test_sample_lengths.py's setup): transformers-free loss with [T, V] blocks, so
# the shorter steps leave loss ladders cached (details["length_ladders_bytes"] > 0)
LENGTHS_SETUP = {"model": "llama-2-7b", "stack": "torchtune", "method": "lora", "batch_size": 2, "seq_len": 512,
                 "loss": "torchtune-2024", "precision": "bf16-true", "grad_ckpt": True}
# 1,001 samples (150,333 tokens), the longest 333 (< seq_len 512): a hand-made histogram, its figures counted by hand
LENGTHS = [100] * 600 + [200] * 300 + [300] * 100 + [333]
LENGTH_FILES = {  # the three formats `--sample-lengths` reads, as the page uploads them (the file's text)
    "histogram.csv": "tokens,samples\n100,600\n200,300\n300,100\n333,1\n",
    "lengths.json": json.dumps(LENGTHS),
    "lengths.txt": "\n".join(map(str, LENGTHS)) + "\n",
}


@pytest.mark.parametrize("name", [*LENGTH_FILES, "json-value"])
def test_api_estimate_with_sample_lengths_is_the_cli_and_library_estimate_of_the_same_file(server, tmp_path, name):
    text = LENGTH_FILES.get(name, LENGTH_FILES["lengths.json"])
    path = tmp_path / (name if name in LENGTH_FILES else "lengths.json")
    path.write_text(text)
    uploaded = {"sample_lengths": text, "sample_lengths_name": name} if name in LENGTH_FILES else {
        "sample_lengths": LENGTHS}  # a JSON list of per-sample token counts, not a file's text
    status, data = post(server, "/api/estimate", dict(LENGTHS_SETUP, **uploaded))
    assert status == 200, data
    answer = json.loads(data)
    cli_json = json.loads(cli("estimate", "llama-2-7b", *flags(LENGTHS_SETUP), "--sample-lengths", str(path),
                              "--format", "json"))
    assert answer == cli_json  # the CLI's --format json, details and all
    options = {key: value for key, value in LENGTHS_SETUP.items() if key != "model"}
    library = vramcalc.estimate("llama-2-7b", sample_lengths=str(path), **options)
    assert answer["total_bytes"] == library.total_bytes and answer["details"] == library.details
    # figures counted by hand from LENGTHS: the longest step is the longest sample (333 < seq_len 512); one epoch is
    # ceil(1001 / batch 2) = 501 steps; a step (2 samples) is at 333 tokens with 1 - (1000/1001)^2
    details = answer["details"]
    assert details["longest_step_tokens"] == 333 and details["steps_per_epoch"] == 501
    assert details["share_of_steps_at_longest"] == pytest.approx(1 - (1000 / 1001) ** 2, abs=1e-4)
    assert answer["inputs"]["sample_lengths"] == {"samples": 1001, "mean_tokens": round(150333 / 1001, 1),
                                                  "longest_tokens": 333}
    assert answer["inputs"]["seq_len"] == 512
    # the peak is the longest step's: the fixed-length estimate at 333 tokens, not at seq_len
    at_longest = vramcalc.estimate("llama-2-7b", **dict(options, seq_len=333))
    assert answer["total_bytes"] == at_longest.total_bytes
    assert answer["total_bytes"] < vramcalc.estimate("llama-2-7b", **options).total_bytes
    assert details["length_ladders_bytes"] > 0  # the shorter steps' loss blocks, in reserved, not in the total


def test_the_same_lengths_in_another_format_are_one_cached_answer(server):
    answers = [post(server, "/api/estimate", dict(LENGTHS_SETUP, sample_lengths=text))[1]
               for text in LENGTH_FILES.values()]
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.parametrize("lengths, message", [
    ("hello,world\n1,2\n", "is neither a 'tokens,samples' CSV"),
    ("tokens,samples\n100,many\n", "is neither a 'tokens,samples' CSV"),
    ("[100, 2.5]", "not a whole number"),
    ("[100, [200]]", "not a whole number"),
    ("tokens,samples\n100,-1\n", "must be positive"),
    ("0\n12\n", "must be positive"),
    ("[" * 5000, "is neither"),
    ("", "no sample lengths given"),
    ([100, "200"], "not a whole number"),
    ([], "no sample lengths given"),
    ({"100": 3}, "must be a length file's text"),
])
def test_a_bad_length_file_gets_one_error_line_and_nothing_is_lost(server, lengths, message):
    status, data = post(server, "/api/estimate", dict(LENGTHS_SETUP, sample_lengths=lengths,
                                                       sample_lengths_name="my lengths.csv"))
    assert status == 400, data
    answer = json.loads(data)
    assert answer["field"] == "sample_lengths" and message in answer["error"]
    assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
    status, data = post(server, "/api/estimate", LENGTHS_SETUP)  # the same form without the file still answers
    assert status == 200 and json.loads(data)["total_bytes"] == vramcalc.estimate(
        "llama-2-7b", **{key: value for key, value in LENGTHS_SETUP.items() if key != "model"}).total_bytes


# -- bad input ------------------------------------------------------------------------------------------------------
GOOD = {"model": "llama-3.1-8b", "method": "lora"}
MALFORMED = [  # (method, path, body bytes or JSON value, extra headers, expected status, field)
    ("POST", "/api/estimate", b"{not json", None, 400, None),
    ("POST", "/api/estimate", b"[1, 2, 3]", None, 400, None),
    ("POST", "/api/estimate", b'"llama"', None, 400, None),
    ("POST", "/api/estimate", b'{"model": "llama-3.1-8b", "seq_len": NaN}', None, 400, None),
    ("POST", "/api/estimate", b"\xff\xfe{}", None, 400, None),
    ("POST", "/api/estimate", b"[" * 20000 + b"]" * 20000, None, 400, None),
    ("POST", "/api/estimate", {}, None, 400, "model"),
    ("POST", "/api/estimate", {"model": "llama-9000"}, None, 400, "model"),
    ("POST", "/api/estimate", {"model": 42}, None, 400, "model"),
    ("POST", "/api/estimate", {"model": "../../etc/passwd"}, None, 400, "model"),
    ("POST", "/api/estimate", {"model": "x" * 500}, None, 400, "model"),
    ("POST", "/api/estimate", dict(GOOD, colour="blue"), None, 400, "colour"),
    ("POST", "/api/estimate", dict(GOOD, batch_size="many"), None, 400, "batch_size"),
    ("POST", "/api/estimate", dict(GOOD, batch_size=[1]), None, 400, "batch_size"),
    ("POST", "/api/estimate", dict(GOOD, batch_size=-3), None, 400, "batch_size"),
    ("POST", "/api/estimate", dict(GOOD, seq_len=1.5), None, 400, "seq_len"),
    ("POST", "/api/estimate", dict(GOOD, grad_ckpt="maybe"), None, 400, "grad_ckpt"),
    ("POST", "/api/estimate", dict(GOOD, method="dreambooth"), None, 400, "method"),
    ("POST", "/api/estimate", dict(GOOD, precision=16), None, 400, "precision"),
    ("POST", "/api/estimate", dict(GOOD, gpu="h1000"), None, 400, "gpu"),
    ("POST", "/api/estimate", {"model": "llama-3.1-8b", "lora_rank": 16}, None, 400, "lora_rank"),
    ("POST", "/api/estimate", dict(GOOD, lora_targets="nonexistent_proj"), None, 400, "lora_targets"),
    ("POST", "/api/estimate", dict(GOOD, sharding="fsdp"), None, 400, "sharding"),
    ("POST", "/api/estimate", {"config": "not an object"}, None, 400, "config"),
    ("POST", "/api/estimate", {"config": {"model_type": "llama"}}, None, 400, "config"),
    ("POST", "/api/estimate", {"config": {"model_type": "unknown-arch"}}, None, 400, "config"),
    ("POST", "/api/plan", dict(GOOD, tokens="lots"), None, 400, "tokens"),
    ("POST", "/api/plan", dict(GOOD, rank_by="beauty"), None, 400, "rank_by"),
    ("POST", "/api/estimate", b"x" * (MAX_BODY_BYTES + 1), None, 413, None),
    ("POST", "/api/estimate", b"{" + b" " * MAX_BODY_BYTES + b"}", None, 413, None),
    ("POST", "/api/fits", dict(GOOD, sample_lengths=[100, 200]), None, 400, "sample_lengths"),
    ("POST", "/api/plan", dict(GOOD, sample_lengths="tokens,samples\n100,3\n"), None, 400, "sample_lengths"),
    ("POST", "/api/estimate", dict(GOOD, sample_lengths_name="lengths.csv"), None, 400, "sample_lengths"),
    ("POST", "/api/estimate", dict(GOOD, sample_lengths="[100, 200]", packing=True, attn="flash"), None, 400,
     "packing"),
    ("GET", "/api/estimate?model=llama-3.1-8b&sample_lengths=100", None, None, 400, "sample_lengths"),
    ("POST", "/api/estimate", GOOD, {"Content-Type": "text/plain"}, 415, None),
    ("GET", "/api/estimate?model=llama-3.1-8b&model=qwen3-8b", None, None, 400, "model"),
    ("GET", "/api/estimate?model=llama-3.1-8b&config=%7B%7D", None, None, 400, "config"),
    ("DELETE", "/api/estimate", None, None, 405, None),
    ("PUT", "/", GOOD, None, 405, None),
    ("POST", "/api/options", GOOD, None, 405, None),
    ("GET", "/static/../vramcalc/web/server.py", None, None, 404, None),
    ("GET", "/static/%2e%2e/%2e%2e/pyproject.toml", None, None, 404, None),
    ("GET", "/static/app.js/../../../etc/passwd", None, None, 404, None),
    ("GET", "/api/nothing", None, None, 404, None),
    ("POST", "/api/trace", GOOD, None, 403, None),
    ("GET", "/", None, {"Host": "evil.example:8000"}, 421, None),
]


@pytest.mark.parametrize("method, path, body, headers, status, field", MALFORMED,
                         ids=[f"{i:02d}-{case[0]}-{case[4]}" for i, case in enumerate(MALFORMED)])
def test_malformed_requests_get_a_4xx_with_one_line_and_the_server_keeps_serving(server, method, path, body, headers,
                                                                                 status, field):
    raw = body if isinstance(body, bytes) else None
    got, got_headers, data = request(server, method, path, None if raw is not None else body, headers, raw=raw)
    assert got == status, data
    assert got_headers["Content-Type"] == "application/json"
    answer = json.loads(data)
    assert set(answer) == {"error", "field"}
    assert answer["error"] and "\n" not in answer["error"] and "Traceback" not in answer["error"]
    assert answer["field"] == field, answer
    assert post(server, "/api/estimate", GOOD)[0] == 200  # and the server keeps serving


def test_a_post_without_content_length_is_refused(server):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.putrequest("POST", "/api/estimate")
    connection.putheader("Content-Type", "application/json")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411
    assert json.loads(response.read())["error"]


def test_a_garbled_request_line_gets_a_json_4xx(server):
    import socket

    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(b"GET /a b HTTP/1.1 extra\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):  # until the server closes the connection
            chunks.append(chunk)
        reply = b"".join(chunks).decode("latin-1")
    status = int(reply.split()[1])
    assert 400 <= status < 500
    assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]


def test_a_client_over_its_rate_gets_429_then_recovers():
    with running(rate_per_s=2.0, burst=3) as limited:
        statuses = [post(limited, "/api/estimate", GOOD)[0] for _ in range(6)]
        assert statuses[:3] == [200, 200, 200]
        assert 429 in statuses[3:]
        import time

        time.sleep(1.1)
        assert post(limited, "/api/estimate", GOOD)[0] == 200


def test_allow_trace_opens_the_trace_route():
    with running(allow_trace=True) as tracing:
        status, data = post(tracing, "/api/trace", {"model": "no-such-model"})
        assert status == 400 and json.loads(data)["field"] == "model"  # past the 403 gate; no trace was run


def test_the_page_is_told_the_servers_body_limit():
    """The page checks a length file against the limit of the server it talks to (app.js: the upload as sent)."""
    with running(max_body_bytes=123_456) as small:
        status, _, data = request(small, "GET", "/api/options")
        assert status == 200 and json.loads(data)["max_body_bytes"] == 123_456
        status, _ = post(small, "/api/estimate", {"model": "llama-3.2-1b", "sample_lengths": "1\n" * 70_000})
        assert status == 413


def test_the_web_package_is_not_imported_by_import_vramcalc():
    code = "import sys, vramcalc; print([m for m in sys.modules if m.startswith('vramcalc.web') or m == 'http.server'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


# -- the command ----------------------------------------------------------------------------------------------------
def test_vramcalc_web_serves_the_page_and_the_cli_numbers():
    process = subprocess.Popen([sys.executable, "-m", "vramcalc", "web", "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert match, line
        url = match.group(0)
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and b"<title>vramcalc" in response.read()
        with urllib.request.urlopen(url + "api/estimate?model=qwen3-8b&method=lora&gpu=l4", timeout=30) as response:
            answer = json.loads(response.read())
        expected = json.loads(cli("estimate", "qwen3-8b", "--method", "lora", "--gpu", "l4", "--format", "json"))
        assert answer["total_bytes"] == expected["total_bytes"]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("argv, message", [
    (["--port", "x"], "invalid int value"),
    (["--port", "70000"], "port must be 0 to 65535"),
    (["--host", "no.such.host.invalid"], "cannot listen on no.such.host.invalid"),
])
def test_vramcalc_web_bad_arguments_give_one_error_line(argv, message):
    done = subprocess.run([sys.executable, "-m", "vramcalc", "web", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and message in done.stderr and len(done.stderr.splitlines()) == 1


def test_vramcalc_web_on_a_busy_port_says_so():
    with running() as busy:
        port = str(busy.server_address[1])
        done = subprocess.run([sys.executable, "-m", "vramcalc", "web", "--port", port], capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and len(done.stderr.splitlines()) == 1
