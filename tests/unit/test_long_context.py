"""The long-context benchmark's search for the longest row that trains (the runs themselves: tests/integration/
test_long_context.py and the GPU report)."""

import sys

import pytest

from benchmarks.long_context import search


@pytest.mark.parametrize("fits", [350_000, 200_000, 70_000, 1_500_000])
def test_doubling_then_bisecting_finds_the_longest_row_within_5_percent(fits):
    tried = []

    def trains(n):
        tried.append(n)
        return n <= fits

    good, bad = search(trains, start=65536, limit=1048576)
    if fits >= 1048576:
        assert (good, bad) == (1048576, None) and tried == [65536, 131072, 262144, 524288, 1048576]
        return
    assert good <= fits < bad and (bad - good) / good <= 0.05
    assert good % 1024 == 0 and len(tried) == len(set(tried)) <= 10
    assert tried[:2] == [65536, 131072]  # doubling first


def test_a_start_that_does_not_train_ends_the_search_at_once():
    assert search(lambda n: False, start=65536, limit=1048576) == (None, 65536)


def test_a_length_past_the_models_positions_is_tried_with_rope_scaled_as_the_plan_asks(tiny_model):
    from ftcluster import config as C
    from ftcluster import plan as P

    from benchmarks.long_context import rope

    assert rope(tiny_model, 4096) == []  # the tiny model's positions
    scaled = rope(tiny_model, 10000)
    assert scaled and "factor: 3.0" in scaled[0]
    cfg = C.load(None, [f"model.name_or_path={tiny_model}", "data.max_seq_len=10000", *scaled])
    P.check_length(cfg, P.architecture(cfg))  # not refused
    with pytest.raises(C.ConfigError, match=r"or scale RoPE to reach 10000: model.config_overrides="):
        P.check_length(C.load(None, [f"model.name_or_path={tiny_model}", "data.max_seq_len=10000"]),
                       P.architecture(C.load(None, [f"model.name_or_path={tiny_model}"])))


def test_a_try_killed_by_sigkill_counts_as_too_long_and_any_other_failure_does_not(tmp_path):
    from benchmarks.long_context import TOO_LONG, execute

    killed, ran = execute([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                          tmp_path / "killed.log")
    assert not ran and killed["status"] == "killed" and killed["status"] in TOO_LONG
    failed, ran = execute([sys.executable, "-c", "raise ValueError('lora.r: must be positive')"],
                          tmp_path / "failed.log")
    assert not ran and failed["status"] == "failed" and failed["status"] not in TOO_LONG
    assert failed["error"] == "ValueError: lora.r: must be positive"


def test_the_report_sets_the_device_estimate_beside_the_device_peak(tmp_path):
    from benchmarks.long_context import render

    results = {"provenance": {"date": "d", "command": "c", "git_commit": "abc", "gpus": [{"name": "G", "memory_gib": 79.2}]},
               "settings": {"model": "m", "recipe": "r", "common": [], "steps": 2},
               "tries": [{"method": "qlora", "length": 65536, "purpose": "timed", "status": "ok", "tokens_per_s": 4700.0,
                          "step_time_s": 13.9, "peak_allocated_gib": 45.5, "peak_device_used_gib": 48.0,
                          "estimate_gib": 48.3, "savers": "32 checkpointed layers"}]}
    render(results, tmp_path)
    lines = (tmp_path / "report.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| Method | Tokens | Why"))
    row = next(line for line in lines if line.startswith("| qlora | 65,536"))
    cells = dict(zip(header.strip("|").split(" | "), row.strip("|").split(" | ")))
    assert cells["Peak (GiB)"].strip() == "45.5" and cells["Device peak (GiB)"] == "48.0"
    assert cells["Device estimate (GiB)"] == "48.3"
