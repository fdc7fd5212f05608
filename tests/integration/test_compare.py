"""The benchmark harness end to end on the tiny suite: real ftcluster.train processes (Ray, DeepSpeed, the
bitsandbytes CPU backend), real quality scoring and the real HF-recipe baseline, then the renderings."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def compare(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--suite", "tiny", *args],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def summary_table(report: str) -> dict[str, list[str]]:
    section = report.split("## Summary", 1)[1].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()[2:]]
    return {row[0]: row[1:] for row in rows}


def tiny_sets(model: Path) -> list[str]:
    # One worker and no cluster to join: each run trains in its own process, without Ray, as users' runs do.
    sets = [f"model.name_or_path={model}", "data.max_examples=96"]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def full_report(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    proc = compare("--methods", "full,lora,qlora", "--baseline", "hf,hf-tuned,unsloth", "--tune", "none", "--out", str(out),
                   "--work", str(tmp_path_factory.mktemp("work")), *tiny_sets(tiny_model))
    (out.parent / f"{out.name}-console.txt").write_text(proc.stdout)
    return out


def test_compare_writes_every_file_with_every_column_filled(full_report):
    for name in ("report.md", "results.json", "results.csv", "memory.png", "throughput.png", "loss.png",
                 "quality.png", "tradeoffs.png"):
        assert (full_report / name).stat().st_size > 0, name
    results = json.loads((full_report / "results.json").read_text())
    # Unsloth needs a CUDA GPU: here its runs fail, each recorded with what to do, and the rest still report.
    assert [(r["kind"], r["method"], r.get("recipe"), r["status"]) for r in results["records"]] == [
        ("base", "base", None, "ok"), ("train", "full", None, "ok"), ("hf", "full", "hf", "ok"),
        ("hf", "full", "unsloth", "failed"), ("train", "lora", None, "ok"), ("hf", "lora", "hf", "ok"),
        ("hf", "lora", "unsloth", "failed"), ("train", "qlora", None, "ok"), ("hf", "qlora", "hf", "ok"),
        ("hf", "qlora", "hf-tuned", "ok"), ("hf", "qlora", "unsloth", "failed")]
    hf, tuned = (r["metrics"] for r in results["records"][-3:-1])
    assert (hf["recipe"], tuned["recipe"]) == ("hf", "hf-tuned")
    unsloth = [r for r in results["records"] if r.get("recipe") == "unsloth"]
    assert all(r["error"].startswith("ImportError: --recipe unsloth: Unsloth ") for r in unsloth), unsloth[0]["error"]
    assert results["provenance"]["git_commit"] and results["provenance"]["versions"]["deepspeed"]

    report = (full_report / "report.md").read_text()
    table = summary_table(report)
    for method in ("Full fine-tuning", "LoRA (16-bit base)", "QLoRA (4-bit NF4 base)"):
        mfu = 3  # columns after the method: peak memory, wall time, tokens/s, MFU, ...
        assert table[method][mfu] == "n/a"  # no MFU on CPUs
        assert "n/a" not in table[method][:mfu] + table[method][mfu + 1:], (method, table[method])
    base = table["Base model (no fine-tuning)"]
    assert all(cell != "n/a" for cell in base[-3:]), base
    assert table["Full fine-tuning"][-1] == "100%"
    # Adapters train a small fraction of the parameters; full fine-tuning all of them.
    assert "(100.00%)" in table["Full fine-tuning"][4] and "(100.00%)" not in table["LoRA (16-bit base)"][4]
    baseline = report.split("## Against the plain Hugging Face recipe", 1)[1]
    peer_rows = [[c.strip() for c in line.strip("|").split("|")] for line in baseline.split("\n\n")[2].splitlines()[2:]]
    assert [r[:2] for r in peer_rows] == [["Full fine-tuning", "HF recipe"], ["Full fine-tuning", "Unsloth"],
                                          ["LoRA (16-bit base)", "HF recipe"], ["LoRA (16-bit base)", "Unsloth"],
                                          ["QLoRA (4-bit NF4 base)", "HF recipe"],
                                          ["QLoRA (4-bit NF4 base)", "HF tuned (no fp32 upcast)"],
                                          ["QLoRA (4-bit NF4 base)", "Unsloth"]]
    assert all(r[3].startswith("failed: ImportError: --recipe unsloth") for r in peer_rows if r[1] == "Unsloth")
    for r in (r for r in peer_rows if r[1] != "Unsloth"):  # speed by tokens/s and by step time, memory as NVML
        assert all(re.fullmatch(r"\d+\.\d\d×", r[i]) for i in (4, 5, 11)), r
    # Each method's first seed was scored along the way (every 2 of its 4 steps): when it reached 95% of full's score.
    for r in (r for r in results["records"] if r["kind"] == "train"):
        curve = r["quality_curve"]
        assert [p["step"] for p in curve] == [2, 4] and curve[-1]["task_score"] == r["quality"]["task_score"]
        assert 0 < curve[0]["time_s"] < curve[1]["time_s"] and 0 < curve[0]["tokens_seen"] < curve[1]["tokens_seen"]
    assert "## Time to quality\n\nn/a: full fine-tuning scored 0" in report  # random weights answer nothing
    csv = (full_report / "results.csv").read_text()
    assert "metrics.tokens_per_s_total" in csv and "quality.task_score" in csv
    # The base model's score is its own file, not overwritten by the LoRA run's.
    work = Path(results["settings"]["work_dir"])
    base_q, lora_q = (json.loads((work / f"quality-{t}.json").read_text()) for t in ("base", "lora-seed42"))
    assert results["records"][0]["metrics"] == base_q and base_q != lora_q
    # What it is doing while it scores, and runs trimmed to what the report needs.
    console = (full_report.parent / f"{full_report.name}-console.txt").read_text()
    assert re.search(r"\[1/11\] base base .*scoring: answer loss \d", console)
    assert re.search(r"\[2/11\] train full seed 42 quality .*scoring: \d+/\d+ answers match", console)
    assert "removed its checkpoints and final weights" in console
    full = next(r for r in results["records"] if r["kind"] == "train" and r["method"] == "full")
    assert full["metrics"]["final_model_bytes"] > 0 and not (Path(full["run_dir"]) / "final").exists()
    assert (Path(full["run_dir"]) / "summary.json").is_file()


def test_compare_from_results_rerenders_identically(full_report, tmp_path):
    (tmp_path / "results.json").write_bytes((full_report / "results.json").read_bytes())
    subprocess.run([sys.executable, "-m", "benchmarks.compare", "--from", str(tmp_path / "results.json")],
                   check=True, capture_output=True)
    for name in ("report.md", "results.csv", "results.json", "memory.png", "loss.png"):
        assert (tmp_path / name).read_bytes() == (full_report / name).read_bytes(), name


def test_failed_run_is_recorded_and_resume_keeps_what_was_measured(tiny_model, tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    compare("--methods", "lora,qlora", "--skip-base", "--tune", "none", "--out", str(out), "--work", str(work),
            *tiny_sets(tiny_model), "--set", "qlora:deepspeed.config_file=/nonexistent/ds.json")
    records = json.loads((out / "results.json").read_text())["records"]
    lora, qlora = records
    assert lora["status"] == "ok" and lora["metrics"]["tokens_per_s_total"] > 0
    assert qlora["status"] == "failed" and "deepspeed.config_file" in qlora["error"]
    report = (out / "report.md").read_text()
    assert "## Runs that did not finish" in report and "QLoRA (4-bit NF4 base) — **failed**" in report
    lora_row = summary_table(report)["LoRA (16-bit base)"]
    assert "n/a" not in lora_row[:3] + lora_row[4:-1]  # MFU is n/a on CPUs; no full run to compare quality with

    # The same command again, fixed and with --resume: the LoRA run is kept as measured, QLoRA runs now, from a
    # clean run directory (what an earlier attempt left there is not resumed, nor counted).
    stale = work / "runs" / "qlora-seed42"
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 99.0, "world_size": 1, "time": 1.0}) + "\n")
    compare("--methods", "lora,qlora", "--skip-base", "--tune", "none", "--out", str(out), "--work", str(work),
            "--resume", *tiny_sets(tiny_model))
    records = json.loads((out / "results.json").read_text())["records"]
    assert [(r["method"], r["status"]) for r in records] == [("lora", "ok"), ("qlora", "ok")]
    assert records[0] == lora and 99.0 not in [loss for _, loss in records[1]["metrics"]["losses"]]


def test_an_ablation_runs_each_method_again_with_one_setting_changed(tiny_model, tmp_path):
    out = tmp_path / "report"
    compare("--methods", "lora", "--skip-quality", "--ablate", "model.attn_implementation=eager", "--out", str(out),
            "--work", str(tmp_path / "work"), *tiny_sets(tiny_model))
    results = json.loads((out / "results.json").read_text())
    main, ablated = results["records"]
    assert (main["kind"], ablated["kind"], ablated["change"]) == ("train", "ablation", "model.attn_implementation=eager")
    assert "model.attn_implementation=eager" in ablated["command"] and ablated["status"] == "ok"
    assert ablated["run_dir"] != main["run_dir"] and "quality" not in main and "quality" not in ablated
    table = (out / "report.md").read_text().split("## Ablation", 1)[1].split("\n\n")[2]
    row = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert row[:2] == ["LoRA (16-bit base)", "`model.attn_implementation=eager`"]
    assert all(re.fullmatch(r"[\d,.]+( s|×)?", c) for c in row[2:8]), row  # tokens/s and step times, both runs
    assert row[8:] == ["n/a", "n/a"]  # torch's allocator peak is a CUDA figure


def test_each_method_runs_its_grid_on_validation_rows_then_its_seed_at_the_best_point_on_every_task(tiny_model,
                                                                                                     tmp_path):
    from ftcluster import config as C
    from ftcluster.data import reading

    out, work = tmp_path / "report", tmp_path / "work"
    tasks = ("builtin:required-args", "builtin:extract-json")
    # --jobs 2: the grid points run two at a time, the seed that is timed alone.
    proc = compare("--methods", "lora", "--skip-base", "--tune", "lr", "--tasks", ",".join(tasks), "--out", str(out),
                   "--work", str(work), "--jobs", "2", *tiny_sets(tiny_model),
                   "--set", "data.max_seq_len=320")  # the test tokenizer's extraction examples run to 260 tokens
    results = json.loads((out / "results.json").read_text())
    runs = sorted((r["task"], r["kind"], r["status"], bool(r.get("shared"))) for r in results["records"])
    assert runs == sorted((t, k, "ok", k == "tune") for t in tasks for k in ("tune", "tune", "train"))
    for task in tasks:
        tuned = [r for r in results["records"] if r["task"] == task and r["kind"] == "tune"]
        best = max(tuned, key=lambda r: (r["quality"]["task_score"], -r["quality"]["eval_loss"]))
        final = next(r for r in results["records"] if r["task"] == task and r["kind"] == "train")
        assert final["setting"] == best["change"] and best["change"] in final["command"]
        assert "data.validation_fraction" not in final["command"]
        # The grid's runs were scored on rows carved from the training data: never on a test row.
        cfg = C.load(Path("configs/bench/tiny.yaml"), [f"data.source={task}"])
        test = {(e["instruction"], e.get("input", "")) for e in reading.load_examples(cfg.data, 42).evaluation}
        for r in tuned:
            assert "data.validation_fraction=0.1" in r["command"]
            assert all((x["prompt"], x["input"]) not in test for x in r["quality"]["samples"])
    assert (out / "tuning.png").stat().st_size > 0
    report_text = (out / "report.md").read_text()
    assert "## Settings chosen on validation rows" in report_text and "`builtin:extract-json`" in report_text
    assert "(the best of its grid on validation rows)" in proc.stdout
    # Two grid points were in flight at once; the timed seeds started only once the grid was over.
    spans = [(r["kind"], *_span(r)) for r in results["records"]]
    tune_spans = [(a, b) for k, a, b in spans if k == "tune"]
    assert any(a2 < b1 and a1 < b2 for i, (a1, b1) in enumerate(tune_spans) for a2, b2 in tune_spans[i + 1:])
    assert all(a >= max(b for _, b in tune_spans) for k, a, _ in spans if k == "train")
    summary = summary_table(report_text)["LoRA (16-bit base)"]
    assert re.fullmatch(r"[\d,]+", summary[2]), summary  # tokens/s: the timed seed's


def _span(rec: dict) -> tuple[float, float]:
    """When a run's process started and ended, from its log's modification time and its wall time."""
    end = Path(rec["log"]).stat().st_mtime
    return end - rec["process_wall_s"], end


def test_time_limit_starts_nothing_after_it_and_resume_runs_the_rest(tiny_model, tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    args = ("--methods", "lora,qlora", "--skip-base", "--tune", "none", "--out", str(out), "--work", str(work),
            *tiny_sets(tiny_model))
    proc = compare(*args, "--time-limit", "1")
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["records"]] == ["lora"]
    assert "1 runs not started (the first: [2/2] train qlora seed 42); rerun the same command with --resume" \
        in proc.stdout
    # A note on the runs so far, added to results.json by hand, stays with them through --resume.
    results = json.loads((out / "results.json").read_text())
    results["provenance"]["notes"] = ["the first call ran on host A"]
    (out / "results.json").write_text(json.dumps(results))
    compare(*args, "--resume")
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["records"]] == ["lora", "qlora"]
    assert results["provenance"]["notes"] == ["the first call ran on host A"]
    assert "- **Note**: the first call ran on host A" in (out / "report.md").read_text()
