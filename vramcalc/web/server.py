"""``vramcalc web``: the page and its JSON API on the standard library's ``ThreadingHTTPServer``.

Routes (GET takes the form fields as a query string, POST as a JSON object; both give the same answer):

    /                   the page (static/index.html, app.js, style.css: no build step, no CDN, works offline)
    /api/options        the form generated from TrainingSetup, the model and GPU catalogues, the server's switches
    /api/estimate       ``vramcalc estimate --format json``'s object: total_bytes, peak_tensor_bytes, phase, terms,
                        inputs, details; with ``sample_lengths`` (POST only: a length file's text, the formats
                        ``--sample-lengths`` reads, or a JSON list of per-sample token counts) that of
                        ``vramcalc estimate --sample-lengths FILE``: the longest step, length ladders, step reserved
    /api/fits           every catalogue GPU: the setup's total there and the largest micro-batch that fits
    /api/plan           ``vramcalc plan --format json``'s object: summary, catalogue stamp, rows; and ``columns``, the
                        columns of ``vramcalc plan``'s table in order (``{"key", "label"}``) that the page draws
    /api/plan.csv       the procurement CSV that ``vramcalc plan --output`` writes, byte for byte
    /api/trace          ``vramcalc trace --format json``; refused (403) unless the server was started with --allow-trace

Bad input answers 4xx with ``{"error": "<one line>", "field": "<form field or null>"}``, never a traceback. Bodies
over ``max_body_bytes`` get 413, clients over their rate 429; the server listens on localhost unless told otherwise
and then also refuses requests whose Host header is not a loopback name (DNS rebinding). Every response carries a
Content-Security-Policy without inline script or style, ``X-Content-Type-Options: nosniff`` and no-referrer.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import sys
import tempfile
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import vramcalc

from .schema import RequestError, library_error, one_line, options_document, parse_request

SAMPLE_LENGTHS_ROUTE = "/api/estimate"  # as the CLI: only ``vramcalc estimate`` takes --sample-lengths

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# a config.json is a few KiB; a dataset's per-sample lengths as a JSON list ~6 bytes a sample (4 MiB: ~700,000 samples;
# the 'tokens,samples' histogram `vramcalc lengths --output` writes is far smaller); the bound on the work per request
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_QUERY_CHARS = 8 * 1024
RATE_PER_S = 20.0  # API requests per second per client, sustained (the page sends three per change: estimate,
RATE_BURST = 120  # fits, plan; at most five changes a second after its 200 ms debounce), and in a burst
CACHE_ENTRIES = 256
SOCKET_TIMEOUT_S = 15  # a client that stops sending mid-request is dropped after this

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
STATIC_FILES = {  # URL path -> (file in static/, content type); nothing else is ever read from disk
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
API_ROUTES = ("/api/estimate", "/api/fits", "/api/plan", "/api/plan.csv", "/api/trace")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_CONTROL_CHARACTERS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}


def static_bytes(name: str) -> bytes:
    return resources.files("vramcalc.web").joinpath("static", name).read_bytes()


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RateLimiter:
    """A token bucket per client address: ``burst`` requests at once, refilled at ``rate_per_s``."""

    def __init__(self, rate_per_s: float = RATE_PER_S, burst: int = RATE_BURST):
        self.rate_per_s, self.burst = rate_per_s, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate_per_s)
            allowed = tokens >= 1.0
            self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > 10_000:  # forget idle clients rather than grow without bound
                self._buckets = {key: value for key, value in self._buckets.items() if now - value[1] < 60}
            return allowed


class _Cache:
    """A small LRU of computed answers: the same form state costs one computation."""

    def __init__(self, entries: int = CACHE_ENTRIES):
        self.entries = entries
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, compute):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = compute()
        with self._lock:
            self._data[key] = value
            while len(self._data) > self.entries:
                self._data.popitem(last=False)
        return value


# -- the answers ----------------------------------------------------------------------------------------------------
def _json_safe(value):
    """A plan cell as JSON: missing (None, NaN, pandas NA) as null, numpy scalars as Python numbers."""
    if value is None or isinstance(value, str):
        return value
    try:
        if value != value:  # NaN
            return None
    except TypeError:  # pandas NA refuses comparison
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return None
    return value


def estimate_document(request) -> dict:
    from ..export import breakdown_document  # the CLI's JSON: inputs limited to the method's options

    return breakdown_document(vramcalc.estimate(request.model, gpu=request.gpu, sample_lengths=request.sample_lengths,
                                                **request.options))


def fits_document(request) -> dict:
    """Each catalogue GPU: the setup's total there (at the chosen micro-batch), whether it fits, and the largest
    micro-batch that fits (``vramcalc.max_batch_size``; None where numpy is missing)."""
    search = {key: value for key, value in request.options.items() if key not in ("batch_size", "global_batch_size")}
    rows = []
    for gpu in vramcalc.gpus():
        breakdown = vramcalc.estimate(request.model, gpu=gpu, **request.options)
        row = {"gpu": gpu.name, "display_name": gpu.display_name, "memory_bytes": gpu.memory_bytes,
               "total_bytes": breakdown.total_bytes, "fits": breakdown.fits(), "max_batch_size": None}
        try:
            row["max_batch_size"] = vramcalc.max_batch_size(request.model, gpu, **search)
        except ImportError as err:
            row["note"] = one_line(err)
        rows.append(row)
    return {"model": request.model.name, "seq_len": breakdown.inputs.get("seq_len"), "rows": rows}


def _plan_frame(request):
    plan = request.plan
    return vramcalc.plan(request.model, tokens=plan["tokens"], epochs=plan["epochs"], rank_by=plan["rank_by"],
                         **request.options)


def plan_document(request) -> dict:
    """The CLI's plan JSON, plus ``columns``: the CLI table's columns and headers (``planning.plan_table_columns``),
    so that the page shows what ``vramcalc plan`` prints without a column list of its own."""
    from ..planning import plan_table_columns

    frame = _plan_frame(request)
    rows = [{column: _json_safe(value) for column, value in zip(frame.columns, row)}
            for row in frame.itertuples(index=False, name=None)]
    return {"summary": frame.attrs.get("summary"), "catalogue_version": frame.attrs.get("catalogue_version"),
            "catalogue_date": frame.attrs.get("catalogue_date"), "columns": plan_table_columns(), "rows": rows}


def plan_csv(request) -> str:
    """The CSV exactly as ``vramcalc plan --output FILE`` writes it (the library's own writer)."""
    frame = _plan_frame(request)
    with tempfile.TemporaryDirectory(prefix="vramcalc-web-") as folder:
        path = Path(folder) / "plan.csv"
        vramcalc.write_csv(frame, path)
        return path.read_bytes().decode("utf-8")  # keep the CSV's \r\n row ends (RFC 4180)


def trace_document(request) -> dict:
    from ..export import breakdown_document

    return breakdown_document(vramcalc.trace(request.model, gpu=request.gpu, **request.options))


ANSWERS = {"/api/estimate": estimate_document, "/api/fits": fits_document, "/api/plan": plan_document,
           "/api/plan.csv": plan_csv, "/api/trace": trace_document}


# -- HTTP -----------------------------------------------------------------------------------------------------------
class WebServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, *, allow_trace: bool = False, max_body_bytes: int = MAX_BODY_BYTES,
                 rate_per_s: float = RATE_PER_S, burst: int = RATE_BURST, quiet: bool = True, log=None):
        super().__init__(address, Handler)
        self.allow_trace = allow_trace
        self.max_body_bytes = max_body_bytes
        self.limiter = RateLimiter(rate_per_s, burst)
        self.cache = _Cache()
        self.trace_lock = threading.Lock()
        self.quiet = quiet
        self.log = log or sys.stderr
        self.check_host = is_loopback(str(address[0]))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: WebServer
    server_version = "vramcalc-web"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S

    # -- plumbing ---------------------------------------------------------------------------------------------
    def end_headers(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def send_error(self, code, message=None, explain=None) -> None:
        """Every error as one JSON line, including the ones http.server raises itself (bad request line, 501);
        with a status line even when the request line was too garbled to name an HTTP version."""
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self._send(code, {"error": one_line(message or HTTPStatus(code).phrase), "field": None})

    def log_message(self, format, *args) -> None:  # noqa: A002 - http.server's signature
        if not self.server.quiet:  # control characters escaped: a request line must not drive the terminal
            line = (format % args).translate(_CONTROL_CHARACTERS)
            self.server.log.write(f"{self.address_string()} {line}\n")

    def _send(self, status: int, payload, content_type: str = "application/json", headers: dict | None = None):
        if isinstance(payload, (dict, list)):
            body = (json.dumps(payload, allow_nan=False) + "\n").encode("utf-8")
            content_type = "application/json"
        elif isinstance(payload, str):
            body = payload.encode("utf-8")
        else:
            body = payload
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        if self.command != "HEAD" and status >= 200 and status not in (204, 304):
            self.wfile.write(body)

    def _error(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        self._send(status, {"error": one_line(message), "field": field}, headers=headers)

    # -- methods ------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def _refuse_method(self) -> None:
        self._error(405, f"method {self.command} is not allowed; use GET or POST", headers={"Allow": "GET, POST"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_TRACE = do_CONNECT = _refuse_method

    # -- routing --------------------------------------------------------------------------------------------------
    def _host_ok(self) -> bool:
        if not self.server.check_host:
            return True
        host = self.headers.get("Host")
        if host is None:
            return True
        host = host.strip()
        if host.startswith("["):
            name = host[1:].split("]", 1)[0]
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return is_loopback(name.lower())

    def _handle(self, method: str) -> None:
        try:
            raw = self._read_body() if method == "POST" else b""  # first: every answer finds the body read
            if raw is None:
                return None  # the reader has answered (411, 413)
            if not self._host_ok():
                return self._error(421, "this server answers requests to localhost only (unexpected Host header)")
            split = urlsplit(self.path)
            path = split.path
            if len(split.query) > MAX_QUERY_CHARS:
                return self._error(414, f"query string longer than {MAX_QUERY_CHARS} characters")
            if path in STATIC_FILES:
                if method != "GET":
                    return self._refuse_method()
                name, content_type = STATIC_FILES[path]
                return self._send(200, static_bytes(name), content_type)
            if path == "/favicon.ico":
                return self._send(204, b"", "text/plain")
            if path == "/api/options":
                if method != "GET":
                    return self._refuse_method()
                return self._send(200, options_document(self.server.allow_trace, self.server.max_body_bytes))
            if path not in API_ROUTES:
                return self._error(404, f"no such page: {path[:80]!r}")
            if not self.server.limiter.allow(self.client_address[0]):
                return self._error(429, "too many requests; slow down and retry in a second",
                                   headers={"Retry-After": "1"})
            if path == "/api/trace" and not self.server.allow_trace:
                return self._error(403, "tracing is off: start the server with `vramcalc web --allow-trace` "
                                        "(a trace takes seconds and a CPU core)")
            body = self._parse_json(raw) if method == "POST" else self._read_query(split.query)
            if body is None:
                return None  # the reader has answered
            if isinstance(body, dict) and body.get("sample_lengths") is not None and path != SAMPLE_LENGTHS_ROUTE:
                # refused before the upload is parsed
                return self._error(400, f"sample_lengths applies to {SAMPLE_LENGTHS_ROUTE} only (as `vramcalc "
                                        "estimate --sample-lengths`); leave it out of this request", "sample_lengths")
            self._answer(path, parse_request(body))
        except RequestError as err:
            self._error(err.status, str(err), err.field)
        except vramcalc.VramcalcError as err:
            self._error(400, str(err))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client left or stalled
            self.close_connection = True
        except Exception as err:  # a bug: a one-line answer for the client, the traceback for the operator
            if not self.server.quiet:
                traceback.print_exc(file=self.server.log)
            self._error(500, f"internal error ({type(err).__name__}); the server log has the details")

    def _answer(self, path: str, request) -> None:
        compute = ANSWERS[path]
        try:
            if path == "/api/trace":
                if not self.server.trace_lock.acquire(blocking=False):
                    return self._error(429, "a trace is already running; retry when it has finished",
                                       headers={"Retry-After": "5"})
                try:
                    result = compute(request)
                finally:
                    self.server.trace_lock.release()
            else:
                result = self.server.cache.get((path, request.key), lambda: compute(request))
        except vramcalc.VramcalcError as err:
            raise library_error(request, err) from None
        except ImportError as err:
            return self._error(501, f"this answer needs a package the server lacks: {err}")
        if path == "/api/plan.csv":
            stem = "".join(ch if ch.isalnum() or ch in "-._" else "-" for ch in request.model.name)[:80]
            return self._send(200, result, "text/csv; charset=utf-8",
                              {"Content-Disposition": f'attachment; filename="vramcalc-plan-{stem}.csv"'})
        return self._send(200, result)

    # -- bodies ---------------------------------------------------------------------------------------------------
    def _read_body(self) -> bytes | None:
        """A POST body within the size limit, or None after answering why not."""
        if self.headers.get("Transfer-Encoding"):
            self._error(411, "send the body with a Content-Length (chunked bodies are not accepted)")
            return None
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self._error(411, "a POST needs a Content-Length header")
            return None
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError
        except ValueError:
            self._error(400, f"bad Content-Length {length_text[:40]!r}")
            return None
        if length > self.server.max_body_bytes:
            self._discard(length)
            self._error(413, f"request body of {length} bytes is over the limit of {self.server.max_body_bytes} bytes")
            return None
        return self.rfile.read(length)

    def _parse_json(self, raw: bytes):
        """The JSON object a POST carries, or None after answering why not."""
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            self._error(415, "send the form as JSON (Content-Type: application/json)")
            return None
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            self._error(400, "the body is not UTF-8 text")
        except (ValueError, RecursionError) as err:
            self._error(400, f"the body is not valid JSON: {err}")
        return None

    def _discard(self, length: int, most: int = 4 * 1024 * 1024, wait_s: float = 0.5) -> None:
        """Read and drop what the client is sending (up to ``most`` bytes), so that it reads our 413 rather than
        a connection reset."""
        try:
            self.connection.settimeout(wait_s)
            left = min(length, most)
            while left > 0:
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _read_query(self, query: str):
        try:
            pairs = parse_qs(query, keep_blank_values=True, max_num_fields=100, errors="strict")
        except (ValueError, UnicodeDecodeError) as err:
            self._error(400, f"bad query string: {err}")
            return None
        body = {}
        for key, values in pairs.items():
            if len(values) > 1:
                self._error(400, f"field {key[:60]!r} is given {len(values)} times", key[:60])
                return None
            body[key] = values[0]
        if "config" in body:
            self._error(400, "an uploaded config.json travels in a POST body, not in the URL", "config")
            return None
        if "sample_lengths" in body:
            self._error(400, "an uploaded length file travels in a POST body, not in the URL", "sample_lengths")
            return None
        return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


# -- entry points ---------------------------------------------------------------------------------------------------
def make_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **options) -> WebServer:
    """A bound, not yet serving, server (port 0 picks a free port: read ``server.url``)."""
    try:
        return WebServer((host, port), **options)
    except OSError as err:
        raise vramcalc.VramcalcError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, open_browser: bool = False,
          allow_trace: bool = False, out=None, err=None) -> None:
    """Serve until Ctrl-C: the ``vramcalc web`` command."""
    out, err = out or sys.stdout, err or sys.stderr
    server = make_server(host, port, allow_trace=allow_trace, quiet=False, log=err)
    if not is_loopback(host):
        err.write(f"warning: listening on {host}: anyone who can reach this machine can use the page\n")
    out.write(f"vramcalc web: serving {server.url} (Ctrl-C to stop)\n")
    out.flush()
    if open_browser:
        import webbrowser

        threading.Thread(target=webbrowser.open, args=(server.url,), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how one stops it: not an error
        out.write("vramcalc web: stopped\n")
    finally:
        server.server_close()
