"""vramcalc.progress: a bar on a terminal, periodic plain lines elsewhere, silence when disabled; and a real trace
that reports its progress (issue 10 item 7: a 1000-layer trace ran 392 s without a word)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import subprocess
import struct
import sys
import termios
import tty
from pathlib import Path

import pytest

from vramcalc.progress import LINE_INTERVAL_S, Progress, printable

from .conftest import needs_torch

REPO = Path(__file__).resolve().parents[1]
COUNT = re.compile(r"(\d+)/(\d+)")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _counts(text: str) -> list[int]:
    return [int(match.group(1)) for match in COUNT.finditer(text)]


def _drain(master: int) -> str:
    """Everything the terminal has received so far (reads until nothing more arrives within 0.2 s)."""
    chunks = []
    while select.select([master], [], [], 0.2)[0]:
        chunks.append(os.read(master, 65536))
    return b"".join(chunks).decode()


def test_without_a_terminal_a_line_appears_every_tenth_with_rising_counts():
    stream, clock = io.StringIO(), Clock()
    with Progress(50, "work", "items", stream=stream, clock=clock, quiet_s=0) as bar:
        for _ in range(50):
            clock.now += 1.0
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 10  # 5, 10, ..., 50 of 50: one line per 10 %, no repeat at close
    counts = _counts(stream.getvalue())
    assert counts == sorted(counts) and counts[-1] == 50
    assert lines[0].startswith("work") and "10%" in lines[0] and "ETA" in lines[0]
    assert "100%" in lines[-1] and "elapsed 0:50" in lines[-1]


def test_without_a_terminal_slow_work_still_prints_every_30_seconds():
    stream, clock = io.StringIO(), Clock()
    bar = Progress(1000, "slow", stream=stream, clock=clock, quiet_s=0)
    for _ in range(5):  # 5 of 1000: no tenth is crossed, but 31 s pass each time
        clock.now += LINE_INTERVAL_S + 1
        bar.update(1)
    bar.close()
    assert _counts(stream.getvalue()) == [1, 2, 3, 4, 5]


def test_short_work_stays_silent_in_scripts():
    stream, clock = io.StringIO(), Clock()
    with Progress(10, "quick", stream=stream, clock=clock) as bar:  # default quiet period
        for _ in range(10):
            clock.now += 0.1
            bar.update(1)
    assert stream.getvalue() == ""


def test_disabled_progress_writes_nothing_even_on_a_terminal():
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as stream:
            with Progress(3, "off", stream=stream, enabled=False) as bar:
                bar.update(3)
            assert bar.mode == "off"
        os.set_blocking(master, False)
        with pytest.raises(BlockingIOError):
            os.read(master, 1024)
    finally:
        os.close(master)
        os.close(slave)


def test_on_a_terminal_one_line_is_redrawn_in_place_with_percent_and_eta():
    master, slave = pty.openpty()
    tty.setraw(slave)  # no line discipline between what the bar writes and what the test reads
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # wide enough for a whole line
    clock = Clock()
    output = ""
    try:
        with os.fdopen(slave, "w", closefd=False) as stream:
            assert stream.isatty()
            bar = Progress(4, "trace big-model", "layers", stream=stream, clock=clock)
            for _ in range(4):
                clock.now += 2.0
                bar.update(1)
                output += _drain(master)
            bar.close()
            output += _drain(master)
    finally:
        os.close(master)
        os.close(slave)
    frames = [frame for frame in output.replace("\r\n", "\n").split("\r") if frame.strip()]
    assert len(frames) == 5  # four updates and the closing draw, each over the last
    assert output.count("\n") == 1 and output.rstrip("\r\n").endswith("4/4 layers  100%  elapsed 0:08")
    assert "[#####...............]  1/4 layers   25%  elapsed 0:02  ETA 0:06" in frames[0]
    assert _counts(output) == [1, 2, 3, 4, 4]


def test_the_bar_never_outgrows_the_terminal():
    stream = _FakeTerminal()
    with Progress(2, "x" * 500, stream=stream, clock=Clock()) as bar:
        bar.update(1)
    assert all(len(frame) <= 200 for frame in stream.getvalue().split("\r"))


def test_the_bar_is_cut_to_the_width_of_its_own_terminal():
    master, slave = pty.openpty()
    tty.setraw(slave)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 50, 0, 0))  # a 50-column terminal
    try:
        with os.fdopen(slave, "w", closefd=False) as stream:
            with Progress(3, "trace big-model", "layers", stream=stream, clock=Clock()) as bar:
                bar.update(1)
            output = _drain(master)
    finally:
        os.close(master)
        os.close(slave)
    frames = [frame.rstrip("\n") for frame in output.replace("\r\n", "\n").split("\r") if frame.strip()]
    assert frames and all(len(frame) == 49 for frame in frames)  # one column spare: the line never wraps


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_names_cannot_move_the_cursor():
    assert printable("evil\x1b[2J\rname\n") == "evil?[2J?name?"
    stream = io.StringIO()
    with Progress(1, "\x1b[31mred", stream=stream, enabled=True) as bar:
        bar.update(1, note="done\x1b[0m")
    assert "\x1b" not in stream.getvalue()


def test_a_broken_stream_never_breaks_the_work():
    class Broken(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    bar = Progress(10, "work", stream=Broken(), enabled=True)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert bar.count == 10 and bar.mode == "off"


@needs_torch
def test_a_real_small_trace_reports_each_layer_pass(tmp_path):
    script = (
        "from tests.tiny_models import TINY\n"
        "from vramcalc.training_setup import resolve_setup\n"
        "from vramcalc.tracing.runner import run_trace\n"
        "spec = TINY['llama']\n"
        "run_trace(spec, resolve_setup(spec, seq_len=32), progress=True)\n"
        "print(spec.num_layers)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    layers = int(done.stdout.strip())
    lines = [line for line in done.stderr.splitlines() if line.startswith("trace tiny-llama")]
    totals = {int(match.group(2)) for line in lines for match in COUNT.finditer(line)}
    # build + 2 steps x (each layer forward + each layer backward) + 2 optimizer steps
    assert totals == {1 + 2 * 2 * layers + 2}
    counts = _counts("\n".join(lines))
    assert counts == sorted(counts) and counts[-1] == 1 + 2 * 2 * layers + 2
    assert len(lines) >= 2


def test_progress_needs_no_tqdm(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['tqdm'] = None\n")
    script = ("import sys, vramcalc.progress as p\n"
              "bar = p.Progress(2, 'x', enabled=True, stream=sys.stdout)\nbar.update(2)\nbar.close()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "2/2" in done.stdout, done.stderr
