"""MODEL as a Hugging Face repo id: the real ``huggingface_hub`` download path against a local server that answers as
the Hub does, never a patched function.

The server speaks what huggingface_hub 2.4 reads (``file_download.get_hf_file_metadata`` and
``_get_metadata_or_catch_error``; ``utils/_http.py hf_raise_for_status``): ``HEAD``/``GET
/{repo}/resolve/{revision}/{file}`` with ``ETag``, ``X-Repo-Commit`` and ``Content-Length``; errors as status codes
with ``X-Error-Code`` (``GatedRepo``, ``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``). Every run is a
subprocess with its own environment (``HF_ENDPOINT`` at the server, ``HF_HOME`` in a tmp folder), because
huggingface_hub reads ``HF_HUB_OFFLINE`` once, when it is imported.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

ROOT = Path(__file__).resolve().parents[1]
COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40
ALLOWED_TOKEN = "hf_allowed"
# HuggingFaceTB/SmolLM2-135M config.json (the architecture fields of the catalogue row smollm2-135m, source S1 of
# data/models_sources.md)
SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                "intermediate_size": 1536, "num_attention_heads": 9, "num_hidden_layers": 30,
                "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                "tie_word_embeddings": True, "rms_norm_eps": 1e-05, "rope_theta": 100000}
V1 = {**SMOLLM2_135M, "num_hidden_layers": 15}  # an older revision with half the layers

# repo -> {revision: (commit, {file: bytes})}
REPOS = {
    "org/smol": {"main": (COMMIT_MAIN, {"config.json": json.dumps(SMOLLM2_135M).encode()}),
                 "v1": (COMMIT_V1, {"config.json": json.dumps(V1).encode()})},
    "org/gated": {"main": (COMMIT_MAIN, {"config.json": json.dumps(SMOLLM2_135M).encode()})},
    "org/no-config": {"main": (COMMIT_MAIN, {"README.md": b"# weights elsewhere\n"})},
    "org/vlm": {"main": (COMMIT_MAIN, {"config.json": json.dumps(
        {"model_type": "llava", "text_config": SMOLLM2_135M, "vision_config": {"model_type": "siglip_vision_model"}}
    ).encode()})},
    "org/private": {"main": (COMMIT_MAIN, {"config.json": json.dumps(SMOLLM2_135M).encode()})},
}
GATED = {"org/gated"}
FORBIDDEN = {"org/private"}  # a token that may not read it: 403 without an error code


class HubHandler(http.server.BaseHTTPRequestHandler):
    requests: list  # (method, path, authorization) of every request, set per server

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _send(self, status: int, headers: dict, payload: bytes = b"", body: bool = True):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body and payload:
            self.wfile.write(payload)

    def _error(self, status: int, code: str | None, body: bool, extra: dict | None = None):
        headers = {"Content-Type": "application/json", **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, headers, json.dumps({"error": code or "forbidden"}).encode(), body)

    def _answer(self, body: bool):
        auth = self.headers.get("authorization")
        self.requests.append((self.command, self.path, auth))
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, None, body)
        repo, revision, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo not in REPOS:
            return self._error(404, "RepoNotFound", body)
        if repo in GATED and auth != f"Bearer {ALLOWED_TOKEN}":
            return self._error(401 if auth is None else 403, "GatedRepo", body)
        if repo in FORBIDDEN:
            return self._error(403, None, body)
        found = REPOS[repo].get(revision) or next(
            (entry for entry in REPOS[repo].values() if entry[0] == revision), None)
        if found is None:
            return self._error(404, "RevisionNotFound", body)
        commit, files = found
        if file not in files:
            return self._error(404, "EntryNotFound", body, {"X-Repo-Commit": commit})
        payload = files[file]
        etag = '"' + hashlib.sha1(b"blob %d\0" % len(payload) + payload).hexdigest() + '"'  # git blob sha, as the Hub
        headers = {"Content-Type": "application/json", "ETag": etag, "X-Repo-Commit": commit}
        self._send(200, headers, payload, body)


@pytest.fixture
def hub():
    """A local Hub on a free port: yields (endpoint, requests seen)."""
    requests: list = []
    handler = type("Handler", (HubHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def vramcalc(*argv, endpoint: str, home: Path, **env) -> subprocess.CompletedProcess:
    """``python -m vramcalc ARGV`` with the Hub at ``endpoint`` and the HF cache under ``home``; ``env`` adds
    variables (HF_TOKEN, HF_HUB_OFFLINE)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    clean.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "vramcalc", *argv], capture_output=True, text=True, cwd=ROOT,
                          env=clean, timeout=120)


def estimate_json(*argv, **kwargs) -> dict:
    done = vramcalc("estimate", *argv, "--format", "json", **kwargs)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_a_hub_repo_id_is_estimated_from_its_config_json_only(hub, tmp_path):
    endpoint, requests = hub
    from_hub = estimate_json("org/smol", endpoint=endpoint, home=tmp_path)
    from_catalogue = estimate_json("smollm2-135m", endpoint=endpoint, home=tmp_path)
    # the served config is SmolLM2-135M's: the same architecture gives the same bytes, term by term
    assert from_hub["terms"] == from_catalogue["terms"]
    assert from_hub["model"] == "org/smol"
    repo_requests = [(method, path) for method, path, _ in requests if path.startswith("/org/")]
    # config.json only, HEAD for its metadata and GET for its bytes (huggingface_hub's own /api/ calls aside)
    assert repo_requests == [("HEAD", "/org/smol/resolve/main/config.json"), ("GET", "/org/smol/resolve/main/config.json")]


def test_a_vision_language_repo_is_estimated_from_its_text_config(hub, tmp_path):
    endpoint, _ = hub
    vlm = estimate_json("org/vlm", endpoint=endpoint, home=tmp_path)
    smol = estimate_json("smollm2-135m", endpoint=endpoint, home=tmp_path)
    assert vlm["terms"] == smol["terms"]  # the language model only: its text_config is SmolLM2-135M's


def test_the_local_cache_answers_before_the_hub_and_offline(hub, tmp_path):
    endpoint, requests = hub
    first = estimate_json("org/smol", endpoint=endpoint, home=tmp_path)
    requests.clear()
    again = estimate_json("org/smol", endpoint=endpoint, home=tmp_path)
    offline = estimate_json("org/smol", endpoint="http://127.0.0.1:9", home=tmp_path, HF_HUB_OFFLINE="1")
    assert [path for _, path, _ in requests if path.startswith("/org/")] == []  # the cache held it
    assert first["terms"] == again["terms"] == offline["terms"]


def test_hf_hub_cache_is_honoured(hub, tmp_path):
    endpoint, _ = hub
    estimate_json("org/smol", endpoint=endpoint, home=tmp_path / "home", HF_HUB_CACHE=str(tmp_path / "elsewhere"))
    assert list((tmp_path / "elsewhere").glob("models--org--smol/snapshots/*/config.json"))
    assert not (tmp_path / "home" / "hub").exists()


def test_offline_and_not_cached_says_to_unset_hf_hub_offline(hub, tmp_path):
    endpoint, requests = hub
    line = one_error_line(vramcalc("estimate", "org/smol", endpoint=endpoint, home=tmp_path, HF_HUB_OFFLINE="1"))
    assert "'org/smol'" in line and "unset HF_HUB_OFFLINE" in line and "path to a config.json" in line
    assert requests == []  # offline: not even huggingface_hub's own calls


def test_revision_selects_the_config_of_that_revision(hub, tmp_path):
    endpoint, requests = hub
    main = estimate_json("org/smol", endpoint=endpoint, home=tmp_path)
    v1 = estimate_json("org/smol", "--revision", "v1", endpoint=endpoint, home=tmp_path)
    by_commit = estimate_json("org/smol", "--revision", COMMIT_V1, endpoint=endpoint, home=tmp_path)
    # V1 has 15 layers, main 30: the per-layer weight bytes halve (embeddings, tied, stay)
    assert v1["terms"]["weights"] < main["terms"]["weights"]
    assert v1["terms"] == by_commit["terms"]
    assert ("HEAD", "/org/smol/resolve/v1/config.json", None) in requests


def test_revision_in_python(hub, tmp_path):
    endpoint, _ = hub
    code = ("import vramcalc; a = vramcalc.estimate('org/smol', revision='v1'); "
            "b = vramcalc.estimate('org/smol'); print(a.terms()['weights'] < b.terms()['weights'], a.model)")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert done.stdout.split() == ["True", "org/smol@v1"], done.stderr


@pytest.mark.parametrize("repo, argv, env, words", [
    ("org/gated", (), {}, ("gated", "HF_TOKEN", "hf auth login")),  # 401 GatedRepo: no token
    ("org/gated", (), {"HF_TOKEN": "hf_other"}, ("gated", "HF_TOKEN")),  # 403 GatedRepo: a token not approved
    ("org/private", (), {"HF_TOKEN": "hf_other"}, ("refused access", "403", "HF_TOKEN")),
    ("org/missing", (), {}, ("no repo 'org/missing'", "HF_TOKEN", "check the id")),
    ("org/no-config", (), {}, ("has no config.json", "path to a config.json")),
    ("org/smol", ("--revision", "v9"), {}, ("no revision 'v9'", "--revision")),
], ids=["gated-401", "gated-403", "forbidden-403", "repo-not-found", "entry-not-found", "revision-not-found"])
def test_each_hub_failure_is_one_error_line_that_says_what_to_do(hub, tmp_path, repo, argv, env, words):
    endpoint, _ = hub
    line = one_error_line(vramcalc("estimate", repo, *argv, endpoint=endpoint, home=tmp_path, **env))
    for word in words:
        assert word in line, line


def test_a_gated_repo_opens_with_an_approved_token(hub, tmp_path):
    endpoint, requests = hub
    estimate_json("org/gated", endpoint=endpoint, home=tmp_path, HF_TOKEN=ALLOWED_TOKEN)
    assert requests[-1][2] == f"Bearer {ALLOWED_TOKEN}"


@pytest.mark.slow  # huggingface_hub retries a failed connection with backoff (1+2+4+8+8 s)
def test_an_unreachable_endpoint_is_one_error_line(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    line = one_error_line(vramcalc("estimate", "org/smol", endpoint=endpoint, home=tmp_path))
    assert "cannot fetch the config.json of 'org/smol'" in line and "check the network" in line


def test_without_huggingface_hub_the_error_names_the_extra(tmp_path):
    # huggingface_hub made unimportable (a None entry in sys.modules), as on an install without the extra
    code = ("import sys; sys.modules['huggingface_hub'] = None; from vramcalc.cli import main; "
            "sys.exit(main(['estimate', 'org/smol']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "HF_HOME": str(tmp_path)})
    line = one_error_line(done)
    assert "pip install 'vramcalc[hub]'" in line


def test_a_mistyped_catalogue_name_is_not_looked_up_online():
    from vramcalc import catalogue

    with pytest.raises(ValueError, match="unknown model 'llama-3.1-8bb'; closest: llama-3.1-8b"):
        catalogue.get_model("llama-3.1-8bb")


def test_revision_needs_a_repo_id():
    from vramcalc import catalogue

    with pytest.raises(ValueError, match="--revision needs a Hub repo id"):
        catalogue.get_model("smollm2-135m", revision="v1")
