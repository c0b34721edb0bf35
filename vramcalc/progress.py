"""Progress of long work (a deep trace, a calibration run), standard library only.

Three behaviours, chosen once per ``Progress``:
- **bar**: the stream is a terminal (``isatty()``): one line redrawn in place with ``\\r`` (at most every
  ``BAR_REFRESH_S``), holding the count, the percentage, the elapsed time and the ETA, cut to the terminal's width
  so that it never wraps; ``close()`` ends it with a newline (or erases it when ``leave=False``).
- **lines**: any other stream (a log file, a pipe, a notebook): a plain line each time the count crosses another
  ``LINE_STEP_FRACTION`` (10 %) of the total or ``LINE_INTERVAL_S`` (30 s) have passed since the last line, whichever
  comes first, and a last line at ``close()``. Work that ends within ``quiet_s`` prints nothing at all, so short
  jobs stay silent in scripts.
- **off**: ``enabled=False``, nothing is written.

``enabled=None`` (the default) picks bar or lines from the stream; ``enabled=True`` is the same but never quiet
(``quiet_s`` is ignored). Output never breaks the work: a stream that fails to write (a closed pipe) silences the
progress. Names shown are stripped of control characters, so a model folder's name cannot move the cursor.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import time

BAR_REFRESH_S = 0.1
LINE_STEP_FRACTION = 0.10
LINE_INTERVAL_S = 30.0
DEFAULT_QUIET_S = 5.0
BAR_WIDTH_CHARS = 20


def printable(text: str) -> str:
    """``text`` with every control or non-printable character (ESC, CR, LF, ...) replaced by ``?``."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def duration(seconds: float) -> str:
    """``m:ss`` below an hour, ``h:mm:ss`` above."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def terminal_columns(stream) -> int:
    """The width of the terminal ``stream`` writes to; else ``$COLUMNS`` or the standard output's, else 100."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        columns = 0
    return columns or shutil.get_terminal_size((100, 24)).columns


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class Progress:
    """Counts ``total`` units of work (``update``) and shows it on ``stream`` (default ``sys.stderr``)."""

    def __init__(self, total: int, desc: str, unit: str = "", *, enabled: bool | None = None, stream=None,
                 leave: bool = True, quiet_s: float = DEFAULT_QUIET_S, clock=time.monotonic):
        self.total = max(0, int(total))
        self.desc = printable(desc)
        self.unit = printable(unit)
        self.stream = sys.stderr if stream is None else stream
        self.leave = leave
        self.clock = clock
        self.count = 0
        self.note = ""
        self.started = clock()
        if enabled is False:
            self.mode = "off"
        else:
            self.mode = "bar" if is_terminal(self.stream) else "lines"
        self.quiet_s = 0.0 if enabled is True else max(0.0, quiet_s)
        self._last_draw = None  # when the bar was last drawn / the last line printed
        self._last_line_count = 0
        self._drawn_width = 0
        self._printed = False
        self._closed = False

    # -- counting ----------------------------------------------------------------------------------
    def update(self, n: int = 1, note: str | None = None) -> None:
        if self._closed:
            return
        self.count = min(self.total, self.count + n) if self.total else self.count + n
        if note is not None:
            self.note = printable(note)
        self._show(final=False)

    def set_note(self, note: str) -> None:
        self.note = printable(note)

    def close(self) -> None:
        if self._closed:
            return
        self._show(final=True)
        self._closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- rendering ---------------------------------------------------------------------------------
    def text(self, now: float | None = None) -> str:
        """``desc  12/40 layers  30%  elapsed 0:12  ETA 0:28  note`` (the bar adds ``[######......]``)."""
        now = self.clock() if now is None else now
        elapsed = now - self.started
        parts = [self.desc]
        if self.total:
            fraction = self.count / self.total
            if self.mode == "bar":
                filled = int(round(fraction * BAR_WIDTH_CHARS))
                parts.append("[" + "#" * filled + "." * (BAR_WIDTH_CHARS - filled) + "]")
            parts.append(f"{self.count}/{self.total}{' ' + self.unit if self.unit else ''}")
            parts.append(f"{100 * fraction:3.0f}%")
        else:
            parts.append(f"{self.count}{' ' + self.unit if self.unit else ''}")
        parts.append(f"elapsed {duration(elapsed)}")
        if self.total and 0 < self.count < self.total:
            parts.append(f"ETA {duration(elapsed * (self.total - self.count) / self.count)}")
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)

    def _show(self, *, final: bool) -> None:
        if self.mode == "off":
            return
        now = self.clock()
        try:
            if self.mode == "bar":
                self._draw_bar(now, final)
            else:
                self._print_line(now, final)
        except (OSError, ValueError):  # a closed or broken stream: the work goes on, silently
            self.mode = "off"

    def _draw_bar(self, now: float, final: bool) -> None:
        if not final and self._last_draw is not None and now - self._last_draw < BAR_REFRESH_S:
            return
        if final and not self.leave:
            if self._drawn_width:
                self.stream.write("\r" + " " * self._drawn_width + "\r")
                self.stream.flush()
            return
        width = max(20, terminal_columns(self.stream) - 1)
        line = self.text(now)[:width]
        pad = " " * max(0, self._drawn_width - len(line))  # wipe what a longer previous line left
        self.stream.write("\r" + line + pad + ("\n" if final else ""))
        self.stream.flush()
        self._drawn_width = len(line)
        self._last_draw = now

    def _print_line(self, now: float, final: bool) -> None:
        if now - self.started < self.quiet_s and not (final and self._printed):
            return
        if final:  # the closing line, unless the last line already showed this count
            if self._printed and self._last_line_count != self.count:
                self._write_line(now)
            return
        last = self.started if self._last_draw is None else self._last_draw
        step = max(1, int(self.total * LINE_STEP_FRACTION)) if self.total else None
        crossed = step is not None and self.count // step > self._last_line_count // step
        if crossed or now - last >= LINE_INTERVAL_S:
            self._write_line(now)

    def _write_line(self, now: float) -> None:
        self.stream.write(self.text(now) + "\n")
        self.stream.flush()
        self._printed = True
        self._last_draw = now
        self._last_line_count = self.count


def progress(total: int, desc: str, unit: str = "", *, enabled: bool | None = None, **kwargs) -> Progress:
    """A ``Progress`` on stderr: a bar on a terminal, periodic lines otherwise, nothing when ``enabled=False``."""
    return Progress(total, desc, unit, enabled=enabled, **kwargs)
