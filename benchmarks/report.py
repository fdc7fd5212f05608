"""Renderings of a ``results.json``: ``report.md``, ``results.csv`` and PNG plots. Pure functions of the records,
so ``benchmarks.compare --from results.json`` reproduces a report exactly."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ftcluster.metrics import FLOP_FORMULA
from ftcluster.records import Summary

METHOD_ORDER = ("base", "full", "lora", "qlora")
LABELS = {"base": "Base model (no fine-tuning)", "full": "Full fine-tuning", "lora": "LoRA (16-bit base)",
          "qlora": "QLoRA (4-bit NF4 base)"}


# --- figures per record ------------------------------------------------------------------------------------------

_PEAK_KEYS = {"peak_device_used_gib": "GPU memory in use (NVML), largest over workers",
              "peak_allocated_gib": "torch peak allocated", "peak_rss_gib": "process peak RSS (CPU run)"}


def hardware_line(prov: dict) -> str:
    """A report's hardware, from its provenance (``compare.provenance``)."""
    gpus = prov.get("gpus") or []
    return (f"{len(gpus)}× {gpus[0]['name']} ({gpus[0]['memory_gib']} GiB), driver {prov.get('driver')}, "
            f"CUDA {prov.get('cuda')}" if gpus else f"CPU only ({prov.get('cpu')}, {prov.get('cpu_count')} cores)")


def peak_memory_gib(m: dict) -> float | None:
    """The peak that must fit: the device memory NVML saw in use on a GPU (context, NCCL and paged buffers
    included), else torch's peak allocation, else (CPU) the process's peak RSS."""
    return next((m[k] for k in _PEAK_KEYS if m.get(k) is not None), None)


def memory_basis(m: dict) -> str:
    return next((label for k, label in _PEAK_KEYS.items() if m.get(k) is not None), "n/a")


def figures(rec: dict) -> dict:
    """The report's numbers for one ok training or baseline record."""
    raw = rec.get("metrics") or {}
    m = Summary.from_json(raw)
    q = rec.get("quality") or (raw if rec["kind"] == "base" else {})  # a base record's metrics are its quality
    world = m.world_size or 1
    trainable, total = m.trainable_params, m.total_params
    out = {
        "peak_memory_gib": peak_memory_gib(raw), "peak_allocated_gib": m.peak_allocated_gib,
        "peak_reserved_gib": m.peak_reserved_gib, "peak_rss_gib": m.peak_rss_gib,
        "wall_time_s": rec.get("process_wall_s"), "train_time_s": m.wall_time_s,
        "time_to_first_step_s": m.time_to_first_step_s, "step_time_s": m.step_time_s,
        "tokens_per_s": m.tokens_per_s_total,
        "tokens_per_s_per_device": m.tokens_per_s_total / world if m.tokens_per_s_total else None,
        "mfu_pct": 100 * m.mfu_datasheet if m.mfu_datasheet is not None else None,
        "mfu_measured_pct": 100 * m.mfu if m.mfu is not None else None,
        "trainable_params": trainable, "total_params": total,
        "trainable_pct": 100 * trainable / total if trainable and total else None,
        "checkpoint_mb": m.checkpoint_bytes / 1e6 if m.checkpoint_bytes else None,
        "final_model_mb": m.final_model_bytes / 1e6 if m.final_model_bytes else None,
        # A training record's eval loss is under eval_loss_in_training (benchmarks.compare): the quality
        # scorer's is the one compared.
        "eval_loss": q.get("eval_loss", m.eval_loss),
        "eval_perplexity": q.get("eval_perplexity", m.eval_perplexity),
        "task_score_pct": 100 * q["task_score"] if q.get("task_score") is not None else None,
        "eval_examples": q.get("eval_examples"),
    }
    if rec.get("shared"):  # it ran beside other runs (compare --jobs): its times and device memory are not its own
        out.update(dict.fromkeys(SHARED_KEYS))
    return out


SHARED_KEYS = ("peak_memory_gib", "wall_time_s", "train_time_s", "time_to_first_step_s", "step_time_s",
               "tokens_per_s", "tokens_per_s_per_device", "mfu_pct", "mfu_measured_pct")
"""The figures of a run that shared the machine (``compare --jobs``) that the report leaves out."""


def _stats(values: list) -> tuple[float | None, float | None, int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def tasks(results: dict) -> list[str | None]:
    """The tasks the suite ran, the first the one speed and memory are measured on (None: the recipe's own, as
    every record made before suites had tasks)."""
    return results["suite"].get("tasks") or [None]


def missing_runs(results: dict) -> list[str]:
    """The training runs the invocation planned (each method's seeds on each task, from its settings) that are not
    in its records: a run cut short by ``--time-limit``, to be made by ``--resume``."""
    settings = results.get("settings") or {}
    if not settings.get("methods") or not settings.get("repeats"):
        return []
    made = {(r.get("task"), r["method"], r.get("seed")) for r in results["records"] if r["kind"] == "train"}
    return [f"{task_label(task)} {method} seed {seed}" for task in tasks(results) for method in settings["methods"]
            for seed in range(42, 42 + settings["repeats"]) if (task, method, seed) not in made]


def task_label(task: str | None) -> str:
    return (task or "the recipe's data").removeprefix("builtin:")


def summary_rows(results: dict, task: str | None = ...) -> list[dict]:
    """One row per method (the base model first) on ``task`` (default: the first), mean and std over its
    successful seeds."""
    rows = []
    task = tasks(results)[0] if task is ... else task
    records = [r for r in results["records"] if r.get("task") == task]
    for method in METHOD_ORDER:
        kind = "base" if method == "base" else "train"
        mine = [r for r in records if r["kind"] == kind and r["method"] == method]
        if not mine:
            continue
        ok = [r for r in mine if r["status"] == "ok"]
        per_run = []
        for r in ok:
            f = figures(r)
            if kind == "base":
                f = {k: f[k] for k in ("eval_loss", "eval_perplexity", "task_score_pct")}
            per_run.append(f)
        row = {"method": method, "runs": len(mine), "ok": len(ok), "setting": next((r.get("setting") for r in ok), None),
               "errors": [f"{r.get('seed')}: {r.get('error')}" for r in mine if r["status"] != "ok"]}
        for key in (per_run[0] if per_run else {}):
            row[key], row[f"{key}_std"], _ = _stats([f[key] for f in per_run])
        rows.append(row)
    _quality_vs_full(rows)
    return rows


T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18,
        15: 2.13, 20: 2.09, 30: 2.04}
"""Student's t, two-sided 95%, by degrees of freedom (between listed ones, the next smaller's: wider)."""


def t975(df: float) -> float:
    if df == math.inf:
        return 1.96
    return next((T975[k] for k in sorted(T975, reverse=True) if k <= df), T975[1]) if df < 30 else 2.04


def score_noise(row: dict) -> tuple[float, float, str] | None:
    """(standard error of the row's mean task score in points, its degrees of freedom, what it measures): over
    seeds where two or more ran, else the test set's sampling error of one run's score (binomial, with one
    success and one failure added so that a score of 0 or 100% is not exact)."""
    score, n = row.get("task_score_pct"), row.get("ok") or 0
    if score is None:
        return None
    if n >= 2 and row.get("task_score_pct_std") is not None:
        return row["task_score_pct_std"] / math.sqrt(n), n - 1, f"{n} seeds"
    examples = row.get("eval_examples")
    if not examples:
        return None
    p = (score / 100 * examples + 1) / (examples + 2)
    return 100 * math.sqrt(p * (1 - p) / examples), math.inf, f"one seed; {examples:.0f} test examples"


def _quality_vs_full(rows: list[dict]) -> None:
    """Quality as % of full fine-tuning: the task score ratio, with its 95% interval and whether the difference
    from full fine-tuning is within noise (``score_noise``); or, when full fine-tuning scores 0 (or was not run),
    the inverse perplexity ratio, so a row never compares against nothing."""
    full = next((r for r in rows if r["method"] == "full" and r["ok"]), None)
    for r in rows:
        r["quality_pct_of_full"], r["quality_basis"] = None, None
        r["quality_ci"], r["quality_verdict"], r["quality_noise"] = None, None, None
        if full is None or not r["ok"]:
            continue
        if full.get("task_score_pct"):
            if r.get("task_score_pct") is not None:
                ratio = r["task_score_pct"] / full["task_score_pct"]
                r["quality_pct_of_full"] = 100 * ratio
                r["quality_basis"] = "task score"
                mine, theirs = score_noise(r), score_noise(full)
                if r is full or mine is None or theirs is None:
                    continue
                t = t975(min(mine[1], theirs[1]))
                rel = math.hypot(mine[0] / max(r["task_score_pct"], 1e-9), theirs[0] / full["task_score_pct"])
                r["quality_ci"] = 100 * t * (ratio * rel if r["task_score_pct"] else mine[0] / full["task_score_pct"])
                diff = r["task_score_pct"] - full["task_score_pct"]
                within = abs(diff) <= t * math.hypot(mine[0], theirs[0])
                r["quality_verdict"] = "within noise" if within else "below full" if diff < 0 else "above full"
                r["quality_noise"] = mine[2]
        elif full.get("eval_perplexity") and r.get("eval_perplexity"):
            r["quality_pct_of_full"] = 100 * full["eval_perplexity"] / r["eval_perplexity"]
            r["quality_basis"] = "perplexity"


def task_label(task: str | None) -> str:
    return (task or "recipe").removeprefix("builtin:")


def tune_rows(results: dict) -> list[dict]:
    """Every grid point's run (``--tune``): its task, method, setting and validation scores, and whether it was
    chosen."""
    out = []
    for rec in results["records"]:
        if rec["kind"] != "tune":
            continue
        q = rec.get("quality") or {}
        out.append({"task": rec.get("task"), "method": rec["method"], "setting": rec["change"],
                    "status": rec["status"], "error": rec.get("error") or q.get("error"),
                    "task_score_pct": 100 * q["task_score"] if q.get("task_score") is not None else None,
                    "eval_loss": q.get("eval_loss"), "eval_examples": q.get("eval_examples"),
                    "chosen": rec["change"] == chosen_point(results["records"], rec.get("task"), rec["method"])})
    return sorted(out, key=lambda g: _order(results, g["task"], g["method"]) + (_lr(g["setting"]), g["setting"]))


def _order(results: dict, task: str | None, method: str) -> tuple[int, int]:
    """Rows by task (the suite's order), then method: the order records were made in differs on a resumed run."""
    known = tasks(results)
    return (known.index(task) if task in known else len(known), METHOD_ORDER.index(method))


def _lr(setting: str) -> float:
    return next((float(x.split("=", 1)[1]) for x in setting.split() if x.startswith("optimizer.lr=")), 0.0)


TARGET_SHARE = 0.95
"""Time to quality: to this share of full fine-tuning's final task score."""


def time_to_quality_rows(results: dict) -> list[dict]:
    """Per task and method, when the first seed's run (scored along the way: ``quality_curve``) first reached
    ``TARGET_SHARE`` of full fine-tuning's final task score (its mean over seeds): step, tokens and seconds."""
    out = []
    for task in tasks(results):
        full = next((r for r in summary_rows(results, task) if r["method"] == "full" and r["ok"]), None)
        if full is None or not full.get("task_score_pct"):
            continue
        target = TARGET_SHARE * full["task_score_pct"] / 100
        for rec in results["records"]:
            if rec["kind"] != "train" or rec.get("task") != task or not rec.get("quality_curve"):
                continue
            curve = rec["quality_curve"]
            hit = next((p for p in curve if p["task_score"] is not None and p["task_score"] >= target), None)
            out.append({"task": task, "method": rec["method"], "seed": rec["seed"], "target_pct": 100 * target,
                        "reached": hit is not None, "step": hit and hit["step"],
                        "tokens": hit and hit["tokens_seen"], "time_s": hit and hit["time_s"],
                        "best_pct": 100 * max(p["task_score"] or 0 for p in curve),
                        "points": len(curve)})
    return sorted(out, key=lambda r: _order(results, r["task"], r["method"]))


def chosen_point(records: list[dict], task: str | None, method: str) -> str | None:
    """The grid point ``method``'s seeds run at on ``task``: the best validation task score, a lower validation
    loss breaking ties; None where no grid point was scored."""
    scored = [(r["quality"]["task_score"], -r["quality"]["eval_loss"], r["change"]) for r in records
              if r["kind"] == "tune" and r.get("task") == task and r["method"] == method and r["status"] == "ok"
              and (r.get("quality") or {}).get("task_score") is not None]
    return max(scored)[2] if scored else None


PEERS = {"hf": "HF recipe", "hf-tuned": "HF tuned (no fp32 upcast)", "unsloth": "Unsloth"}


def baseline_rows(results: dict, rows: list[dict]) -> list[dict]:
    """One row per method and peer recipe timed beside it (records before hf-tuned existed have no recipe: hf)."""
    out = []
    for r in rows:
        for hf in (x for x in results["records"] if x["kind"] == "hf" and x["method"] == r["method"]):
            out.append(_against(r, hf))
    return out


def _against(r: dict, hf: dict) -> dict:
    row = {"method": r["method"], "peer": hf.get("recipe", "hf"), "ftcluster_tokens_per_s": r.get("tokens_per_s"),
           "ftcluster_peak_gib": r.get("peak_memory_gib"), "ftcluster_allocated_gib": r.get("peak_allocated_gib"),
           "ftcluster_step_time_s": r.get("step_time_s"), "hf_status": hf["status"], "hf_error": hf.get("error")}
    if hf["status"] == "ok":
        m = Summary.from_json(hf["metrics"])
        row.update(hf_tokens_per_s=m.tokens_per_s_total, hf_peak_gib=peak_memory_gib(hf["metrics"]),
                   hf_allocated_gib=m.peak_allocated_gib, hf_step_time_s=m.step_time_s)
        if row["ftcluster_tokens_per_s"]:
            row["speedup"] = row["ftcluster_tokens_per_s"] / m.tokens_per_s_total
        if row["ftcluster_step_time_s"] and m.step_time_s:
            # The same micro batch x sequence length per step on both sides: a ratio free of how many real tokens
            # the packed rows of one logging window happen to hold.
            row["step_speedup"] = m.step_time_s / row["ftcluster_step_time_s"]
        if row["ftcluster_peak_gib"] and row["hf_peak_gib"]:
            row["memory_ratio"] = row["ftcluster_peak_gib"] / row["hf_peak_gib"]
        if row["ftcluster_allocated_gib"] and row["hf_allocated_gib"]:
            row["allocated_ratio"] = row["ftcluster_allocated_gib"] / row["hf_allocated_gib"]
    return row


def ablation_rows(results: dict, rows: list[dict]) -> list[dict]:
    """Each ablation run beside its method's own run: what the one changed setting costs or gains."""
    by_method = {r["method"]: r for r in rows}
    out = []
    for rec in results["records"]:
        if rec["kind"] != "ablation":
            continue
        row = {"method": rec["method"], "change": rec["change"], "status": rec["status"], "error": rec.get("error")}
        main = by_method.get(rec["method"], {})
        if rec["status"] == "ok":
            f = figures(rec)
            row.update(tokens_per_s=f["tokens_per_s"], step_time_s=f["step_time_s"],
                       peak_allocated_gib=f["peak_allocated_gib"], main_tokens_per_s=main.get("tokens_per_s"),
                       main_step_time_s=main.get("step_time_s"), main_peak_allocated_gib=main.get("peak_allocated_gib"))
            if row["main_step_time_s"] and row["step_time_s"]:
                row["step_speedup"] = row["step_time_s"] / row["main_step_time_s"]
            if row["main_tokens_per_s"] and row["tokens_per_s"]:
                row["speedup"] = row["main_tokens_per_s"] / row["tokens_per_s"]
        out.append(row)
    return out


# --- text ------------------------------------------------------------------------------------------------------------

def fmt(v, std=None, digits: int = 2, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and abs(v) >= 1000:
        text = f"{v:,.0f}"
    else:
        text = f"{v:.{digits}f}"
    if std is not None:
        text += f" ± {std:,.0f}" if abs(std) >= 1000 else f" ± {std:.{digits}f}"
    return text + unit


def _count(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _duration(s) -> str:
    if s is None:
        return "n/a"
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(row) + " |" for row in body]]


def quality_sections(results: dict) -> list[str]:
    """Quality on every task, with its noise; the grid and what it chose."""
    names = {None: "the recipe's data"}
    repeats = (results.get("settings") or {}).get("repeats") or 1
    lines = ["", "## Quality by task", "",
             "Task score: exact match on the test rows, mean ± std over the seeds that ran. % of full: the mean over "
             "full fine-tuning's, with its 95% interval (Student's t over seeds; with one seed, the test set's "
             "sampling error). Within noise: the difference from full fine-tuning is inside that interval.", ""]
    body = []
    for task in tasks(results):
        for r in summary_rows(results, task):
            if r["method"] == "base":
                continue
            pct = fmt(r.get("quality_pct_of_full"), None, 0, "%")
            if r.get("quality_ci") is not None:
                pct += f" ± {r['quality_ci']:.0f}"
            body.append([f"`{names.get(task, task)}`", LABELS[r["method"]], f"`{r['setting']}`" if r.get("setting")
                         else "the suite's", f"{r['ok']}/{max(r['runs'], repeats)}",
                         fmt(r.get("task_score_pct"), r.get("task_score_pct_std"), 1, "%"),
                         f"{r['eval_examples']:.0f}" if r.get("eval_examples") else "n/a", pct,
                         "—" if r["method"] == "full" else (r.get("quality_verdict") or "n/a")])
    lines += _table(["Task", "Method", "Setting", "Seeds ok", "Task score", "Test examples", "% of full",
                     "Against full"], body)
    reach = time_to_quality_rows(results)
    if not reach and any(r.get("quality_curve") for r in results["records"]):
        lines += ["", "## Time to quality", "", "n/a: full fine-tuning scored 0 (or did not run), so there is no "
                  "share of its score to reach."]
    if reach:
        lines += ["", "## Time to quality", "",
                  f"When each method's first seed first reached {100 * TARGET_SHARE:.0f}% of full fine-tuning's final "
                  "task score, its model scored on the test rows every few steps along the run (`training.export_every`, "
                  "the end included). Time: seconds since the training process started (start-up included), to the "
                  "step scored.", ""]
        body = [[f"`{names.get(r['task'], r['task'])}`", LABELS[r["method"]], fmt(r["target_pct"], None, 1, "%"),
                 str(r["step"]) if r["reached"] else f"not reached (best {r['best_pct']:.1f}%)",
                 _count(r["tokens"]) if r["reached"] and r["tokens"] else "—",
                 _duration(r["time_s"]) if r["reached"] else "—", str(r["points"])] for r in reach]
        lines += _table(["Task", "Method", "Target score", "Reached at step", "Tokens", "Time", "Points scored"],
                        body)
    grid = tune_rows(results)
    if grid:
        settings = results.get("settings", {})
        lines += ["", "## Settings chosen on validation rows", "",
                  f"Each grid point trained once (seed {min(r['seed'] for r in results['records'] if r['kind'] == 'tune')})"
                  f" and scored on {100 * (settings.get('validation_fraction') or 0):.0f}% of the training examples "
                  "held out of its training (`data.validation_fraction`); the test rows are not read. The chosen "
                  "point (**bold**) has the best validation score, a lower validation loss breaking ties.", ""]
        body = [[f"`{names.get(g['task'], g['task'])}`", LABELS[g["method"]],
                 (f"**`{g['setting']}`**" if g["chosen"] else f"`{g['setting']}`"),
                 fmt(g["task_score_pct"], None, 1, "%") if g["status"] == "ok" else f"failed: {g['error']}",
                 fmt(g["eval_loss"], None, 3), str(g["eval_examples"] or "n/a")] for g in grid]
        lines += _table(["Task", "Method", "Setting", "Validation task score", "Validation eval loss",
                         "Validation examples"], body)
    return lines


def markdown(results: dict) -> str:
    suite, prov, settings = results["suite"], results["provenance"], results.get("settings", {})
    rows = summary_rows(results)
    quality = suite.get("quality", True)
    q = (lambda text: text) if quality else (lambda text: "n/a")
    trained = [r for r in rows if r["method"] != "base"]
    hardware = hardware_line(prov)
    v = prov.get("versions", {})
    lines = [
        f"# {suite['name']}: full fine-tuning vs LoRA vs QLoRA",
        "",
        f"{suite['description']}. Recipe `{suite['recipe']}`.",
        "",
        f"- **Hardware**: {hardware}",
        f"- **Date**: {prov.get('date')}",
        f"- **Command**: `{prov.get('command')}`",
        f"- **Commit**: `{prov.get('git_commit')}`{' (with uncommitted changes)' if prov.get('git_dirty') else ''}",
        "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- **Runs**: {settings.get('repeats', 1)} seed(s) per method; mean ± std where more than one succeeded."
        + (f" Up to {settings['jobs']} runs at a time (`--jobs`) where only quality is read (grid points, seeds after "
           "the first, scoring): memory, time and speed come from each method's first seed, which ran alone."
           if (settings.get("jobs") or 1) > 1 else ""),
        *[f"- **Also**: `{more['command']}` ({more['date']}, commit `{more['git_commit']}`)"
          for more in prov.get("more_invocations", [])],
        *[f"- **Note**: {note}" for note in prov.get("notes", [])],
        *([f"- **Incomplete**: {len(missing)} planned training run(s) did not run: {', '.join(missing)}. Every "
           "figure below is over the runs that did; the same command with `--resume` makes the rest."]
          if (missing := missing_runs(results)) else []),
        "",
        "## Summary",
        "",
    ]
    body = []
    for r in rows:
        base = r["method"] == "base"
        body.append([
            LABELS[r["method"]] + ("" if r["ok"] else " — **failed**"),
            "—" if base else fmt(r.get("peak_memory_gib"), r.get("peak_memory_gib_std")),
            "—" if base else _duration(r.get("wall_time_s")),
            "—" if base else fmt(r.get("tokens_per_s"), r.get("tokens_per_s_std"), 0),
            "—" if base else fmt(r.get("mfu_pct"), None, 1, "%"),
            "—" if base else (f"{_count(r.get('trainable_params'))} ({fmt(r.get('trainable_pct'), None, 2, '%')})"
                              if r.get("trainable_params") else "n/a"),
            q(fmt(r.get("eval_loss"), r.get("eval_loss_std"), 3)),
            q(fmt(r.get("task_score_pct"), r.get("task_score_pct_std"), 1, "%")),
            q(fmt(r.get("quality_pct_of_full"), None, 0, "%")),
        ])
    lines += _table(["Method", "Peak memory (GiB)", "Wall time", "Tokens/s", "MFU (datasheet)", "Trainable params", "Eval loss",
                     "Task score", "Quality % of full"], body)
    basis = next((memory_basis(r["metrics"]) for r in results["records"]
                  if r["kind"] == "train" and r["status"] == "ok"), "n/a")
    qb = next((r["quality_basis"] for r in rows if r.get("quality_basis")), None)
    lines += [
        "",
        f"Peak memory: {basis}. Wall time: the whole `python -m ftcluster.train` process (Ray start-up, model "
        "load, training, final checkpoint). Tokens/s: tokens in packed rows (padding excluded) per second over "
        "all workers, median of the logging windows after the first.",
    ]
    if quality:
        lines += [
            "Eval loss: mean cross-entropy of the reference answers of the held-out split given their prompts "
            "(`benchmarks/quality.py`). Task score: exact match of greedy answers on held-out prompts. "
            f"Quality % of full: {'the task score' if qb == 'task score' else 'the inverse perplexity'} "
            "relative to full fine-tuning.",
        ]
    else:
        lines.append("Quality columns are n/a: the weights are random, so loss and task score mean nothing here.")
    lines += ["", "## Details", ""]
    body = [[LABELS[r["method"]], f"{r['ok']}/{max(r['runs'], settings.get('repeats') or 1)}",
             fmt(r.get("peak_allocated_gib"), None),
             fmt(r.get("peak_reserved_gib"), None), fmt(r.get("peak_rss_gib"), None),
             fmt(r.get("time_to_first_step_s"), None, 1, " s"), fmt(r.get("step_time_s"), None, 3, " s"),
             fmt(r.get("tokens_per_s_per_device"), None, 0), fmt(r.get("mfu_measured_pct"), None, 1, "%"),
             _count(r.get("total_params")),
             fmt(r.get("checkpoint_mb"), None, 1, " MB"), q(fmt(r.get("eval_perplexity"), None, 2))]
            for r in trained]
    lines += _table(["Method", "Runs ok", "Peak allocated (GiB)", "Peak reserved (GiB)", "Peak RSS (GiB)",
                     "Time to first step", "Step time", "Tokens/s per device", "MFU (measured matmul)", "Total params",
                     "Checkpoint on disk", "Eval perplexity"], body)
    lines += ["", f"**FLOPs and MFU.** {FLOP_FORMULA}"]
    if quality:
        lines += quality_sections(results)
    baseline = baseline_rows(results, rows)
    if baseline:
        lines += ["", "## Against the plain Hugging Face recipe", "",
                  "transformers + PEFT + bitsandbytes as tutorials write it (`benchmarks/hf_baseline.py`): same "
                  "model, sequence length, micro batch, LoRA settings, optimizer and gradient checkpointing; rows "
                  "of concatenated examples (no padding); no Ray, no DeepSpeed. HF tuned is the same without "
                  "`prepare_model_for_kbit_training`'s float32 upcast (QLoRA only). Unsloth is its "
                  "`FastLanguageModel` with its own kernels and gradient checkpointing over the same checkpoint, "
                  "rows, LoRA settings, optimizer and loop. Ratios above 1 mean ftcluster "
                  "is faster / heavier. Speed by tokens/s (real tokens; the peer's rows hold no padding) and by "
                  "median step time (the same micro batch × sequence length on both sides); memory as torch's "
                  "peak allocation and as NVML's device memory in use.", ""]
        body = [[LABELS[b["method"]], PEERS.get(b["peer"], b["peer"]), fmt(b.get("ftcluster_tokens_per_s"), None, 0),
                 fmt(b.get("hf_tokens_per_s"), None, 0) if b["hf_status"] == "ok" else f"failed: {b['hf_error']}",
                 fmt(b.get("speedup"), None, 2, "×"), fmt(b.get("step_speedup"), None, 2, "×"),
                 fmt(b.get("ftcluster_allocated_gib")), fmt(b.get("hf_allocated_gib")),
                 fmt(b.get("allocated_ratio"), None, 2, "×"), fmt(b.get("ftcluster_peak_gib")), fmt(b.get("hf_peak_gib")),
                 fmt(b.get("memory_ratio"), None, 2, "×")] for b in baseline]
        lines += _table(["Method", "Peer", "ftcluster tokens/s", "Peer tokens/s", "Speed ratio (tokens/s)",
                         "Speed ratio (step time)", "ftcluster allocated (GiB)", "Peer allocated (GiB)",
                         "Allocated ratio", "ftcluster NVML (GiB)", "Peer NVML (GiB)", "NVML ratio"], body)
    ablations = ablation_rows(results, rows)
    if ablations:
        lines += ["", "## Ablation", "",
                  "Each method run again with one setting changed (`benchmarks.compare --ablate`), same data, shape "
                  "and seed. Gain: what the setting as run in the rows above buys over the changed one (above 1: "
                  "the default is faster), by tokens/s and by median step time.", ""]
        body = [[LABELS[a["method"]], f"`{a['change']}`",
                 fmt(a.get("main_tokens_per_s"), None, 0), fmt(a.get("tokens_per_s"), None, 0)
                 if a["status"] == "ok" else f"failed: {a['error']}",
                 fmt(a.get("speedup"), None, 2, "×"), fmt(a.get("main_step_time_s"), None, 3, " s"),
                 fmt(a.get("step_time_s"), None, 3, " s"), fmt(a.get("step_speedup"), None, 2, "×"),
                 fmt(a.get("main_peak_allocated_gib")), fmt(a.get("peak_allocated_gib"))] for a in ablations]
        lines += _table(["Method", "Changed", "Tokens/s as run", "Tokens/s changed", "Gain (tokens/s)",
                         "Step time as run", "Step time changed", "Gain (step time)", "Peak allocated as run (GiB)",
                         "Peak allocated changed (GiB)"], body)
    problems = [r for r in results["records"] if r["status"] != "ok"]
    if problems:
        lines += ["", "## Runs that did not finish", ""]
        lines += [f"- {r['kind']} {r['method']} seed {r.get('seed')}: **{r['status']}** — {r.get('error')}"
                  + (f" (log: `{r['log']}`)" if r.get("log") else "") for r in problems]
    for task in tasks(results) if quality else []:
        samples = [(r["method"], r.get("quality", r.get("metrics") if r["kind"] == "base" else None))
                   for r in results["records"]
                   if r["status"] == "ok" and r["kind"] in ("base", "train") and r.get("task") == task]
        samples = [(m, q_["samples"]) for m, q_ in samples if q_ and q_.get("samples")]
        if not samples:
            continue
        lines += ["", "## Sample answers (first held-out prompt" + (f" of `{task}`)" if task else ")"), ""]
        seen = set()
        for method, ss in samples:
            if method in seen:
                continue
            seen.add(method)
            s = ss[0]
            lines.append(f"- {LABELS[method]}: `{s['answer'].strip()[:120]}` "
                         f"({'match' if s['match'] else 'reference: `' + s['reference'] + '`'})")
        first = samples[0][1][0]
        lines.append(f"  (prompt: {first['prompt']}" + (f" {first['input']}" if first.get("input") else "") + ")")
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({name}.png)" for name in plot_names(results)]
    return "\n".join(lines) + "\n"


# --- files -----------------------------------------------------------------------------------------------------------

def flat_records(results: dict) -> list[dict]:
    rows = []
    for r in results["records"]:
        row = {k: v for k, v in r.items() if k not in ("metrics", "quality")}
        for section in ("metrics", "quality"):
            for k, v in (r.get(section) or {}).items():
                if k not in ("losses", "samples"):
                    row[f"{section}.{k}"] = v
        rows.append(row)
    return rows


def plot_names(results: dict) -> list[str]:
    names = ["memory", "throughput"]
    if any(r.get("metrics", {}).get("losses") for r in results["records"] if r["status"] == "ok"):
        names.append("loss")
    if results["suite"].get("quality", True):
        names.append("quality")
    if any(r["kind"] == "tune" for r in results["records"]):
        names.append("tuning")
    if any(r.get("quality_curve") for r in results["records"]):
        names.append("tradeoffs")
    return names


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary_rows(results) if r["method"] != "base" and r["ok"]]
    names = [r["method"] for r in rows]
    save = lambda fig, name: (fig.tight_layout(), fig.savefig(out / f"{name}.png", dpi=110,
                                                                metadata={"Software": None}), plt.close(fig))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(names, [r.get("peak_memory_gib") or 0 for r in rows], color="#4c72b0")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title("Peak memory by method")
    save(fig, "memory")

    fig, ax = plt.subplots(figsize=(5, 3.2))
    peers = {}
    for b in baseline_rows(results, rows):
        peers.setdefault(b["peer"], {})[b["method"]] = b.get("hf_tokens_per_s")
    x = range(len(names))
    width = 0.8 / (1 + len(peers))
    ax.bar([i - 0.4 + width / 2 for i in x], [r.get("tokens_per_s") or 0 for r in rows], width=width,
           label="ftcluster")
    for k, (peer, by_method) in enumerate(peers.items(), 1):
        ax.bar([i - 0.4 + width / 2 + k * width for i in x], [by_method.get(n) or 0 for n in names], width=width,
               label=PEERS.get(peer, peer))
    if peers:
        ax.legend()
    ax.set_xticks(list(x), names)
    ax.set_ylabel("tokens/s")
    ax.set_title("Training throughput")
    save(fig, "throughput")

    if "loss" in plot_names(results):
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for r in results["records"]:
            losses = (r.get("metrics") or {}).get("losses") if r["status"] == "ok" and r["kind"] == "train" else None
            if losses:
                ax.plot([s for s, _ in losses], [l for _, l in losses], marker=".",
                        label=f"{r['method']} (seed {r['seed']})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
        ax.set_title("Loss curves")
        save(fig, "loss")

    if "quality" in plot_names(results):
        allrows = [r for r in summary_rows(results) if r["ok"]]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(7, 3.2))
        a1.bar([r["method"] for r in allrows], [r.get("eval_loss") or 0 for r in allrows], color="#dd8452")
        a1.set_title("held-out answer loss")
        a2.bar([r["method"] for r in allrows], [r.get("task_score_pct") or 0 for r in allrows], color="#55a868")
        a2.set_title("task score (exact match %)")
        save(fig, "quality")

    if "tradeoffs" in plot_names(results):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.4, 3.4))
        for k, task in enumerate(tasks(results)):
            marker = "os^"[k % 3]
            for r in (r for r in summary_rows(results, task) if r["method"] != "base" and r["ok"]):
                a1.scatter([r.get("peak_memory_gib") or 0], [r.get("task_score_pct") or 0], marker=marker,
                           color=f"C{METHOD_ORDER.index(r['method'])}", label=f"{r['method']} {task_label(task)}")
            for rec in results["records"]:
                curve = rec.get("quality_curve") if rec["kind"] == "train" and rec.get("task") == task else None
                if curve:
                    a2.plot([p["time_s"] for p in curve], [100 * (p["task_score"] or 0) for p in curve],
                            marker=marker, color=f"C{METHOD_ORDER.index(rec['method'])}",
                            label=f"{rec['method']} {task_label(task)}")
        a1.set_xlabel("peak memory (GiB)")
        a1.set_ylabel("test task score (%)")
        a1.set_title("quality against memory", fontsize=9)
        a2.set_xlabel("seconds since the process started")
        a2.set_title("quality against time (first seed)", fontsize=9)
        a2.legend(fontsize=6)
        save(fig, "tradeoffs")

    if "tuning" in plot_names(results):
        grid = [g for g in tune_rows(results) if g["task_score_pct"] is not None]
        panels = tasks(results)
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
        for ax, task in zip(axes[0], panels):
            series: dict[tuple, list] = {}
            for g in (g for g in grid if g["task"] == task):
                parts = g["setting"].split()
                lr = next((float(x.split("=", 1)[1]) for x in parts if x.startswith("optimizer.lr=")), None)
                rest = " ".join(x for x in parts if not x.startswith("optimizer.lr="))
                series.setdefault((g["method"], rest), []).append((lr, g["task_score_pct"], g["chosen"]))
            for (method, rest), pts in series.items():
                pts.sort(key=lambda x: x[0] or 0)
                line, = ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o" if not rest else "s",
                                label=method + (f" {rest}" if rest else ""))
                ax.scatter([x for x, _, c in pts if c], [y for _, y, c in pts if c], s=120, facecolors="none",
                           edgecolors=line.get_color())
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("validation task score (%)")
            ax.set_title(task or "recipe", fontsize=9)
            ax.legend(fontsize=7)
        save(fig, "tuning")


def render(results: dict, out: Path, draw=None, write=None) -> None:
    """Write results.json, results.csv, report.md and the plots into ``out`` (``draw`` and ``write`` render the
    plots and the markdown: this module's, or another report's over the same records)."""
    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    pd.DataFrame(flat_records(results)).to_csv(out / "results.csv", index=False)
    (draw or plots)(results, out)
    (out / "report.md").write_text((write or markdown)(results))
