"""Every file vramcalc writes goes through ``write_atomic``: a failure leaves the old file or none, never half of one.

The data go to a temporary file in the target's own folder (so the final ``os.replace`` is a rename on one file
system, atomic on POSIX and Windows), are flushed and ``fsync``-ed, then renamed over the target; the folder is
``fsync``-ed so the rename survives a crash. A target that exists but is not a regular file (``/dev/stdout``, a
FIFO) is written through, since it cannot be renamed over. Any ``OSError`` (missing folder, read-only folder, a path under a
file, a full disk, a folder where a file should be) removes the temporary file and becomes one ``VramcalcError``
line that names the path and the reason.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .errors import VramcalcError

TEMP_SUFFIX = ".tmp"


def write_atomic(path: str | os.PathLike, data: str | bytes, *, encoding: str = "utf-8") -> Path:
    """Write ``data`` to ``path`` atomically; returns the path. Text is written with ``encoding`` and no newline
    translation (CSV rows keep their ``\\r\\n``)."""
    target = Path(path)
    payload = data.encode(encoding) if isinstance(data, str) else bytes(data)
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:  # a path under a file, a name too long, a folder we may not search
        raise VramcalcError(f"cannot write {target}: {_reason(err)}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise VramcalcError(f"cannot write {target}: it is a folder; give a file name")
    if mode is not None and not stat.S_ISREG(mode):  # a device or pipe (/dev/stdout, a FIFO): no rename
        return _write_through(target, payload)
    folder = target.parent
    temp_name = None
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=folder)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, target)
        temp_name = None
        fsync_folder(folder)
    except OSError as err:
        raise VramcalcError(f"cannot write {target}: {_reason(err)}") from None
    finally:
        if temp_name is not None:
            try:
                os.unlink(temp_name)
            except OSError:
                pass
    return target


def _write_through(target: Path, payload: bytes) -> Path:
    try:
        with open(target, "wb") as handle:
            handle.write(payload)
            handle.flush()
    except OSError as err:
        raise VramcalcError(f"cannot write {target}: {_reason(err)}") from None
    return target


def make_folder(path: str | os.PathLike) -> Path:
    """Create a folder (and its parents) for output, or say in one line why it cannot be."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise VramcalcError(f"cannot use {folder} as a folder: it is a file") from None
    except OSError as err:
        raise VramcalcError(f"cannot create folder {folder}: {_reason(err)}") from None
    if not folder.is_dir():
        raise VramcalcError(f"cannot use {folder} as a folder: it is a file")
    return folder


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(err: OSError) -> str:
    """strerror without the path repeated: 'No such file or directory', 'No space left on device', ..."""
    return err.strerror or err.__class__.__name__
