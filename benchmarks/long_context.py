"""Long context on one GPU: the longest row that trains, and tokens/s at fixed lengths, for QLoRA and LoRA on the
Llama-3-8B shape (128k vocabulary, random weights), micro batch 1, through the real framework.

    python -m benchmarks.long_context                          # both methods, the search and the fixed lengths
    python -m benchmarks.long_context --methods qlora --start 262144 --lengths none
    python -m benchmarks.long_context --no-search --lengths 16384,32768 --baseline unsloth  # beside Unsloth
    python -m benchmarks.long_context --from reports/long-context/<dir>/results.json   # re-render only

For each method the search doubles the row length from ``--start`` until a try fails (out of memory), then
bisects between the last length that trained and the first that did not until they are within ``--within`` (5%).
A try that fails for another reason (a refused config, a bug) would fail at every length: it ends that method's
tries, and the command exits non-zero once the report is written.
Every try is ``python -m ftcluster.train`` at that ``data.max_seq_len`` for ``--steps`` steps, with the estimator's
prediction (the run's plan) beside what it measured, and the memory savers its plan used (checkpointed layers and
where their checkpoints wait, the loss, attention). Rows are full: documents of synthetic text at least as long as
the row, each cut to one row. ``--set`` adds overrides to every try (e.g. ``model.activation_offloading=on``; by
default each try's plan turns on the memory savers its length needs, ``plan.memory_savers``).

``--baseline unsloth`` (or ``hf``, ``hf-tuned``: ``benchmarks.hf_baseline``'s recipes) runs the peer at each timed
length right after ftcluster's try, on the same model, documents, length, LoRA settings and optimizer, with its own
checkpointing: its rows are the documents cut to the length (run_clm's grouping), its tokens/s and peak from its
steps after the first, one try at a time on the same GPU. The report puts the two side by side.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import compare, report, shapes, suites
from ftcluster import records

RECIPE = "configs/bench/llama2_7b.yaml"
SHAPE = "llama-3-8b"
COMMON = ["model.gradient_checkpointing=true", "training.micro_batch_size=1",
          "lora.r=16", "lora.alpha=32", "lora.target_modules=all-linear", "data.format=text", "data.packing=true",
          "training.log_every=1", "resources.check_fit=false", "output.save_final_model=false"]
METHODS = {"qlora": ["method=qlora", "optimizer.name=paged_adamw_8bit"], "lora": ["method=lora"]}
FIXED = (16384, 32768, 65536, 131072)
SUITE = {"name": "long-context", "kind": "long-context",
         "description": f"{SHAPE} shape (random weights), micro batch 1, LoRA r=16 on every linear layer, "
                        "checkpointed layers, and the memory savers each length's plan turned on"}
"""What ``benchmarks.results`` reads of this harness's results.json."""
TOO_LONG = ("out of memory", "killed")
"""The statuses of a try that failed for its length: a shorter one may train. Any other failure (a refused
config, a bug) would fail at every length, so it ends the method's tries rather than bisecting on."""
OUT_OF_MEMORY = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation",
                           re.IGNORECASE)


def search(trains, start: int, limit: int, within: float = 0.05, unit: int = 1024) -> tuple[int | None, int | None]:
    """(the longest length that trained, the shortest that did not) by doubling from ``start`` (at most ``limit``),
    then bisecting on multiples of ``unit`` until they are within ``within`` of each other. ``trains(length)`` runs
    one try. (None, start) when even ``start`` fails; (the last tried, None) when ``limit`` trains."""
    good, bad, n = None, None, start
    while n <= limit:
        if not trains(n):
            bad = n
            break
        good, n = n, n * 2
    if good is None or bad is None:
        return good, bad
    while (bad - good) / good > within:
        mid = (good + bad) // 2 // unit * unit
        if mid in (good, bad):
            break
        good, bad = (mid, bad) if trains(mid) else (good, mid)
    return good, bad


class TryFailed(Exception):
    """A try failed for a reason other than its length (``TOO_LONG``)."""


def write_documents(path: Path, tokens: int, count: int, seed: int = 0) -> Path:
    """``count`` documents of synthetic text, each of at least ``tokens`` tokens of the shapes' tokenizer (text
    from the builtin corpus, shuffled: about 3 characters a token), as JSON Lines with a ``text`` field."""
    corpus = shapes.corpus()
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(count):
            parts, chars = [], 0
            while chars < 5 * tokens:  # a margin over ~3 characters a token
                parts.append(rng.choice(corpus))
                chars += len(parts[-1]) + 1
            fh.write(json.dumps({"text": " ".join(parts)}) + "\n")
    return path


class Tries:
    """Runs and records the tries of one invocation (``results.json`` rewritten after each)."""

    def __init__(self, args, model: Path, work: Path, out: Path, argv: list[str]):
        self.args, self.model, self.work, self.out = args, model, work, out
        self.results = {"suite": SUITE, "provenance": compare.provenance(argv, "benchmarks.long_context"),
                        "settings": {"steps": args.steps, "within": args.within, "sets": args.set,
                                     "recipe": RECIPE, "model": str(model), "common": COMMON}, "tries": [],
                        "peers": []}

    def documents(self, length: int) -> Path:
        data = self.work / f"docs-{length}.jsonl"
        if not data.exists():
            write_documents(data, length, self.args.steps + 1)
        return data

    def overrides(self, method: str, length: int) -> list[str]:
        """What ftcluster's try and a peer's share: the model, the method's settings, the documents, the length."""
        return [f"model.name_or_path={self.model}", *COMMON, *METHODS[method], *rope(self.model, length),
                f"data.source={self.documents(length)}", f"data.max_seq_len={length}", *self.args.set]

    def run(self, method: str, length: int, purpose: str) -> dict:
        name = f"{method}-{length}"
        cmd = [sys.executable, "-m", "ftcluster.train", "--config", RECIPE, *self.overrides(method, length),
               f"training.max_steps={self.args.steps}",
               f"output.storage_path={self.work / 'runs'}", f"output.name={name}"]
        run_dir = self.work / "runs" / name
        rec, ran = execute(cmd, self.work / f"{name}.log", method=method, length=length, purpose=purpose)
        plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").exists() else {}
        rec.update(estimate_gib=plan.get("memory_gib"), savers=savers(plan))
        if ran and (run_dir / "summary.json").exists():
            s = records.Summary.read(run_dir)
            del rec["error"]
            rec.update(status="ok", tokens_per_s=s.tokens_per_s_total, step_time_s=s.step_time_s,
                       peak_allocated_gib=s.peak_allocated_gib, peak_device_used_gib=s.peak_device_used_gib,
                       peak_rss_gib=s.peak_rss_gib)
        print(f"  {method} {length:,} tokens: {outcome(rec)}; estimated {_num(rec['estimate_gib'], 1)} GiB",
              flush=True)
        self.results["tries"].append(rec)
        self.save()
        if rec["status"] not in ("ok", *TOO_LONG):
            raise TryFailed(rec["error"])
        return rec

    def peer(self, recipe: str, method: str, length: int) -> dict:
        """The peer's recipe at this length (benchmarks.hf_baseline): one untimed step, then the rest timed."""
        name = f"{recipe}-{method}-{length}"
        out = self.work / f"{name}.json"
        cmd = [sys.executable, "-m", "benchmarks.hf_baseline", "--config", RECIPE, "--recipe", recipe,
               "--warmup", "1", "--steps", str(max(1, self.args.steps - 1)), "--out", str(out),
               *self.overrides(method, length)]
        rec, ran = execute(cmd, self.work / f"{name}.log", recipe=recipe, method=method, length=length)
        if ran and out.exists():
            measured = json.loads(out.read_text())
            del rec["error"]
            rec.update(status="ok", tokens_per_s=measured.get("tokens_per_s_total"),
                       **{k: measured.get(k) for k in ("step_time_s", "peak_allocated_gib", "peak_device_used_gib",
                                                       "peak_rss_gib")})
        print(f"  {recipe} {method} {length:,} tokens: {outcome(rec)}", flush=True)
        self.results["peers"].append(rec)
        self.save()
        return rec

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))


def execute(cmd: list[str], log: Path, **what) -> tuple[dict, bool]:
    """Run one try's command with its output in ``log``: its record (``what``, the command, the wall time, and a
    failure's status and error, which the caller replaces with the figures where the try succeeded) and whether the
    command exited 0."""
    started = time.time()
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=compare.ROOT).returncode
    tail = log.read_text()[-20000:]
    status = ("out of memory" if OUT_OF_MEMORY.search(tail)
              else "killed" if code in (-signal.SIGKILL, 128 + signal.SIGKILL) else "failed")
    return {**what, "command": shlex.join(cmd), "log": str(log), "process_wall_s": round(time.time() - started, 1),
            "status": status, "error": compare.error_of(tail) if status != "killed" else
            "killed (SIGKILL: most often the host's out-of-memory killer)"}, code == 0


def outcome(rec: dict) -> str:
    """A try's result, as the progress lines say it."""
    if rec["status"] == "ok":
        return f"ok, {_num(rec['tokens_per_s'], 0)} tokens/s, peak {_num(peak(rec), 1)} GiB"
    return f"{rec['status']} ({rec['error']})"


def rope(model: Path, length: int) -> list[str]:
    """RoPE scaled (YaRN) to reach ``length`` where the model's positions stop short of it: a run past them is
    refused otherwise (plan.check_length)."""
    from ftcluster import config as C, plan as P

    arch = P.architecture(C.load(None, [f"model.name_or_path={model}"]))
    return [P.yarn_override(length, arch)] if P.beyond_positions(length, arch) else []


def savers(plan: dict) -> str:
    """What the run's plan did to save memory at this length."""
    if not plan:
        return ""
    out = []
    if plan.get("checkpointed_layers"):
        out.append(f"{plan['checkpointed_layers']} checkpointed layers"
                   + (" (checkpoints in host memory)" if plan.get("activation_offloading") else ""))
    if plan.get("tiled_mlp"):
        out.append("tiled MLP")
    out.append(f"loss {plan.get('loss')}")
    out.append(f"attention {plan.get('attention')}")
    if plan.get("sequence_parallel", 1) > 1:
        out.append(f"sequence parallel {plan['sequence_parallel']}")
    return ", ".join(out)


def render(results: dict, out: Path) -> None:
    """report.md from results.json."""
    prov, tries = results["provenance"], results["tries"]
    lines = ["# long-context: the longest row that trains on one GPU, and tokens/s by length", "",
             f"- **Model**: `{results['settings']['model']}` (random weights), micro batch 1, LoRA r=16 on every "
             "linear layer; recipe "
             f"`{results['settings']['recipe']}` with `{' '.join(results['settings']['common'])}`",
             f"- **Date**: {prov.get('date')}", f"- **Command**: `{prov.get('command')}`",
             f"- **Commit**: `{prov.get('git_commit')}`", f"- **Hardware**: {report.hardware_line(prov)}",
             f"- **Steps per try**: {results['settings']['steps']}; tokens/s and step time from "
             + ("the steps after the first" if results["settings"]["steps"] > 1 else "the one step (start-up "
                "excluded, its first-step work included)")
             + "; peak: torch's allocated peak on a GPU, the process's RSS on CPU; device peak: the GPU's memory in "
             "use (NVML), which the plan's estimate predicts (its allocated part is in benchmarks/calibration.json)",
             *[f"- **Note**: {note}" for note in prov.get("notes", [])], ""]
    searched = [t for t in tries if t["purpose"] == "search"]
    lines += ["## Longest row", "", "| Method | Longest that trained | Shortest that did not | Tries |",
              "|---|---|---|---|"] if searched else ["## Longest row", "", "Not searched in this invocation "
                                                     "(`--no-search`)."]
    for method in dict.fromkeys(t["method"] for t in searched):
        mine = [t for t in tries if t["method"] == method and t["purpose"] == "search"]
        ok = [t["length"] for t in mine if t["status"] == "ok"]
        too_long = [t["length"] for t in mine if t["status"] in TOO_LONG]
        broken = [t["length"] for t in mine if t["status"] not in ("ok", *TOO_LONG)]
        lines.append(f"| {method} | {max(ok):,} tokens |" if ok else f"| {method} | none |")
        lines[-1] += (f" {min(too_long):,} |" if too_long else
                      f" none: stopped by a try that failed for another reason ({min(broken):,}) |" if broken
                      else " not reached |")
        lines[-1] += f" {len(mine)} |"
    lines += ["", "## Every try", "",
              "| Method | Tokens | Why | Result | Tokens/s | Step (s) | Peak (GiB) | Device peak (GiB) | "
              "Device estimate (GiB) | Memory savers |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(tries, key=lambda t: (t["method"], t["length"])):
        measured = ["—", "—", "—", "—"]
        if t["status"] == "ok":
            measured = [_num(t.get("tokens_per_s"), 0), _num(t.get("step_time_s"), 1), _num(peak(t), 1),
                        _num(t.get("peak_device_used_gib"), 1)]
        cells = [t["method"], f"{t['length']:,}", t["purpose"], t["status"], *measured,
                 _num(t.get("estimate_gib"), 1), t.get("savers") or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += beside_peers(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines) + "\n")


def beside_peers(results: dict) -> list[str]:
    """The peers' tries (``--baseline``) beside ftcluster's at the same method and length."""
    peers = results.get("peers") or []
    if not peers:
        return []
    ours = {(t["method"], t["length"]): t for t in results["tries"]}
    lines = ["", "## Beside the peers", "",
             "The peer's recipe (`benchmarks.hf_baseline --recipe R`) on the same model, documents, length, LoRA "
             "settings and optimizer, with its own memory savers, right after ftcluster's try on the same GPU.", "",
             "| Method | Tokens | Peer | Peer result | Peer tokens/s | ftcluster tokens/s | ftcluster ÷ peer | "
             "Peer peak (GiB) | ftcluster peak (GiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(peers, key=lambda p: (p["method"], p["length"], p["recipe"])):
        t = ours.get((p["method"], p["length"]), {})
        both = p["status"] == "ok" and t.get("status") == "ok" and p.get("tokens_per_s") and t.get("tokens_per_s")
        lines.append("| " + " | ".join([
            p["method"], f"{p['length']:,}", p["recipe"], p["status"] if p["status"] == "ok" else
            f"{p['status']}: {p.get('error', '')[:160]}", _num(p.get("tokens_per_s"), 0),
            _num(t.get("tokens_per_s"), 0) if t.get("status") == "ok" else t.get("status", "not tried"),
            f"{t['tokens_per_s'] / p['tokens_per_s']:.2f}×" if both else "—",
            _num(peak(p), 1), _num(peak(t), 1) if t.get("status") == "ok" else "—"]) + " |")
    return lines


def peak(t: dict) -> float | None:
    """The peak a try measured: torch's allocated peak on a GPU, the process's RSS on CPU."""
    return t.get("peak_allocated_gib") or t.get("peak_rss_gib")


def _num(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="qlora,lora")
    p.add_argument("--start", type=int, default=65536, help="the search's first length (tokens)")
    p.add_argument("--limit", type=int, default=1048576, help="the search's longest length")
    p.add_argument("--within", type=float, default=0.05, help="bisect until the bounds are this close")
    p.add_argument("--lengths", default=",".join(map(str, FIXED)),
                   help="lengths timed whether or not the search tried them (none: skip)")
    p.add_argument("--no-search", action="store_true", help="time --lengths only")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per try")
    p.add_argument("--model", type=Path, help=f"a model directory (default: the {SHAPE} shape)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every try")
    p.add_argument("--baseline", default="none",
                   help="peers timed at each of --lengths beside ftcluster: unsloth, hf, hf-tuned (comma-separated)")
    p.add_argument("--out", type=Path)
    p.add_argument("--work", type=Path)
    p.add_argument("--from", dest="from_", type=Path, help="re-render a results.json, running nothing")
    args = p.parse_args(argv)
    if args.from_:
        render(json.loads(args.from_.read_text()), args.out or args.from_.parent)
        return
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    peers = compare.parse_baselines(args.baseline)
    model = args.model or shapes.ensure(SHAPE, suites.SHAPES_ROOT)
    stamp = dt.datetime.now()
    out = args.out or Path(f"reports/long-context/{stamp:%Y-%m-%d}-{compare.hardware_slug()}")
    work = (args.work or Path(f"runs/bench/long-context-{stamp:%Y%m%d-%H%M%S}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tries = Tries(args, model, work, out, argv)
    fixed = [] if args.lengths == "none" else [int(n) for n in args.lengths.split(",") if n]
    stopped = []
    for method in args.methods.split(","):
        done: dict[int, bool] = {}

        def trains(n: int, purpose: str = "search") -> bool:
            if n not in done:
                done[n] = tries.run(method, n, purpose)["status"] == "ok"
            return done[n]

        try:
            if not args.no_search:
                print(f"{method}: the longest row, from {args.start:,} tokens", flush=True)
                good, bad = search(trains, args.start, args.limit, args.within)
                print(f"{method}: " + (f"{good:,} tokens trained" if good else "no length trained")
                      + (f", {bad:,} did not" if bad else ""), flush=True)
            for n in fixed:
                trains(n, "timed")
                for recipe in peers:
                    tries.peer(recipe, method, n)
        except TryFailed as e:
            stopped.append(method)
            print(f"{method}: a try failed for a reason other than its length ({e}); {method}'s other lengths "
                  "were not tried", flush=True)
    render(tries.results, out)
    print(f"report: {out / 'report.md'}")
    if stopped:
        raise SystemExit(f"stopped early: {', '.join(stopped)} (see each try's log)")


if __name__ == "__main__":
    main()
