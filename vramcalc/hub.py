"""A model named by its Hugging Face repo id (``ORG/NAME``): its ``config.json`` from the local HF cache, else the Hub.

Only ``config.json`` is fetched, through ``huggingface_hub`` (the optional extra ``pip install 'vramcalc[hub]'``),
imported here and only when a repo id is resolved, so ``import vramcalc`` stays light. Resolution order (the first
two steps are ``catalogue.get_model``'s): a catalogue name or alias, a catalogue repo id, a local path, then this
module: the local HF cache (``huggingface_hub.try_to_load_from_cache``), then the Hub (``hf_hub_download``).

The environment is read when a model is resolved, not when ``huggingface_hub`` was imported, and handed to it
explicitly: ``HF_ENDPOINT`` (a mirror or a private Hub), ``HF_TOKEN`` (gated and private repos; else the token
``hf auth login`` stored), ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` (the cache only), and ``HF_HUB_CACHE`` /
``HF_HOME`` (the cache folder, as huggingface_hub's ``constants.py`` derives it). Every failure (offline and not
cached, gated, missing repo, revision or config.json, network) is one ``VramcalcError`` line that says what to do.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from pathlib import Path

from .errors import VramcalcError

HUB_EXTRA = "pip install 'vramcalc[hub]'"
DEFAULT_ENDPOINT = "https://huggingface.co"  # huggingface_hub constants._HF_DEFAULT_ENDPOINT
# huggingface_hub utils/_validators.py REPO_ID_REGEX: "name" or "namespace/name", letters, digits, "-", "_", ".";
# vramcalc asks for the namespace, so that a mistyped catalogue name is reported as unknown, not looked up online
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub constants._is_true


def is_repo_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub repo id ``ORG/NAME`` (no "--" or ".." runs, no ".git" ending: refused by
    huggingface_hub's validator)."""
    return bool(_REPO_ID.match(text)) and "--" not in text and ".." not in text and not text.endswith(".git")


def _offline() -> bool:
    return any((os.environ.get(key) or "").upper() in _TRUE for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """The HF hub cache: ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub`` (``HF_HOME``
    defaulting to ``$XDG_CACHE_HOME/huggingface`` or ``~/.cache/huggingface``), as huggingface_hub constants.py."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def _token() -> str | bool | None:
    """``HF_TOKEN`` when set; else None, which lets huggingface_hub use the token ``hf auth login`` stored."""
    return os.environ.get("HF_TOKEN") or None


def config_path(repo_id: str, revision: str | None = None) -> Path:
    """The local path of ``repo_id``'s ``config.json`` at ``revision`` (default ``main``): from the cache if it holds
    it, else downloaded from the Hub into the cache. Raises a one-line VramcalcError that says what to do."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise VramcalcError(f"{repo_id!r} is not in the catalogue; to read its config.json from the Hugging Face Hub, "
                            f"{HUB_EXTRA} (or pass a path to a config.json)") from None
    at = f" at revision {revision!r}" if revision else ""
    cache = cache_dir()
    try:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json", cache_dir=cache, revision=revision)
    except (errors.HFValidationError, ValueError) as err:
        raise VramcalcError(f"{repo_id!r} is not a valid Hugging Face repo id: {_first_line(err)}") from None
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:  # huggingface_hub's _CACHED_NO_EXIST: the Hub said there is no config.json here
        raise _no_config(repo_id, at)
    offline = _offline()
    try:
        with _quiet():
            return Path(huggingface_hub.hf_hub_download(
                repo_id, "config.json", revision=revision, cache_dir=cache, endpoint=_endpoint(), token=_token(),
                local_files_only=offline,
                tqdm_class=functools.partial(huggingface_hub.utils.tqdm, disable=True)))  # a 1 kB file: no bar
    except errors.GatedRepoError:
        raise VramcalcError(f"{repo_id!r} is a gated repo: accept its terms at {_endpoint()}/{repo_id}, then log in "
                            "(hf auth login) or set HF_TOKEN to a token of that account") from None
    except errors.RepositoryNotFoundError:
        raise VramcalcError(f"no repo {repo_id!r} on {_endpoint()} (or it is private: log in with hf auth login or "
                            "set HF_TOKEN); check the id, or pass a path to a config.json") from None
    except errors.RevisionNotFoundError:
        raise VramcalcError(f"{repo_id!r} has no revision {revision!r}: give a branch, tag or commit hash that "
                            "exists (--revision)") from None
    except errors.RemoteEntryNotFoundError:
        raise _no_config(repo_id, at) from None
    except errors.LocalEntryNotFoundError as err:
        if offline:
            raise VramcalcError(f"{repo_id!r}{at} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE "
                                "is set: unset HF_HUB_OFFLINE to download its config.json, or pass a path to a "
                                "config.json") from None
        if isinstance(err.__cause__, errors.HfHubHTTPError):  # the Hub answered, with an error and no error code
            raise _http_error(repo_id, err.__cause__) from None
        cause = _first_line(err.__cause__) if err.__cause__ is not None else ""
        raise VramcalcError(f"cannot fetch the config.json of {repo_id!r} from {_endpoint()}{_because(cause)}, and "
                            f"the local cache ({cache}) does not hold it: check the network (or HF_ENDPOINT, a "
                            "proxy), or pass a path to a config.json") from None
    except errors.HfHubHTTPError as err:
        raise _http_error(repo_id, err) from None
    except (errors.OfflineModeIsEnabled, OSError) as err:  # connection refused, DNS, timeouts, a full disk
        raise VramcalcError(f"cannot fetch the config.json of {repo_id!r} from {_endpoint()}"
                            f"{_because(_first_line(err))}: check the network (or HF_ENDPOINT, a proxy), or pass a "
                            "path to a config.json") from None


def load_hub_config(repo_id: str, revision: str | None = None):
    """A ModelSpec from ``repo_id``'s ``config.json`` (``config_path``), named by the repo id."""
    from .hf_config import load_config

    path = config_path(repo_id, revision)
    spec_name = repo_id if not revision else f"{repo_id}@{revision}"
    return load_config(path, name=spec_name, hf_repo=repo_id)


@contextlib.contextmanager
def _quiet():
    """huggingface_hub's own warnings ("Retrying in 1s", "... thrown while requesting HEAD") held back while it
    works: the CLI prints one ``error:`` line instead, and nothing on success."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _http_error(repo_id: str, err) -> VramcalcError:
    """A Hub answer with an error status and no error code: 401/403 (a token without access), else 5xx and the
    like (``huggingface_hub`` has already retried those)."""
    status = err.response.status_code if getattr(err, "response", None) is not None else None
    if status in (401, 403):
        return VramcalcError(f"{_endpoint()} refused access to {repo_id!r} ({status}): log in with an account that "
                             "may read it (hf auth login) or set HF_TOKEN to its token")
    return VramcalcError(f"{_endpoint()} answered {status} for the config.json of {repo_id!r}: try again later, or "
                         "pass a path to a config.json")


def _no_config(repo_id: str, at: str) -> VramcalcError:
    return VramcalcError(f"{repo_id!r}{at} has no config.json (not a transformers model repo?): pass the repo of the "
                         "base model, or a path to a config.json")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


def _because(cause: str) -> str:
    return f" ({cause})" if cause else ""
