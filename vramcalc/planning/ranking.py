"""A plan's order and its short forms: ranking by cost or time, the one-line summary, the compact text table."""

from __future__ import annotations

from ..export import cell, table_text
from ..model import ModelSpec

RANK_BY = ("cost", "time")
PLAN_TABLE_COLUMNS = ("rank", "offer", "gpu", "provider", "num_gpus", "parallelism", "interconnect", "micro_batch",
                      "device_gib", "host_ram_gib", "throughput_tokens_per_s", "usd_per_million_tokens", "train_hours", "rent_usd",
                      "buy_usd", "energy_kwh", "cost_usd", "note")
# Without a token budget a plan has no hours or totals: it ranks by the cost per million training tokens, or by
# throughput (fastest first: the hours per million tokens, 1e6 / (tokens/s · 3600)).
PER_MILLION_COLUMNS = ("usd_per_million_tokens", "hours_per_million_tokens")


def _number(value):
    """A float for ordering, or None when missing (None, NaN, pandas NA)."""
    value = cell(value)
    return None if value == "" else float(value)


def _hours_per_million(row) -> float | None:
    rate = _number(row.get("throughput_tokens_per_s"))
    return None if not rate else 1e6 / (rate * 3600)


def rank_rows(rows: list[dict], rank_by: str = "cost", *, per_million: bool = False) -> list[dict]:
    """Rows that can run, cheapest (or fastest) first, ranked 1..k (``rank``); then rows without that figure; then
    rows that do not fit (``rank`` None). Ties go to the other figure; the sort is stable. ``per_million``: rank by
    the cost per million training tokens and the throughput (a plan without a token budget)."""
    key, metric, first = _order(rank_by, per_million)
    ranked = sorted(rows, key=key)
    for index, row in enumerate(ranked):
        row["rank"] = index + 1 if row.get("fits") is not False and metric(row, first) is not None else None
    return ranked


def _order(rank_by: str, per_million: bool):
    """(the sort key of ``rank_rows``, the metric function, the first figure's name)."""
    if per_million:
        def metric(row, name):
            return _hours_per_million(row) if name == "hours_per_million_tokens" else _number(row.get(name))
        first, second = PER_MILLION_COLUMNS if rank_by == "cost" else PER_MILLION_COLUMNS[::-1]
    else:
        def metric(row, name):
            return _number(row.get(name))
        first, second = ("cost_usd", "train_hours") if rank_by == "cost" else ("train_hours", "cost_usd")

    def key(row):
        runnable = row.get("fits") is not False  # hosted rows have no fits: they run
        a, b = metric(row, first), metric(row, second)
        has_metric = runnable and a is not None
        return ((not has_metric) + (not runnable), a is None, a or 0.0, b is None, b or 0.0)

    return key, metric, first


def best_setup(rows: list[dict], rank_by: str = "cost", *, per_million: bool = False) -> dict:
    """Of one GPU type's candidate rows (each a setup that fits), the one ``rank_rows`` would put first; on a tie,
    the one on fewest GPUs, then the first given (the least change to the user's setup)."""
    key = _order(rank_by, per_million)[0]
    return min(rows, key=lambda row: (key(row), row.get("num_gpus") or 0))


def _records(rows) -> list[dict]:
    """Plain rows from a list of dicts or a DataFrame (``plan()``'s)."""
    return rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)


def plan_summary(rows, spec: ModelSpec, gpu_limit: int, rank_by: str, *, per_million: bool = False) -> str:
    """One line: the best option, or plainly that nothing in the catalogue fits."""
    rows = _records(rows)
    gpu_rows = [row for row in rows if row.get("offer") == "gpu"]
    fitting = [row for row in gpu_rows if row.get("fits") is True or cell(row.get("fits")) is True]
    if not fitting:
        return (f"nothing in the catalogue fits {spec.name} with this setup, even on {gpu_limit:,} GPUs of any type "
                f"({len(gpu_rows)} tried)")
    best = next((row for row in rows if cell(row.get("rank")) == 1), None)
    if best is None:
        return f"{len(fitting)} of {len(gpu_rows)} GPU types fit {spec.name}; none has a price to rank by {rank_by}"
    if per_million:
        cost = _number(best.get("usd_per_million_tokens"))
        speed = _number(best.get("throughput_tokens_per_s"))
        parts = [f"${cost:,.2f} per million training tokens" if cost is not None else None,
                 f"{speed:,.0f} tokens/s" if speed is not None else None]
        metric = ", ".join(part for part in parts if part)
    else:
        metric = f"${best['cost_usd']:,.0f}" if rank_by == "cost" else f"{best['train_hours']:,.1f} h"
    if best["offer"] == "hosted":
        what = f"hosted by {best['provider']}"
    else:
        what = f"{int(best['num_gpus'])} x {best['gpu']}, micro-batch {int(best['micro_batch'])}"
    return f"{len(fitting)} of {len(gpu_rows)} GPU types fit {spec.name}; best by {rank_by}: {what} ({metric})"


def plan_table_columns() -> list[dict]:
    """The plan table's columns in order, each ``{"key": row key, "label": its header}``: what ``plan_table``
    prints, for a page to draw the same table (``vramcalc web``'s /api/plan). The header is the column's own name,
    which carries its unit (_gib, _usd, _per_s, _kwh) and names the figure in the JSON and the CSV too."""
    return [{"key": column, "label": column} for column in PLAN_TABLE_COLUMNS]


def plan_table(rows) -> str:
    """A compact plain-text view of a plan, from its rows or its DataFrame (GiB = 2^30 bytes; '-' where a figure
    does not apply or is unknown). Every column of ``PLAN_TABLE_COLUMNS`` is printed, empty or not."""
    rows = _records(rows)
    columns = list(PLAN_TABLE_COLUMNS)
    shown = [{c: _display(row.get(c), c) for c in columns} for row in rows]
    return table_text(shown, columns).rstrip("\n")


def _display(value, column: str) -> str:
    value = cell(value)
    if value == "":
        return "-"
    if isinstance(value, float):
        if column.endswith("_usd"):
            return f"{value:,.0f}"
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)
