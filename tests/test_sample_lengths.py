"""Unpacked batches padded to their longest sample (``vramcalc/sample_lengths.py``): the peak at the longest step,
and ``max_memory_reserved``'s staircase, one loss ladder per step longer than every earlier one, checked against the
caching-allocator replay of a traced run of varying lengths and against a simulation of shuffled batches."""

import json
import random
import subprocess
import sys

import pytest

import vramcalc as vc
from vramcalc.errors import VramcalcError
from vramcalc.sample_lengths import (LengthProfile, expected_later_records, expected_record_tokens, read,
                                     realized_reserved_bytes, step_lengths, steps_per_epoch)

TORCHTUNE_LORA = dict(stack="torchtune", method="lora", batch_size=2, seq_len=512, lora_targets="qv",
                      loss="torchtune-2024", optimizer="adamw-foreach", precision="bf16-true", grad_ckpt=True)


def _alpaca_like(n=20000, seed=0):
    rng = random.Random(seed)
    return [max(8, int(rng.lognormvariate(5.1, 0.6))) for _ in range(n)]


def _simulated_record_tokens(profile, seq_len, batch, steps, runs, seed=1):
    """Mean over shuffled epochs of the later records' summed lengths (batches of ``batch`` samples without
    replacement, each padded to its longest, truncated at ``seq_len``)."""
    rng = random.Random(seed)
    samples = [t for t, n in zip(profile.tokens, profile.samples) for _ in range(n)]
    total = 0
    for _ in range(runs):
        rng.shuffle(samples)
        longest = None
        for i in range(steps):
            T = min(seq_len, max(samples[i * batch:(i + 1) * batch]))
            if longest is not None and T > longest:
                total += T
            longest = T if longest is None else max(longest, T)
    return total / runs


def test_the_expected_record_lengths_match_a_simulation_of_shuffled_batches():
    profile = LengthProfile.of(_alpaca_like(6000))
    for seq_len, batch, steps in ((512, 2, 300), (256, 4, 200), (2048, 1, 1000)):
        lengths = step_lengths(profile, seq_len, batch)
        closed = expected_record_tokens(lengths, steps)
        simulated = _simulated_record_tokens(profile, seq_len, batch, steps, runs=300)
        assert closed == pytest.approx(simulated, rel=0.08), (seq_len, batch, steps)


def test_a_step_is_its_longest_sample_truncated_at_seq_len():
    profile = LengthProfile.of([10, 20, 30, 40])
    lengths = step_lengths(profile, seq_len=35, batch_size=2)
    assert lengths.tokens == (10, 20, 30, 35)
    # P(max of two <= x) = (share <= x)^2: 1/16, 4/16, 9/16, 16/16
    assert lengths.probability == pytest.approx((1 / 16, 3 / 16, 5 / 16, 7 / 16))
    assert lengths.longest == 35 and lengths.share_at_longest() == pytest.approx(7 / 16)
    # every step at one length: no step after the first is a record
    assert expected_later_records(step_lengths(profile, 8, 2), 100) == 0


def test_the_realized_staircase_adds_one_ladder_per_record():
    # records at steps 2 (300) and 4 (500); ties and shorter steps add nothing
    assert realized_reserved_bytes(1000, 2.0, [200, 100, 300, 300, 500, 400]) == 1000 + 2 * 300 + 2 * 500


def test_one_epoch_never_reaches_seq_len_when_no_sample_does():
    lengths = [120, 200, 333, 90] * 50
    given = vc.estimate("llama-2-7b", sample_lengths=lengths, **TORCHTUNE_LORA)
    at_longest = vc.estimate("llama-2-7b", **{**TORCHTUNE_LORA, "seq_len": 333})
    assert given.terms_bytes == at_longest.terms_bytes and given.phase == at_longest.phase
    assert given.details["longest_step_tokens"] == 333
    assert given.inputs["seq_len"] == 512 and given.inputs["sample_lengths"]["longest_tokens"] == 333


def test_the_shorter_steps_ladders_raise_reserved_not_the_total():
    given = vc.estimate("llama-2-7b", sample_lengths=_alpaca_like(), **TORCHTUNE_LORA)
    fixed = vc.estimate("llama-2-7b", **TORCHTUNE_LORA)
    ladders = given.details["length_ladders_bytes"]
    # torchtune's 2024 loop: 4 fp32 [T, V] blocks at the loss's backward, 4·4·b·512·V = 0.52 GB per record at 512
    ladder_at_512 = 16 * 2 * 512 * 32000
    assert given.details["reserved_growth_per_longer_step_bytes"] == pytest.approx(ladder_at_512, rel=0.01)
    assert 0.5 * ladder_at_512 < ladders < given.details["expected_later_records"] * ladder_at_512
    assert given.reserved_bytes == fixed.reserved_bytes + ladders
    assert given.total_bytes == fixed.total_bytes


def test_every_step_at_seq_len_is_the_fixed_length_estimate():
    given = vc.estimate("llama-2-7b", sample_lengths=[600, 900] * 100, **TORCHTUNE_LORA)
    fixed = vc.estimate("llama-2-7b", **TORCHTUNE_LORA)
    assert given.reserved_bytes == fixed.reserved_bytes and given.details["length_ladders_bytes"] == 0


def test_more_data_parallel_ranks_mean_fewer_steps_each():
    profile = LengthProfile.of(range(1, 1001))
    assert steps_per_epoch(profile, 2, 1) == 500 and steps_per_epoch(profile, 2, 4) == 125


def test_length_files_read_as_a_histogram_a_json_list_or_one_count_per_line(tmp_path):
    histogram = tmp_path / "h.csv"
    histogram.write_text("tokens,samples\n12,3\n7,1\n")
    listed = tmp_path / "l.json"
    listed.write_text("[12, 7, 12, 12]")
    lines = tmp_path / "l.txt"
    lines.write_text("12\n7\n12\n12\n")
    assert read(histogram) == read(listed) == read(lines) == LengthProfile((7, 12), (1, 3))
    bad = tmp_path / "bad.txt"
    bad.write_text("twelve\n")
    with pytest.raises(VramcalcError, match="neither"):
        read(bad)
    with pytest.raises(VramcalcError, match="whole number"):
        LengthProfile.of([1.5])


def test_packed_batches_refuse_sample_lengths():
    with pytest.raises(VramcalcError, match="packing"):
        vc.estimate("llama-2-7b", sample_lengths=[100, 200], packing=True, attn="flash", method="lora")


def test_the_cli_reads_a_length_file_and_reports_the_ladders(tmp_path):
    path = tmp_path / "lengths.txt"
    path.write_text("\n".join(str(n) for n in _alpaca_like(4000)))
    command = [sys.executable, "-m", "vramcalc", "estimate", "llama-2-7b", "--stack", "torchtune", "--method",
               "lora", "--batch-size", "2", "--seq-len", "512", "--loss", "torchtune-2024", "--precision",
               "bf16-true", "--grad-ckpt", "--sample-lengths", str(path), "--format", "json"]
    out = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert out["details"]["length_ladders_bytes"] > 0 and out["inputs"]["sample_lengths"]["samples"] == 4000
    csv_out = subprocess.run(command[:-1] + ["csv"], capture_output=True, text=True, check=True).stdout
    header = csv_out.splitlines()[0].split(",")
    assert "sample_lengths_longest_tokens" in header and "length_ladders_bytes" in header
    missing = subprocess.run(command[:-4] + ["--sample-lengths", str(tmp_path / "none.txt")], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "cannot read" in missing.stderr


# -- against the trace: a run of varying lengths replayed through the caching allocator ----------------------------

def _write_config(folder, vocab, hidden=64, intermediate=128, layers=2):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 4,
              "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_a_traced_run_of_varying_lengths_climbs_one_ladder_per_record(tmp_path):
    pytest.importorskip("torch")
    import torch

    from vramcalc.catalogue import get_model
    from vramcalc.tracing.alloc_events import AllocationEvents
    from vramcalc.tracing.caching_allocator import replay
    from vramcalc.tracing.engine import run_trace
    from vramcalc.tracing.step import StepTracer
    from vramcalc.training_setup import resolve_setup

    # a vocabulary large enough that each fp32 [T, V] block is a large-pool request of its own (> 10 MiB)
    model = _write_config(tmp_path, 32000)
    options = dict(method="lora", batch_size=1, seq_len=256, grad_ckpt=True, precision="bf16")
    run = [96, 64, 160, 128, 160, 256, 200]  # records after the first: 160, 256
    spec = get_model(model)
    events = AllocationEvents(workspace_bytes=0)
    ends = []

    class VaryingLengths(StepTracer):
        def _run(self, steps, progress, position_ids):
            for step, T in enumerate(run):
                self.step(step, torch.zeros(1, T, dtype=torch.long))
                ends.append(len(events.events))

    run_trace(spec, resolve_setup(spec, **options), steps=len(run), warmup=0, events=events, progress=False,
              tracer_class=VaryingLengths)
    replayed = replay(list(events.events)).reserved_peak_bytes
    first_only = replay(list(events.events)[:ends[0]]).reserved_peak_bytes
    ladder_per_token = vc.estimate(model, **{**options, "seq_len": 256}).details[
        "reserved_growth_per_longer_step_bytes"] / 256
    staircase = realized_reserved_bytes(first_only, ladder_per_token, run)
    fixed_at_longest = replay(_fixed_length_events(spec, options, 256)).reserved_peak_bytes
    assert replayed > fixed_at_longest  # the shorter records' ladders stay cached
    assert replayed == pytest.approx(staircase, rel=0.03)


def _fixed_length_events(spec, options, seq_len):
    from vramcalc.tracing.alloc_events import AllocationEvents
    from vramcalc.tracing.engine import run_trace
    from vramcalc.training_setup import resolve_setup

    events = AllocationEvents(workspace_bytes=0)
    run_trace(spec, resolve_setup(spec, **{**options, "seq_len": seq_len}), steps=3, warmup=0, events=events,
              progress=False)
    return list(events.events)


def test_without_checkpointing_a_record_reserves_at_least_its_own_length(tmp_path):
    """No checkpointing, activations large against the loss's [T, V] blocks (1024 hidden, 4096 intermediate, 8
    layers, V = 8000): after a short first step the longer step's saved activations outgrow the cache, so the
    ladder form R(T_1) + K(T_r) falls far below the replayed run, and the max form max(R_{r-1} + K(T_r), R(T_r))
    holds it. R(T) here is the replay of two steps at T; the numbers compared are the allocator replay's (measured
    when the test was written: replay 1306 MiB, ladder form 612 MiB, max form 1264 MiB)."""
    pytest.importorskip("torch")
    import torch

    from vramcalc.catalogue import get_model
    from vramcalc.tracing.alloc_events import AllocationEvents
    from vramcalc.tracing.caching_allocator import replay
    from vramcalc.tracing.engine import run_trace
    from vramcalc.tracing.step import StepTracer
    from vramcalc.training_setup import resolve_setup

    model = _write_config(tmp_path, 8000, hidden=1024, intermediate=4096, layers=8)
    run = [256, 2048, 1024]  # one record after the first: 2048
    options = dict(method="lora", batch_size=1, seq_len=max(run), grad_ckpt="none", precision="bf16")
    spec = get_model(model)

    def replayed(lengths):
        events = AllocationEvents(workspace_bytes=0)

        class VaryingLengths(StepTracer):
            def _run(self, steps, progress, position_ids):
                for step, T in enumerate(lengths):
                    self.step(step, torch.zeros(1, T, dtype=torch.long))

        run_trace(spec, resolve_setup(spec, **options), steps=len(lengths), warmup=0, events=events, progress=False,
                  tracer_class=VaryingLengths)
        return replay(list(events.events)).reserved_peak_bytes

    at = {T: replayed([T, T]) for T in (256, 2048)}
    ladder_per_token = vc.estimate(model, **options).details["reserved_growth_per_longer_step_bytes"] / max(run)
    whole = replayed(run)
    ladder_form = realized_reserved_bytes(at[256], ladder_per_token, run)
    max_form = realized_reserved_bytes(at[256], ladder_per_token, run, at.__getitem__)
    assert ladder_form < 0.6 * whole  # the activations' growth is not in the ladders
    assert max_form == pytest.approx(whole, rel=0.04)
