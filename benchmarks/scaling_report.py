"""Renderings of a ``benchmarks.scaling`` results.json: report.md, results.csv and plots, pure functions of the
records (``--from`` reproduces them)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import report
from benchmarks.report import _table, fmt
from ftcluster.records import Summary

EFFICIENCY = ("Scaling efficiency: tokens/s per GPU on N GPUs ÷ tokens/s per GPU on the fewest GPUs the same run "
              "was measured on (one GPU where it was; the count is in brackets); 1.00 is perfect. Step-time "
              "efficiency: the same ratio from the median step time, which every GPU spends on the same padded shape "
              "(micro batch × sequence length). Tokens/s: real tokens in packed rows per second over all GPUs, over "
              "the logging windows after the first.")


def estimated(rec: dict, commit: str | None) -> tuple[float | None, float | None]:
    """The memory estimator's (allocated, device) GiB per GPU for the run's own config, as the code of ``commit``
    (where it was measured) ran it."""
    from benchmarks import calibration
    from ftcluster import estimate as E
    from ftcluster import plan as P
    from ftcluster.hardware import Hardware

    try:
        cfg = calibration.config_of(rec["command"])
        run = calibration.run_of(cfg, commit) if commit else P.estimator_run(
            cfg, P.make(cfg, Hardware.gpu(), read_data=False))
        e = E.estimate(P.architecture(cfg).shape, run)
    except (ValueError, SystemExit, KeyError, TypeError):
        return None, None
    return e.allocated / E.GiB, e.device / E.GiB


def rows(results: dict) -> list[dict]:
    """One row per run, in plan order, with its efficiency against the same variant on one GPU."""
    out = []
    for r in results["records"]:
        m = Summary.from_json(r.get("metrics") or {})
        tok = m.tokens_per_s_total if r["status"] == "ok" else None
        est_alloc, est_device = estimated(r, results["provenance"].get("git_commit")) if r["status"] == "ok" \
            else (None, None)
        out.append({"variant": r["variant"], "gpus": r["gpus"], "status": r["status"], "error": r.get("error"),
                    "tokens_per_s": tok, "tokens_per_s_per_gpu": tok / r["gpus"] if tok else None,
                    "peak_allocated_gib": m.peak_allocated_gib, "peak_device_gib": m.peak_device_used_gib,
                    "estimated_allocated_gib": est_alloc, "estimated_device_gib": est_device,
                    "step_time_s": m.step_time_s, "time_to_first_step_s": m.time_to_first_step_s,
                    "mfu_pct": 100 * m.mfu if m.mfu is not None else None})
    for r in out:
        base = min((b for b in out if b["variant"] == r["variant"] and b["tokens_per_s"]), key=lambda b: b["gpus"],
                   default=None)
        ok = base is not None and r["tokens_per_s"] and base["gpus"] < r["gpus"] or base is r
        r["base_gpus"] = base["gpus"] if ok else None
        r["efficiency"] = (r["tokens_per_s"] / r["gpus"]) / (base["tokens_per_s"] / base["gpus"]) if ok else None
        r["step_efficiency"] = base["step_time_s"] / r["step_time_s"] if ok and r["step_time_s"] else None
    return out


def stage_ratios(table: list[dict]) -> list[dict]:
    """ZeRO-3 against ZeRO-2 of the same method on the same GPU count, where both ran."""
    by = {(r["variant"], r["gpus"]): r for r in table if r["tokens_per_s"]}
    out = []
    for (variant, n), z3 in by.items():
        method, _, stage = variant.partition("@")
        z2 = by.get((f"{method}@zero2", n))
        if stage == "zero3" and z2:
            out.append({"method": method, "gpus": n, "zero3": z3["tokens_per_s"], "zero2": z2["tokens_per_s"],
                        "ratio": z3["tokens_per_s"] / z2["tokens_per_s"],
                        "step_ratio": z2["step_time_s"] / z3["step_time_s"] if z3["step_time_s"] else None,
                        "zero3_gib": z3["peak_allocated_gib"], "zero2_gib": z2["peak_allocated_gib"]})
    return out


def markdown(results: dict) -> str:
    suite, prov = results["suite"], results["provenance"]
    gpus = prov.get("gpus") or []
    hardware = (f"{len(gpus)}× {gpus[0]['name']} ({gpus[0]['memory_gib']} GiB), driver {prov.get('driver')}, "
                f"CUDA {prov.get('cuda')}" if gpus else f"CPU only ({prov.get('cpu_count')} cores)")
    v = prov.get("versions", {})
    table = rows(results)
    sets = results.get("settings", {}).get("sets") or []
    overridden = f" Every run overrides it with `{' '.join(sets)}`." if sets else ""
    lines = [f"# {suite['name']}: scaling over GPUs", "",
             f"{suite['description']}. Recipe `{suite['recipe']}`.{overridden}", "",
             f"- **Hardware**: {hardware}", f"- **Date**: {prov.get('date')}", f"- **Command**: `{prov.get('command')}`",
             f"- **Commit**: `{prov.get('git_commit')}`{' (with uncommitted changes)' if prov.get('git_dirty') else ''}",
             "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items() if val)]
    for more in prov.get("more_invocations", []):
        lines.append(f"- **Also**: `{more['command']}` ({more['date']}, commit `{more['git_commit']}`)")
    lines += [f"- **Note**: {note}" for note in prov.get("notes", [])]
    lines += ["", "## Runs", ""]
    body = [[r["variant"], str(r["gpus"]),
             fmt(r["tokens_per_s"], None, 0) if r["status"] == "ok" else f"**{r['status']}**: {r['error']}",
             fmt(r["tokens_per_s_per_gpu"], None, 0),
             fmt(r["efficiency"], None, 2) + (f" ({r['base_gpus']})" if r["base_gpus"] else ""),
             fmt(r["step_efficiency"], None, 2),
             fmt(r["peak_allocated_gib"]), fmt(r["estimated_allocated_gib"]), fmt(r["peak_device_gib"]),
             fmt(r["estimated_device_gib"]), fmt(r["step_time_s"], None, 3, " s"),
             fmt(r["time_to_first_step_s"], None, 1, " s"), fmt(r["mfu_pct"], None, 1, "%")] for r in table]
    lines += _table(["Run", "GPUs", "Tokens/s (all GPUs)", "Tokens/s per GPU", "Scaling efficiency",
                     "Step-time efficiency",
                     "Peak allocated per GPU (GiB)", "Estimated", "Peak NVML per GPU (GiB)", "Estimated",
                     "Step time", "Time to first step", "MFU (measured matmul)"], body)
    lines += ["", EFFICIENCY + " Peak allocated: torch's peak allocation, largest over the GPUs; NVML: device "
              "memory in use as NVML reports it (CUDA context, NCCL and paged optimizer state included). Estimated: "
              "`python -m ftcluster estimate` for the run's own config (ftcluster/estimate.py)."]
    ratios = stage_ratios(table)
    if ratios:
        lines += ["", "## ZeRO-3 against ZeRO-2", ""]
        lines += _table(["Method", "GPUs", "ZeRO-3 tokens/s", "ZeRO-2 tokens/s", "ZeRO-3 ÷ ZeRO-2 (tokens/s)",
                         "ZeRO-3 ÷ ZeRO-2 (step time)", "ZeRO-3 peak allocated (GiB)", "ZeRO-2 peak allocated (GiB)"],
                        [[x["method"], str(x["gpus"]), fmt(x["zero3"], None, 0), fmt(x["zero2"], None, 0),
                          fmt(x["ratio"], None, 2, "×"), fmt(x["step_ratio"], None, 2, "×"), fmt(x["zero3_gib"]),
                          fmt(x["zero2_gib"])] for x in ratios])
        lines += ["", "Both stages draw the same rows at the same steps (same seed and GPU count), so the two ratios "
                  "differ only by how each run's step times spread around their median."]
    lines += ["", "## Plots", "", "![scaling](scaling.png)"]
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in rows(results) if r["tokens_per_s"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for variant in dict.fromkeys(r["variant"] for r in table):
        mine = sorted((r for r in table if r["variant"] == variant), key=lambda r: r["gpus"])
        n = [r["gpus"] for r in mine]
        line, = a1.plot(n, [r["tokens_per_s"] for r in mine], marker="o", label=variant)
        one = next((r["tokens_per_s"] for r in mine if r["gpus"] == 1), None)
        if one:
            a1.plot(n, [one * k for k in n], linestyle=":", color=line.get_color())
        a2.plot(n, [r["peak_allocated_gib"] or 0 for r in mine], marker="o", label=variant)
    a1.set_xlabel("GPUs")
    a1.set_ylabel("tokens/s (all GPUs)")
    a1.set_title("Throughput (dotted: N × one GPU)")
    a1.legend(fontsize=8)
    a2.set_xlabel("GPUs")
    a2.set_ylabel("peak allocated per GPU (GiB)")
    a2.set_title("Memory per GPU")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def render(results: dict, out: Path) -> None:
    """Write results.json, results.csv, report.md and scaling.png into ``out``."""
    report.render(results, out, plot, markdown)
