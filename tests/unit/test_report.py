"""Report renderings are pure functions of records: quality relative to full fine-tuning, and the summary rows."""

from benchmarks import report


def _train(method, seed, task_score, ppl, tok_s=100.0):
    return {"kind": "train", "method": method, "seed": seed, "status": "ok", "process_wall_s": 10.0,
            "metrics": {"tokens_per_s_total": tok_s, "world_size": 1, "peak_rss_gib": 1.0, "trainable_params": 10,
                        "total_params": 100, "losses": [[1, 2.0], [2, 1.5]]},
            "quality": {"eval_loss": 0.1, "eval_perplexity": ppl, "task_score": task_score}}


def _results(records):
    return {"suite": {"name": "t", "description": "d", "recipe": "r", "quality": True},
            "provenance": {"date": "x", "versions": {}}, "records": records}


def test_quality_is_task_score_relative_to_full_with_mean_over_seeds():
    rows = report.summary_rows(_results([_train("full", 1, 0.8, 2.0), _train("full", 2, 0.6, 2.0),
                                         _train("lora", 1, 0.35, 3.0)]))
    full, lora = rows
    assert full["task_score_pct"] == 70.0 and round(full["task_score_pct_std"], 3) == round(100 * 0.1414214, 3)
    assert lora["quality_pct_of_full"] == 50.0 and lora["quality_basis"] == "task score"


def _scored(method, seed, score, examples=200, task=None, loss=0.5):
    rec = _train(method, seed, score, 2.0)
    rec["quality"].update(eval_examples=examples, eval_loss=loss)
    return {**rec, "task": task}


def test_a_difference_inside_the_seeds_noise_is_reported_as_within_noise():
    close = [_scored("full", s, x) for s, x in ((1, 0.90), (2, 0.86), (3, 0.94))]
    close += [_scored("lora", s, x) for s, x in ((1, 0.88), (2, 0.84), (3, 0.95))]
    full, lora = report.summary_rows(_results(close))
    assert lora["quality_verdict"] == "within noise" and lora["quality_noise"] == "3 seeds"
    assert 15 < lora["quality_ci"] < 25  # t(2) = 4.30 over 3 seeds is wide: 98.9% ± 18.8
    far = close[:3] + [_scored("lora", s, x) for s, x in ((1, 0.60), (2, 0.61), (3, 0.59))]
    assert report.summary_rows(_results(far))[1]["quality_verdict"] == "below full"


def test_one_seed_is_judged_by_the_test_sets_sampling_error():
    # 6 steps on 32 examples: LoRA's 34% against full's 19% (183%) is within what 32 answers can tell apart.
    few = report.summary_rows(_results([_scored("full", 1, 6 / 32, 32), _scored("lora", 1, 11 / 32, 32)]))[1]
    assert few["quality_pct_of_full"] > 180 and few["quality_verdict"] == "within noise"
    assert few["quality_noise"] == "one seed; 32 test examples"
    many = report.summary_rows(_results([_scored("full", 1, 0.9, 1000), _scored("lora", 1, 0.8, 1000)]))[1]
    assert many["quality_verdict"] == "below full"


def test_a_report_cut_short_names_the_planned_runs_that_did_not_run():
    results = _results([_scored("full", s, 0.9, task="builtin:a") for s in (42, 43)]
                       + [_scored("lora", 42, 0.88, task="builtin:a")])
    results["suite"]["tasks"] = ["builtin:a", "builtin:b"]
    results["settings"] = {"methods": ["full", "lora"], "repeats": 2}
    assert report.missing_runs(results) == ["a lora seed 43", "b full seed 42", "b full seed 43", "b lora seed 42",
                                            "b lora seed 43"]
    text = report.markdown(results)
    assert "- **Incomplete**: 5 planned training run(s) did not run: a lora seed 43, b full seed 42" in text
    assert "| `builtin:a` | LoRA (16-bit base) | the suite's | 1/2 |" in text
    complete = {**results, "records": results["records"] + [_scored("lora", 43, 0.9, task="builtin:a")],
                "suite": {**results["suite"], "tasks": ["builtin:a"]}}
    assert report.missing_runs(complete) == [] and "Incomplete" not in report.markdown(complete)


def test_each_method_runs_its_seeds_at_its_best_validation_point_and_the_report_shows_the_grid():
    tune = lambda method, lr, score, loss, task="a": {**_scored(method, 42, score, 50, task, loss), "kind": "tune",
                                                      "change": f"optimizer.lr={lr}"}
    records = [tune("lora", "1e-3", 0.5, 0.9), tune("lora", "3e-3", 0.7, 0.8), tune("lora", "6e-3", 0.7, 0.7),
               tune("full", "3e-5", 0.6, 0.5), tune("lora", "1e-3", 0.9, 0.5, task="b")]
    assert report.chosen_point(records, "a", "lora") == "optimizer.lr=6e-3"  # the tie goes to the lower loss
    assert report.chosen_point(records, "b", "lora") == "optimizer.lr=1e-3"
    assert report.chosen_point(records, "a", "qlora") is None
    trained = [{**_scored("full", 42, 0.8, task=t), "setting": "optimizer.lr=3e-5"} for t in "ab"]
    trained += [{**_scored("lora", 42, 0.7, task=t), "setting": "optimizer.lr=6e-3"} for t in "ab"]
    results = _results(records + trained)
    results["suite"]["tasks"] = ["a", "b"]
    results["settings"] = {"validation_fraction": 0.1}
    assert [r["method"] for r in report.summary_rows(results, "b")] == ["full", "lora"]
    text = report.markdown(results)
    by_task = text.split("## Quality by task", 1)[1].split("##", 1)[0]
    assert by_task.count("`optimizer.lr=6e-3`") == 2 and "| `b` | LoRA" in by_task
    grid = text.split("## Settings chosen on validation rows", 1)[1].split("##", 1)[0]
    assert "**`optimizer.lr=6e-3`**" in grid and "| `a` | LoRA (16-bit base) | `optimizer.lr=3e-3` | 70.0%" in grid
    assert "tuning" in report.plot_names(results)


def test_time_to_quality_is_the_first_scored_point_at_95_percent_of_fulls_final_score():
    curve = lambda *scores: [{"step": 10 * (i + 1), "tokens_seen": 1000 * (i + 1), "time_s": 30.0 * (i + 1),
                              "task_score": s, "eval_loss": 1.0} for i, s in enumerate(scores)]
    full = [{**_scored("full", 42, 0.80), "quality_curve": curve(0.5, 0.77, 0.80)}, _scored("full", 43, 0.84)]
    lora = {**_scored("lora", 42, 0.79), "quality_curve": curve(0.2, 0.6, 0.79)}
    qlora = {**_scored("qlora", 42, 0.70), "quality_curve": curve(0.3, 0.5, 0.70)}
    rows = {r["method"]: r for r in report.time_to_quality_rows(_results(full + [lora, qlora]))}
    assert rows["full"]["target_pct"] == 0.95 * 82.0  # of full's mean over its seeds
    assert (rows["full"]["step"], rows["full"]["tokens"], rows["full"]["time_s"]) == (30, 3000, 90.0)
    assert rows["lora"]["reached"] and rows["lora"]["step"] == 30
    assert not rows["qlora"]["reached"] and rows["qlora"]["best_pct"] == 70.0
    assert "not reached (best 70.0%)" in report.markdown(_results(full + [lora, qlora]))


def test_quality_falls_back_to_perplexity_when_full_scores_zero():
    rows = report.summary_rows(_results([_train("full", 1, 0.0, 2.0), _train("lora", 1, 0.0, 4.0)]))
    assert rows[1]["quality_pct_of_full"] == 50.0 and rows[1]["quality_basis"] == "perplexity"


def test_failed_runs_are_counted_and_named_but_do_not_enter_the_means():
    failed = {"kind": "train", "method": "lora", "seed": 2, "status": "failed", "error": "boom"}
    rows = report.summary_rows(_results([_train("lora", 1, 0.5, 2.0, tok_s=300.0), failed]))
    assert rows[0]["runs"] == 2 and rows[0]["ok"] == 1 and rows[0]["tokens_per_s"] == 300.0
    assert rows[0]["errors"] == ["2: boom"]
    assert "boom" in report.markdown(_results([_train("lora", 1, 0.5, 2.0), failed]))


def test_a_failed_runs_error_is_its_exception_line_not_the_banner_around_it():
    from benchmarks.compare import error_of

    tail = "\n".join([
        "(RayTrainWorker pid=1) [Rank 0 Error Snippet]:",
        "Traceback (most recent call last):",
        '  File "ftcluster/engine.py", line 88, in initialize',
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 96.00 GiB.",
        "ray.train.WorkerGroupError: Training failed due to worker errors:",
        "[Rank 0 Error Snippet]:",
    ])
    assert error_of(tail) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 96.00 GiB."
    assert error_of("loading\nKilled") == "Killed"
    # A refused config names its fields on the indented lines below the error line.
    refused = "error: invalid config (x.yaml):\n  lora.r: Input should be greater than 0\ndone"
    assert error_of(refused) == "error: invalid config (x.yaml): lora.r: Input should be greater than 0"


def test_docs_results_and_the_readme_table_are_generated_from_the_committed_reports():
    """Neither is written by hand: ``python -m benchmarks.results`` rewrites both from reports/**/results.json."""
    from benchmarks import results

    assert results.DOCS.read_text() == results.page()
    readme = results.README.read_text()
    assert results.readme(readme) == readme
    assert readme.count("| 7B QLoRA |") == 1 and "[1× H100](reports/llama-7b/2026-11-28-1xh100-peers/report.md)" in readme


def test_the_harness_shows_the_trainers_phases_as_they_end():
    """make compare was silent for minutes at a time: the trainer's phase lines (each says what it did and how long
    it took) now reach the harness's console, without Ray's prefix; its other lines stay in the log."""
    from benchmarks.compare import PHASE, _plain

    shown = ["\x1b[36m(RayTrainWorker pid=14269)\x1b[0m data: 2.9 s, 224 rows of up to 128 tokens",
             "checks: 0.3 s", "cluster: 7.1 s, started", "model: 0.3 s, 0.00B parameters", "engine: 2.2 s, ZeRO-2",
             "first step: done 15.0 s after the command started", "memory: a CPU run"]
    for line in shown:
        assert PHASE.match(_plain(line)), line
    assert _plain(shown[0]) == "data: 2.9 s, 224 rows of up to 128 tokens"
    for line in ("trainable params: 1 || all params: 2", "  backend   ray", "{", '  "run_dir": "/tmp/x",'):
        assert not PHASE.match(_plain(line)), line
