"""The page's form, generated from the library: one field per ``TrainingSetup`` dataclass field.

Kinds come from the field's type (a ``str`` enum gives a choice list, ``bool`` a checkbox, ``int``/``float`` a
number box, anything else a text box), defaults from the dataclass, help text from the CLI's flag help and from the
comments beside each field and enum member in the source (``training_setup.py``, ``options.py``). An option added to
``TrainingSetup`` later (``stack``, ``task``, ...) appears on the page without any change here or in the page.

``parse_request`` turns a JSON body (or a query string) into the keyword arguments of ``vramcalc.estimate``, with a
``RequestError`` that names the offending field for everything a user can get wrong.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import io
import math
import os
import re
import sys
import tokenize
import typing

import vramcalc

MODEL_NAME_MAX_CHARS = 200
TEXT_MAX_CHARS = 500
CONFIG_NAME_MAX_CHARS = 100
DEFAULT_TOKENS = None  # no token budget, as `vramcalc plan` without --tokens: $ per million tokens, no hours or totals
PLAN_FIELDS = ("tokens", "epochs", "rank_by")
REQUEST_FIELDS = ("model", "gpu", "config", "config_name", "sample_lengths", "sample_lengths_name")


class RequestError(ValueError):
    """Bad input from the page or an API client: one line, and the form field it belongs to (or None)."""

    def __init__(self, message: str, field: str | None = None, status: int = 400):
        super().__init__(one_line(message))
        self.field = field
        self.status = status


def one_line(text: object, limit: int = 400) -> str:
    """A message fit for one line of an error box: whitespace collapsed, at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# -- schema ---------------------------------------------------------------------------------------------------------
def _member_comments(cls) -> dict[str, str]:
    """``NAME = value  # comment`` and ``name: type = value  # comment`` lines of a class: name -> comment."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments, first_name = {}, {}
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            row = token.start[0]
            if token.type == tokenize.NAME and row not in first_name:
                first_name[row] = token.string
            elif token.type == tokenize.COMMENT and row in first_name:
                comments[first_name[row]] = token.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        return {}
    return comments


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _cli_help() -> dict[str, str]:
    """field -> the help a terminal user reads for its flag (``vramcalc.option_help``, shared with the CLI)."""
    from vramcalc.option_help import SETUP_OPTION_HELP

    return dict(SETUP_OPTION_HELP)


def _method_scope() -> dict[str, list[str]]:
    """option -> the methods it applies to, for the options that belong to some methods only (the library rejects
    ``--lora-rank`` with ``--method full``); empty when the library does not say."""
    try:
        from vramcalc.training_setup import METHOD_SPECIFIC_OPTIONS, options_for
    except ImportError:
        return {}
    methods = [member for member in vramcalc.Method]
    return {option: [m.value for m in methods if option in options_for(m)] for option in METHOD_SPECIFIC_OPTIONS}


def _type_hints(cls) -> dict:
    """Field name -> type; a field whose annotation cannot be resolved gets None (its kind then comes from its
    default value)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - one unresolvable annotation must not hide the whole form
        namespace = vars(sys.modules[cls.__module__]) if cls.__module__ in sys.modules else {}
        hints = {}
        for item in dataclasses.fields(cls):
            kind = item.type
            if isinstance(kind, str):
                try:
                    kind = eval(kind, dict(namespace))  # noqa: S307 - the library's own annotation text
                except Exception:  # noqa: BLE001
                    kind = None
            hints[item.name] = kind
        return hints


def _kind(annotation, default=None) -> tuple[str, type | None, bool]:
    """(kind, enum class, optional) of a field's type (or, when the type is unknown, of its default value)."""
    if annotation is None:
        annotation = type(default) if default is not None else str
    optional = False
    args = typing.get_args(annotation)
    if args and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else str
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "choice", annotation, optional
    if annotation is bool:
        return "bool", None, optional
    if annotation is int:
        return "int", None, optional
    if annotation is float:
        return "float", None, optional
    return "text", None, optional


def _json_default(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    return value


@functools.cache
def setup_fields() -> tuple[dict, ...]:
    """The form: one field per ``vramcalc.TrainingSetup`` field."""
    return fields_of(vramcalc.TrainingSetup, _cli_help(), _method_scope())


def fields_of(setup_cls, cli_help: dict | None = None, scope: dict | None = None) -> tuple[dict, ...]:
    """One dict per dataclass field: name, label, kind, default, help, choices (with help), methods, optional."""
    hints = _type_hints(setup_cls)
    comments = _member_comments(setup_cls)
    cli_help, scope = cli_help or {}, scope or {}
    fields = []
    for item in dataclasses.fields(setup_cls):
        if item.default is not dataclasses.MISSING:
            raw_default = item.default
        elif item.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            raw_default = item.default_factory()  # type: ignore[misc]
        else:
            raw_default = None
        default = _json_default(raw_default)
        kind, enum_cls, optional = _kind(hints.get(item.name), raw_default)
        flag = "--" + item.name.replace("_", "-")
        helps = [cli_help.get(item.name, ""), comments.get(item.name, "")]
        entry = {
            "name": item.name,
            "label": item.name.replace("_", " "),
            "kind": kind,
            "default": default,
            "optional": optional,
            "methods": scope.get(item.name),
        }
        if enum_cls is not None:
            member_help = _member_comments(enum_cls)
            entry["choices"] = [
                {"value": member.value, "help": member_help.get(member.name, "")} for member in enum_cls
            ]
            helps.append(_first_paragraph(enum_cls.__doc__))
        helps.append(f"CLI {flag}/--no-{flag[2:]}" if kind == "bool" else f"CLI {flag}")
        entry["help"] = "; ".join(dict.fromkeys(text for text in helps if text))
        fields.append(entry)
    return tuple(fields)


@functools.cache
def field_index() -> dict[str, dict]:
    return {entry["name"]: entry for entry in setup_fields()}


@functools.cache
def catalogue_lists() -> tuple[list[dict], list[dict]]:
    """(models, gpus) for the page's pickers, in catalogue order."""
    models = [{"name": m.name, "family": m.family, "params": m.params, "active_params": m.active_params,
               "hf_repo": m.hf_repo} for m in vramcalc.models()]
    gpus = [{"name": g.name, "display_name": g.display_name, "memory_bytes": g.memory_bytes} for g in vramcalc.gpus()]
    return models, gpus


def default_gpu() -> str | None:
    _, gpus = catalogue_lists()
    names = [g["name"] for g in gpus]
    return "h100-sxm" if "h100-sxm" in names else (names[0] if names else None)


def options_document(allow_trace: bool, max_body_bytes: int) -> dict:
    """What ``/api/options`` returns: the generated form, the catalogues and the server's switches and body limit."""
    models, gpus = catalogue_lists()
    return {
        "fields": list(setup_fields()),
        "models": models,
        "gpus": gpus,
        "defaults": {"model": "llama-3.1-8b", "gpu": default_gpu(), "tokens": DEFAULT_TOKENS, "epochs": 1,
                     "rank_by": "cost"},
        "rank_by": ["cost", "time"],
        "allow_trace": allow_trace,
        "max_body_bytes": max_body_bytes,
        "version": vramcalc.__version__,
        "gib_note": "GiB = 2^30 bytes",
    }


# -- requests -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Request:
    """A validated request: the model (catalogue name, Hub id or uploaded config), the GPU and the setup options."""

    model: object  # a ModelSpec
    gpu: str | None
    options: dict  # TrainingSetup fields the user gave, as plain JSON values
    plan: dict  # tokens, epochs, rank_by (plan only)
    key: str  # a canonical text of the request, for caches
    sample_lengths: object = None  # a sample_lengths.LengthProfile (estimate only), or None


_PATH_LIKE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _model_from_name(name: object):
    """A catalogue name or a Hugging Face repo id; never a path on the server's disk."""
    if not isinstance(name, str) or not name.strip():
        raise RequestError("give a model: a catalogue name, a Hugging Face repo id, or upload a config.json", "model")
    name = name.strip()
    if len(name) > MODEL_NAME_MAX_CHARS:
        raise RequestError(f"model name is longer than {MODEL_NAME_MAX_CHARS} characters", "model")
    known = {spec.name.lower() for spec in vramcalc.models()} | {spec.hf_repo.lower() for spec in vramcalc.models()}
    if name.lower() not in known and (not _PATH_LIKE.match(name) or name.endswith(".json") or ".." in name
                                      or os.path.exists(name)):
        raise RequestError(f"model {name!r} is not a catalogue name or an ORG/NAME Hub id (the page does not read "
                           "files on the server: upload the config.json instead)", "model")
    try:
        return vramcalc.get_model(name)
    except vramcalc.VramcalcError as err:
        raise RequestError(str(err), "model") from None


def _model_from_config(config: object, name: object):
    """A ModelSpec from an uploaded config.json (a parsed dict), through the library's own config reader."""
    if not isinstance(config, dict):
        raise RequestError("config must be a JSON object (the contents of a config.json)", "config")
    if name is None:
        name = "uploaded-config"
    if not isinstance(name, str) or len(name) > CONFIG_NAME_MAX_CHARS:
        raise RequestError(f"config_name must be text of at most {CONFIG_NAME_MAX_CHARS} characters", "config")
    name = name.strip() or "uploaded-config"
    from vramcalc.hf_config import spec_from_config

    try:
        return spec_from_config(config, name=name)
    except vramcalc.VramcalcError as err:
        raise RequestError(f"config.json: {err}", "config") from None
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise RequestError(f"config.json is not a model config this tool can read ({type(err).__name__}: {err})",
                           "config") from None


def _number(value, name: str, kind: str):
    if isinstance(value, bool):
        raise RequestError(f"{name} must be a number, got {value!r}", name)
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if kind == "int" and re.fullmatch(r"[+-]?\d+", text) else float(text)
        except ValueError:
            raise RequestError(f"{name} must be a number, got {text!r}", name) from None
    if not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {type(value).__name__}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}", name)
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise RequestError(f"{name} must be a whole number, got {value!r}", name)
        value = int(value)
    return value


def _field_value(entry: dict, value):
    """A JSON value checked against the field's kind; the library checks ranges and names."""
    name, kind = entry["name"], entry["kind"]
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "on", "off", "yes", "no"):
            return value.strip().lower() in ("true", "1", "on", "yes")
        raise RequestError(f"{name} must be true or false, got {value!r}", name)
    if kind in ("int", "float"):
        return _number(value, name, kind)
    if kind == "choice":  # the library parses the word (and any alias it accepts) and names the choices
        if isinstance(value, bool):
            return value
        if not isinstance(value, str) or len(value) > TEXT_MAX_CHARS:
            raise RequestError(f"{name} must be one of: {', '.join(c['value'] for c in entry['choices'])}", name)
        return value.strip()
    if isinstance(value, list) and all(isinstance(part, str) for part in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise RequestError(f"{name} must be text, got {type(value).__name__}", name)
    if len(value) > TEXT_MAX_CHARS:
        raise RequestError(f"{name} is longer than {TEXT_MAX_CHARS} characters", name)
    return value.strip()


def _gpu(value) -> str | None:
    if value is None or value == "" or value == "none":
        return None
    if not isinstance(value, str) or len(value) > MODEL_NAME_MAX_CHARS:
        raise RequestError("gpu must be a catalogue GPU name", "gpu")
    try:
        return vramcalc.get_gpu(value).name
    except vramcalc.VramcalcError as err:
        raise RequestError(str(err), "gpu") from None


def _plan_values(body: dict) -> dict:
    out = {"tokens": None, "epochs": 1, "rank_by": "cost"}  # no tokens: cost per million tokens, no totals
    for name in ("tokens", "epochs"):
        if body.get(name) not in (None, ""):
            value = _number(body[name], name, "float")
            if value <= 0:
                raise RequestError(f"{name} must be a positive number, got {body[name]!r}", name)
            out[name] = value
    if body.get("rank_by") not in (None, ""):
        if body["rank_by"] not in ("cost", "time"):
            raise RequestError(f"unknown rank_by {body['rank_by']!r}; choose one of: cost, time", "rank_by")
        out["rank_by"] = body["rank_by"]
    return out


def _sample_lengths(value: object, name: object):
    """A dataset's sample lengths, as ``vramcalc estimate --sample-lengths`` reads them and through the same parser
    (``sample_lengths.parse``): the text of a length file (a ``tokens,samples`` CSV, a JSON list of per-sample token
    counts, or one count per line), or a JSON list of per-sample token counts."""
    from vramcalc.sample_lengths import LengthProfile, parse

    if name is not None and (not isinstance(name, str) or len(name) > CONFIG_NAME_MAX_CHARS):
        raise RequestError(f"sample_lengths_name must be text of at most {CONFIG_NAME_MAX_CHARS} characters",
                           "sample_lengths")
    try:
        if isinstance(value, str):
            return parse(value, repr(name.strip()) if name and name.strip() else "the uploaded length file")
        if isinstance(value, list):
            return LengthProfile.of(value)
    except vramcalc.VramcalcError as err:
        raise RequestError(str(err), "sample_lengths") from None
    raise RequestError("sample_lengths must be a length file's text ('tokens,samples' CSV, JSON list or one count per "
                       f"line) or a JSON list of token counts, got {type(value).__name__}", "sample_lengths")


def parse_request(body: object) -> Request:
    """Check a request's fields one by one (unknown ones are errors) and resolve the model and the GPU; the library
    judges the setup as a whole when it computes (``library_error`` names the field then)."""
    import json

    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object of form fields")
    index = field_index()
    for key in body:
        if not isinstance(key, str) or (key not in index and key not in REQUEST_FIELDS and key not in PLAN_FIELDS):
            raise RequestError(f"unknown field {str(key)[:60]!r}; fields are: {', '.join(REQUEST_FIELDS)}, "
                               f"{', '.join(index)}, {', '.join(PLAN_FIELDS)}", str(key)[:60])
    options = {}
    for name, entry in index.items():
        value = body.get(name)
        if value is None or value == "":
            continue
        options[name] = _field_value(entry, value)
    if body.get("config") is not None:
        model = _model_from_config(body["config"], body.get("config_name"))
    else:
        model = _model_from_name(body.get("model"))
    gpu = _gpu(body.get("gpu"))
    plan = _plan_values(body)
    lengths = None
    if body.get("sample_lengths") is not None:
        lengths = _sample_lengths(body["sample_lengths"], body.get("sample_lengths_name"))
    elif body.get("sample_lengths_name") is not None:
        raise RequestError("sample_lengths_name names an uploaded length file: send its text as sample_lengths",
                           "sample_lengths")
    histogram = None  # the parsed profile, not the text (two formats of one histogram are one answer), as a digest
    if lengths is not None:
        histogram = hashlib.sha256(repr((lengths.tokens, lengths.samples)).encode()).hexdigest()
    key = json.dumps({"model": model.name, "config": body.get("config"), "gpu": gpu, "options": options,
                      "plan": plan, "sample_lengths": histogram}, sort_keys=True, default=str)
    return Request(model, gpu, options, plan, key, lengths)


_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def library_error(request: Request, err: Exception) -> RequestError:
    """The library's one-line VramcalcError as a RequestError with its field: the one option that fails on its own
    (with the method, which decides what applies), else the flag the message names, else the method."""
    return RequestError(str(err), blame(request.model, request.options, str(err)))


def blame(model, options: dict, message: str) -> str | None:
    base = {"method": options["method"]} if "method" in options else {}
    for name, value in options.items():
        if name == "method":
            continue
        try:
            vramcalc.estimate(model, **base, **{name: value})
        except vramcalc.VramcalcError:
            return name
        except Exception:  # noqa: BLE001 - only looking for the culprit
            return name
    for flag in _FLAG.findall(message):
        name = flag.replace("-", "_")
        if name in options:
            return name
    for flag in _FLAG.findall(message):
        name = flag.replace("-", "_")
        if name in field_index():
            return name
    return "method" if "method" in options else None
