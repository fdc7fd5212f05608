"""The scaling harness end to end on the tiny suite: real ftcluster.train processes over 1 and 2 Ray workers (CPU
workers stand in for GPUs here), ZeRO-2 and ZeRO-3, then the renderings."""

import json
import subprocess
import sys

import pytest

from benchmarks import scaling

pytestmark = pytest.mark.slow


def test_runs_are_parsed_and_a_wrong_one_names_the_form():
    plan = scaling.parse_runs(["qlora@zero3+offload:2,4", "lora@zero2:1", "qlora@zero3+actoffload:2"])
    assert [(v.name, n) for v, n in plan] == [("qlora@zero3+offload", 2), ("qlora@zero3+offload", 4),
                                              ("lora@zero2", 1), ("qlora@zero3+actoffload", 2)]
    assert "deepspeed.offload_param=cpu" in plan[0][0].overrides(2)
    assert "model.activation_offloading=true" in plan[3][0].overrides(2)
    assert "model.activation_offloading=false" in plan[2][0].overrides(1)
    with pytest.raises(SystemExit, match="METHOD@zeroSTAGE"):
        scaling.parse_runs(["lora:1,2"])


def test_scaling_report_gives_efficiency_and_zero3_against_zero2(tiny_model, tmp_path):
    out = tmp_path / "report"
    sets = [f"model.name_or_path={tiny_model}", "data.max_examples=96",
            "scaling.cpus_per_worker=1"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--suite", "tiny", "--runs", "lora@zero2:1,2",
                           "--runs", "lora@zero3:2", *[a for s in sets for a in ("--set", s)], "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["gpus"], r["status"]) for r in results["records"]] == [
        ("lora@zero2", 1, "ok"), ("lora@zero2", 2, "ok"), ("lora@zero3", 2, "ok")]
    assert all(r["metrics"]["world_size"] == r["gpus"] for r in results["records"])
    report = (out / "report.md").read_text()
    assert "python -m benchmarks.scaling --suite tiny" in report
    runs = [line.split("|")[1:-1] for line in report.split("## Runs", 1)[1].splitlines() if line.startswith("| lora")]
    assert runs[1][4].strip().endswith("(1)") and runs[1][4].strip() != "n/a"  # efficiency against one worker
    assert "## ZeRO-3 against ZeRO-2" in report and (out / "scaling.png").stat().st_size > 0

    rerender = tmp_path / "again"
    rerender.mkdir()
    (rerender / "results.json").write_bytes((out / "results.json").read_bytes())
    subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--from", str(rerender / "results.json")],
                   check=True, capture_output=True)
    assert (rerender / "report.md").read_text() == report
