"""``trace(..., reserved=True)`` and ``vramcalc trace --reserved``: the caching-allocator replay's
``max_memory_reserved`` (``tracing/reserved.py::reserved_trace``) exposed in the trace's result, table, JSON and CSV.

Tiny llama (``tests/tiny_models.py``) at 256 tokens with the H200 profile's cuBLAS workspace
(``calibration/profiles/h200.json``): every request of that step is under 10 MiB, so every segment the allocator
``cudaMalloc``s is a 2 MiB small segment or a 20 MiB large one (``caching_allocator.segment_bytes``).
"""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from .cli_helpers import run_cli
from .conftest import needs_torch

MIB = 2**20
GPU = "h200"
SEQ_LEN = 256

pytestmark = [needs_torch, pytest.mark.trace]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    """Tiny llama as a config.json the CLI reads."""
    from vramcalc.tracing.build import hf_config

    from .tiny_models import TINY

    folder = tmp_path_factory.mktemp("tiny-llama")
    hf_config(TINY["llama"]).to_json_file(str(folder / "config.json"))
    return str(folder)


@pytest.fixture(scope="module")
def traced():
    """The same tiny trace without and with the replay."""
    import vramcalc as vc

    from .tiny_models import TINY

    spec = TINY["llama"]
    plain = vc.trace(spec, seq_len=SEQ_LEN, gpu=GPU, progress=False)
    replayed = vc.trace(spec, seq_len=SEQ_LEN, gpu=GPU, progress=False, reserved=True)
    return plain, replayed


def test_the_replayed_reserved_peak_is_at_least_the_allocated_peak_and_whole_2_mib_segments(traced):
    _, b = traced
    d = b.details
    assert d["reserved_peak_bytes"] >= d["reserved_allocated_peak_bytes"] >= b.peak_tensor_bytes
    # every segment is 2 MiB, 20 MiB or a multiple of 2 MiB (kSmallBuffer, kLargeBuffer, kRoundLarge)
    assert d["reserved_peak_bytes"] % (2 * MIB) == 0
    assert d["reserved_baseline_bytes"] % (2 * MIB) == 0
    assert d["reserved_baseline_bytes"] <= d["reserved_peak_bytes"]


def test_the_replayed_allocated_peak_is_the_traced_tensor_peak_plus_the_workspace_and_the_context_tensor(traced):
    # derived from the tracker, not from the allocator: the traced peak (2 steps, storages counted in 512-B blocks)
    # + the h200 profile's workspace rounded up to a 512-B block + torch.zeros(1)'s one 512-B block; every block of
    # this step is split exactly (no unsplit remainder counted as allocated)
    from vramcalc.profiles import profile_data

    _, b = traced
    workspace = int(profile_data(GPU)["coefficients"]["workspace_bytes"])
    assert b.details["reserved_workspace_bytes"] == workspace
    assert b.details["reserved_allocated_peak_bytes"] == b.peak_tensor_bytes + -(-workspace // 512) * 512 + 512


def test_the_tiny_steps_reserve_at_most_one_20_mib_segment_per_segment_over_what_it_allocates(traced):
    # no request reaches 10 MiB here (the 82 MiB workspace aside, a segment of its own rounded to 2 MiB), so each
    # other segment is at most 20 MiB: reserved <= workspace segment + segments x 20 MiB, and the cached part
    # (reserved - allocated) is below one 20 MiB segment per segment
    _, b = traced
    d = b.details
    workspace_segment = -(-d["reserved_workspace_bytes"] // (2 * MIB)) * 2 * MIB
    assert d["reserved_peak_bytes"] <= workspace_segment + (d["reserved_segments"] - 1) * 20 * MIB
    assert d["reserved_peak_bytes"] - d["reserved_allocated_peak_bytes"] < d["reserved_segments"] * 20 * MIB


def test_the_reserved_peak_is_what_replaying_the_recorded_events_directly_gives(traced):
    from vramcalc.tracing.alloc_events import AllocationEvents
    from vramcalc.tracing.caching_allocator import ALLOC, replay
    from vramcalc.tracing.engine import run_trace
    from vramcalc.tracing.reserved import CONTEXT_TENSOR_BYTES, REPLAY_STEPS, REPLAY_WARMUP
    from vramcalc.training_setup import resolve_setup

    from .tiny_models import TINY

    _, b = traced
    spec = TINY["llama"]
    events = AllocationEvents(workspace_bytes=b.details["reserved_workspace_bytes"])
    events.events.append((ALLOC, events.new_key(), CONTEXT_TENSOR_BYTES))
    run_trace(spec, resolve_setup(spec, seq_len=SEQ_LEN), steps=REPLAY_STEPS, warmup=REPLAY_WARMUP, events=events,
              progress=False)
    direct = replay(list(events.events))
    assert b.details["reserved_peak_bytes"] == direct.reserved_peak_bytes
    assert b.details["reserved_baseline_bytes"] == direct.reserved_at_reset_bytes
    assert (b.details["reserved_replay_warmup_steps"], b.details["reserved_replay_measured_steps"]) == (1, 2)


def test_the_replay_leaves_the_traced_terms_unchanged(traced):
    plain, replayed = traced
    assert replayed.terms() == plain.terms()
    assert replayed.phase == plain.phase
    assert not any(key.startswith("reserved") for key in plain.details)


# -- the CLI -------------------------------------------------------------------------------------------------------
def _words(table: str) -> list[str]:
    """The table's lines with runs of blanks (and the rule's length) normalised: the --reserved label widens the
    first column."""
    return [re.sub(r"\s+", " ", re.sub(r"^-+$", "-", line)).strip() for line in table.splitlines()]


@pytest.fixture(scope="module")
def cli_tables(tiny_config):
    from vramcalc.cli import main

    outputs = {}
    for key, extra in (("plain", []), ("reserved", ["--reserved"])):
        for fmt in ("table", "json", "csv"):
            buffer = io.StringIO()
            import contextlib

            with contextlib.redirect_stdout(buffer):
                code = main(["trace", tiny_config, "--seq-len", str(SEQ_LEN), "--gpu", GPU, "--format", fmt, *extra])
            assert code == 0
            outputs[key, fmt] = buffer.getvalue()
    return outputs


def test_cli_reserved_prints_the_replay_line_and_the_slack_model_beside_it(cli_tables):
    table = cli_tables["reserved", "table"]
    line = next(line for line in table.splitlines() if line.startswith("reserved (caching-allocator replay)"))
    assert line.endswith(" GiB")
    assert "1 warm-up + 2 measured steps" in table
    assert "peak_tensor + allocator_slack + workspace" in table


def test_cli_reserved_adds_the_fields_to_json_and_csv(cli_tables):
    details = json.loads(cli_tables["reserved", "json"])["details"]
    assert details["reserved_peak_bytes"] % (2 * MIB) == 0
    assert details["reserved_baseline_bytes"] <= details["reserved_peak_bytes"]
    row = next(csv.DictReader(io.StringIO(cli_tables["reserved", "csv"])))
    assert int(row["reserved_peak_bytes"]) == details["reserved_peak_bytes"]
    assert int(row["reserved_baseline_bytes"]) == details["reserved_baseline_bytes"]


def test_cli_without_reserved_prints_what_it_printed_before(cli_tables):
    plain, reserved = cli_tables["plain", "table"], cli_tables["reserved", "table"]
    assert "reserved" not in plain
    kept = [line for line in reserved.splitlines() if not line.startswith(("reserved (", "  replay:", "  slack model"))]
    assert _words(plain) == _words("\n".join(kept))
    document = json.loads(cli_tables["plain", "json"])
    assert not [key for key in document["details"] if key.startswith("reserved")]
    header = next(csv.reader(io.StringIO(cli_tables["plain", "csv"])))
    assert not [column for column in header if column.startswith("reserved")]


@pytest.mark.parametrize("options, word", [
    (["--num-gpus", "2", "--sharding", "zero3"], "--sharding zero3 on 2 GPUs"),
    (["--task", "dpo"], "--task dpo"),
    (["--stack", "torchtune"], "--stack torchtune"),
])
def test_cli_reserved_refuses_what_the_replay_does_not_cover_in_one_line(capsys, tiny_config, options, word):
    code, out, err = run_cli(capsys, "trace", tiny_config, "--reserved", *options)
    assert code == 2 and not out
    assert err.startswith("error: --reserved") and word in err and err.count("\n") == 1


def test_an_fsdp_rank_reserves_at_least_its_tensors_and_the_side_streams_pools():
    # the replay keeps FSDP2's all-gather and reduce-scatter streams' blocks apart (caching_allocator rule 3): each
    # pool's segments hold at least that stream's peak, so reserved >= the joint tensor peak + the pools beyond it
    import vramcalc as vc

    from .tiny_models import TINY

    spec = TINY["llama"]
    options = dict(seq_len=SEQ_LEN, num_gpus=2, sharding="fsdp", method="full")
    replayed = vc.trace(spec, progress=False, reserved=True, gpu=GPU, **options)
    pools = vc.estimate(spec, **options).details["stream_pools_bytes"]
    assert pools > 0
    assert replayed.details["reserved_peak_bytes"] >= replayed.peak_tensor_bytes + pools


def test_estimate_has_no_reserved_flag(capsys):
    code, _, err = run_cli(capsys, "estimate", "llama-3.1-8b", "--reserved")
    assert code == 2 and "--reserved" in err


def test_a_vision_language_replay_allocates_the_traced_peak_plus_the_default_workspace():
    # the VLM's own builder and step (tracing/vision.py) run under the recorder too; no --gpu: the default
    # runtime profile's two 32 MiB cuBLAS workspaces (terms/runtime.py), a multiple of 512 B
    from vramcalc.hf_config import spec_from_config
    from vramcalc.tracing.runner import trace

    from .tiny_vlms import TINY_VLM

    spec = spec_from_config(TINY_VLM["smolvlm"], name="tiny-smolvlm")
    b = trace(spec, progress=False, reserved=True, images=2, seq_len=128, method="lora")
    d = b.details
    assert d["reserved_workspace_bytes"] == 64 * MIB
    assert d["reserved_allocated_peak_bytes"] == b.peak_tensor_bytes + 64 * MIB + 512
    assert d["reserved_peak_bytes"] >= d["reserved_allocated_peak_bytes"] and d["reserved_peak_bytes"] % (2 * MIB) == 0
