"""``benchmarks/accuracy.md`` is written by several grid scripts: ``accuracy.py`` writes its head (the HF grid, up to
the first ``## `` heading) and every other grid script owns one ``## `` section, which it replaces in place. A rerun of
any script keeps the other scripts' parts as they are. ``write_rows`` writes a grid script's own CSV."""

from __future__ import annotations

import csv
from pathlib import Path

ACCURACY_MD = Path(__file__).resolve().parent / "accuracy.md"


def _split(text: str) -> tuple[str, list[str]]:
    """The head (before the first ``## `` line) and the sections (each from its ``## `` line to the next)."""
    parts = ("\n" + text).split("\n## ")
    return parts[0].lstrip("\n"), ["## " + part for part in parts[1:]]


def _join(head: str, sections: list[str]) -> str:
    return "\n\n".join([head.strip("\n")] + [section.strip("\n") for section in sections]) + "\n"


def replace_head(head: str, path: Path = ACCURACY_MD) -> None:
    """Write ``head`` in place of the file's head, keeping every section."""
    _, sections = _split(path.read_text() if path.exists() else "")
    path.write_text(_join(head, sections))


def replace_section(heading: str, body: str, path: Path = ACCURACY_MD) -> None:
    """Write ``heading`` + ``body`` in place of the section under ``heading`` (appended if the file has none)."""
    head, sections = _split(path.read_text() if path.exists() else "")
    section = f"{heading}\n\n{body.strip()}"
    titles = [s.splitlines()[0] for s in sections]
    if heading in titles:
        sections[titles.index(heading)] = section
    else:
        sections.append(section)
    path.write_text(_join(head, sections))


def write_rows(path: Path, rows: list[dict]) -> None:
    """A grid's rows as CSV, one column per key of the first row."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    """A grid's rows as an earlier run wrote them (text values), or none when it has not run."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def setup_words(options: dict) -> str:
    """A setup's options as the grids' ``setup`` column spells them: ``key=value`` words."""
    return " ".join(f"{k}={v}" for k, v in options.items())
