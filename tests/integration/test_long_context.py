"""benchmarks.long_context end to end on CPU with the tiny model: real training runs at each length the search and
the timed lengths ask for, then the report."""

import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_search_trains_each_length_once_and_the_report_gives_every_try(tiny_model, tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.long_context", "--model", str(tiny_model), "--methods", "lora",
         "--start", "256", "--limit", "512", "--lengths", "384,512", "--steps", "2", "--out", str(out),
         "--work", str(work), "--set", "model.dtype=float32", "--set", "model.activation_offloading=false",
         "--set", "scaling.use_gpu=false", "--baseline", "hf"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tries = json.loads((out / "results.json").read_text())["tries"]
    # Doubling from 256 to the limit, then the timed length the search did not try (512 it did: not run again).
    assert [(t["length"], t["purpose"], t["status"]) for t in tries] == [
        (256, "search", "ok"), (512, "search", "ok"), (384, "timed", "ok")]
    for t in tries:
        assert f"data.max_seq_len={t['length']}" in t["command"] and t["tokens_per_s"] > 0
        # Every row is full: the documents are longer than the row, each cut to one.
        line = re.search(r"(\d+) examples -> (\d+) rows, ([\d,]+) tokens; (\d+) cut to data.max_seq_len=(\d+)",
                         (work / f"lora-{t['length']}.log").read_text())
        examples, rows, tokens, cut, length = (int(g.replace(",", "")) for g in line.groups())
        assert examples == rows == cut >= 1 and length == t["length"] and tokens == rows * length
        assert "checkpointed layers" in t["savers"] and "loss chunked" in t["savers"]
    # The peer at each timed length, on the same documents and length, right after ftcluster's try.
    peers = json.loads((out / "results.json").read_text())["peers"]
    assert [(p["recipe"], p["length"], p["status"]) for p in peers] == [("hf", 384, "ok"), ("hf", 512, "ok")]
    for p in peers:
        ours = next(t for t in tries if t["length"] == p["length"])
        data = re.search(r"data\.source=(\S+)", ours["command"]).group(1)
        assert f"data.source={data}" in p["command"] and f"data.max_seq_len={p['length']}" in p["command"]
        assert "--recipe hf" in p["command"] and p["tokens_per_s"] > 0
    report = (out / "report.md").read_text()
    assert "| lora | 512 tokens | not reached | 2 |" in report
    assert report.count("| lora | ") == 6  # the longest row, every try, and the two beside the peer
    ratio = tries[1]["tokens_per_s"] / peers[1]["tokens_per_s"]
    assert f"| lora | 512 | hf | ok | {peers[1]['tokens_per_s']:,.0f} | {tries[1]['tokens_per_s']:,.0f} | {ratio:.2f}× |" in report


def test_a_try_that_fails_for_another_reason_than_its_length_ends_the_methods_tries(tiny_model, tmp_path):
    # lora.r=0 is refused at every length: bisecting on, or timing the fixed lengths, would only repeat it.
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.long_context", "--model", str(tiny_model), "--methods", "lora",
         "--start", "256", "--limit", "1024", "--lengths", "384", "--steps", "2", "--out", str(out),
         "--work", str(tmp_path / "work"), "--set", "scaling.use_gpu=false", "--set", "lora.r=0"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "stopped early: lora" in proc.stderr
    tries = json.loads((out / "results.json").read_text())["tries"]
    assert [(t["length"], t["status"]) for t in tries] == [(256, "failed")] and "lora.r" in tries[0]["error"]
    assert "| lora | none | none: stopped by a try that failed for another reason (256) | 1 |" in (
        out / "report.md").read_text()
