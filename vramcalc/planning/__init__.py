"""From one memory estimate to a hardware decision, and to many at once. One module per job:

    search.py       the fewest GPUs a setup fits on (bisection) and the largest micro-batch (galloping + bisection)
    host_memory.py  host RAM per node: loading, offload, paged optimizer states
    plan_rows.py    ``plan_rows()``: one row per catalogue GPU and per hosted service, with time and cost, as plain
                    dicts (standard library); ``plan()``: the same as a pandas DataFrame
    ranking.py      ranking by cost or time, the one-line summary, the compact text table
    sweep_grid.py   ``sweep()``: a grid of setups at once, with numpy
    stamp.py        which catalogue (version + data hash, newest price date) a plan was made from

The CLI verbs over them (``plan``, ``max-batch``) live in ``vramcalc/cli.py``; CSV and JSON cells in
``vramcalc/export.py``. Only ``plan()`` and ``sweep()`` need pandas (and numpy), imported inside them: importing this
package stays light, and the CLI's ``plan``, ``max-batch`` and ``report`` run on a plain install.
"""

from __future__ import annotations

from ..export import frame_csv, frame_records, write_csv
from .host_memory import HostRam, host_ram
from .plan_rows import PLAN_COLUMNS, PlanRows, gpus_of, plan, plan_frame, plan_rows, require_pandas
from .ranking import RANK_BY, plan_summary, plan_table, plan_table_columns, rank_rows
from .search import (
    DEFAULT_MAX_GPUS,
    MAX_GPUS_LIMIT,
    MAX_MICRO_BATCH,
    GpuCounts,
    gpu_counts,
    gpu_limit,
    max_batch_size,
    smallest_gpu_count,
)
from .stamp import CatalogueStamp, catalogue_stamp
from .sweep_grid import SWEEP_KEYS, applicable_options, sweep

__all__ = ["plan", "max_batch_size", "sweep", "smallest_gpu_count", "gpu_counts", "host_ram", "HostRam",
           "catalogue_stamp", "CatalogueStamp", "write_csv", "frame_csv", "frame_records", "PLAN_COLUMNS",
           "plan_table", "plan_table_columns", "plan_summary", "rank_rows", "plan_rows", "PlanRows", "plan_frame",
           "gpus_of", "require_pandas", "gpu_limit", "GpuCounts", "MAX_GPUS_LIMIT", "applicable_options", "RANK_BY",
           "DEFAULT_MAX_GPUS", "MAX_MICRO_BATCH", "SWEEP_KEYS"]
