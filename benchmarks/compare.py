"""Full fine-tuning, LoRA and QLoRA on the same model and data, through the real framework, side by side:
memory, time and quality, written to ``reports/<suite>/<date>-<hardware>/``.

    python -m benchmarks.compare                                   # the default suite, all three methods
    python -m benchmarks.compare --repeats 3                       # each at its best grid point, 3 seeds
    python -m benchmarks.compare --suite llama-7b --methods lora,qlora --baseline hf
    python -m benchmarks.compare --suite nemo-shape --baseline hf,unsloth            # LoRA at NeMo's setting
    python -m benchmarks.compare --from reports/default/<dir>/results.json     # re-render only

Every run is its own process (``python -m ftcluster.train``, the command users run), so memory accounting
starts clean; then the trained model is scored in another (``benchmarks.quality``), and with ``--baseline hf``
the plain Hugging Face recipe runs the same shapes (``benchmarks.hf_baseline``). ``results.json`` is rewritten
after every run: a failure is recorded with its error, and nothing measured before it is lost.

With ``--tune lr`` (the default on a suite with a grid) each method first runs every point of its grid (learning
rates, and LoRA ranks where the suite lists them) once, scored on validation rows carved from the training data
(``data.validation_fraction``: the test rows are never read), and its seeds then run at the best point and are
scored on the test rows. A suite with several tasks runs all of this on each.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import report, suites
from ftcluster import records

ROOT = Path(__file__).resolve().parents[1]  # recipes are named relative to the repository


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def hardware_slug() -> str:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower()
        short = next((w for w in re.split(r"[\s_-]+", name) if re.fullmatch(r"[a-z]?\d{2,4}[a-z]?", w)), "gpu")
        return f"{gpu_count()}x{short}"
    return f"cpu{os.cpu_count()}"


def provenance(argv: list[str], module: str = "benchmarks.compare") -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "ray", "datasets", "accelerate",
                "liger-kernel", "unsloth"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    out = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", module, *argv]),
        # A host that receives a copy of the tree without its history (the GPU host) is told the commit.
        "git_commit": os.environ.get("FTCLUSTER_COMMIT") or git("rev-parse", "HEAD") or None,
        "git_dirty": False if os.environ.get("FTCLUSTER_COMMIT") else
        bool(git("status", "--porcelain", "--untracked-files=no")),
        "host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "versions": versions,
        "cuda": torch.version.cuda, "gpus": [],
    }
    if torch.cuda.is_available():
        import pynvml

        pynvml.nvmlInit()
        out["driver"] = pynvml.nvmlSystemGetDriverVersion()
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
    return out


def stream(cmd: list[str], log: Path, label: str, run_dir: Path | None = None,
           env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``cmd`` with its output in ``log``; echo the progress of the training run in ``run_dir`` (its records,
    as they are written) under ``label``. (exit code, output tail)"""
    tail: list[str] = []
    # A resumed run's earlier lines are not shown again; one that trains steps again replaces their lines, so
    # what is new is told by when it was written.
    shown = max((line.time for line in records.read_lines(run_dir)), default=0.0) if run_dir else 0.0
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        for text in proc.stdout:
            fh.write(text)
            tail = (tail + [text.rstrip()])[-300:]
            if text.startswith(SCORING) or PHASE.match(_plain(text)):
                print(f"  {label}  {_plain(text).rstrip()}", flush=True)
            elif run_dir and "step" in text:  # the driver prints a line per record: look for new ones then
                for line in records.read_lines(run_dir):
                    if line.time > shown:
                        print(f"  {label}  {records.progress_line(line)}", flush=True)
                        shown = line.time
        code = proc.wait()
    return code, "\n".join(tail)


PHASE = re.compile(r"(install|checks|cluster|data|model|engine|memory|first step|resumed from|already finished|"
                   r"compiled layers|Liger kernels|error)\b.*?:")
"""The trainer's lines for its phases (each says what it did and how long it took), shown as the run goes: the
progress lines come from its records instead."""


def _plain(text: str) -> str:
    """A trainer's line without Ray's prefix and colours (``(RayTrainWorker pid=12) ...``)."""
    return re.sub(r"^(\(\w+ pid=\d+[^)]*\)\s*)", "", re.sub(r"\x1b\[[0-9;]*m", "", text))


WRAPPERS = re.compile(r"(WorkerGroupError|RayTaskError|TrainingFailedError|ControllerError|RayActorError)")


def error_of(tail: str) -> str:
    """The line of a failed run's output that says what went wrong: the last Python exception line
    (``torch.OutOfMemoryError: CUDA out of memory...``), else the last line that mentions an error."""
    raw = [l for l in tail.splitlines() if l.strip()]
    lines = [l.strip() for l in raw]
    exceptions = [l for l in lines if re.search(r"^(\S+ )?[\w.]*(Error|Exception|Exit|Interrupt)\b: \S", l)]
    # Ray wraps a worker's exception in its own; the worker's is the cause.
    exceptions = [l for l in exceptions if not WRAPPERS.search(l)] or exceptions
    mentions = [l for l in lines if re.search(r"(Error|Exception|error:|Killed|OutOfMemory)", l)]
    line = next(iter(exceptions[::-1] or mentions[::-1] or lines[::-1]), "no output")
    if line.endswith(":") and line in lines:
        # A message continued on the indented lines below it (a refused config names its fields there).
        at = len(lines) - 1 - lines[::-1].index(line)
        for more in raw[at + 1:]:
            if not more[:1].isspace():
                break
            line += " " + more.strip()
    return line[:500]


SCORING = "scoring: "  # benchmarks.quality's progress lines (quality.SAY; that module imports torch, this one not)


def trim_run(run_dir: Path) -> int:
    """Delete a measured run's checkpoints and final weights, which the report needs only the sizes of (a full
    fine-tuning checkpoint is most of a benchmark's disk use). Returns the bytes freed."""
    freed = 0
    for path in [*run_dir.glob("checkpoint_*"), run_dir / "final", run_dir / "exports"]:
        if path.is_dir():
            freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path)
    return freed


class Harness:
    def __init__(self, suite: suites.Suite, work: Path, user_sets: list[str], results_path: Path, meta: dict,
                 keep_runs: bool = False):
        self.suite, self.work, self.results_path, self.keep_runs = suite, work, results_path, keep_runs
        self.user_sets = user_sets
        self.lock = threading.Lock()  # --jobs: runs finish, and are recorded, from several threads
        self.shared: dict[str, str] = {}  # the environment of a run that shares the machine (set by Pool)
        self.results = {"suite": {"name": suite.name, "description": suite.description, "recipe": suite.recipe,
                                  "quality": suite.quality}, "provenance": meta, "records": []}

    def overrides(self, method: str, task: str | None = None) -> list[str]:
        mine = [s.split(":", 1)[1] for s in self.user_sets if s.startswith(f"{method}:")]
        common = [s for s in self.user_sets if not re.match(r"^(full|lora|qlora|base):", s)]
        return [*self.suite.overrides(method, task), *common, *mine]

    @property
    def tasks(self) -> tuple[str | None, ...]:
        return self.suite.tasks or (None,)

    def name(self, what: str, task: str | None) -> str:
        """A run's name (and its logs' and score's): prefixed by its task where the suite has several."""
        return f"{task_slug(task)}-{what}" if len(self.tasks) > 1 else what

    def validation(self) -> tuple[str, ...]:
        """What a grid point's runs add: evaluate on validation rows carved from the training data."""
        return (f"data.validation_fraction={self.suite.validation_fraction}",)

    def record(self, rec: dict) -> dict:
        with self.lock:
            self.results["records"].append(rec)
            self.results_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.results_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.results, indent=2))
            tmp.replace(self.results_path)
        return rec

    def execute(self, kind: str, method: str, seed: int | None, cmd: list[str], label: str,
                result_file: Path | None, shared: bool = False) -> dict:
        """Run one process. ``shared``: it runs beside others (``--jobs``), so its time and device memory are not
        its own; the report leaves them out."""
        log = self.work / (re.sub(r"[^\w.]+", "-", label.split("] ", 1)[-1]).strip("-") + ".log")
        started = time.time()
        code, tail = stream(cmd, log, label, result_file.parent if kind == "train" else None,
                            self.shared if shared else None)
        rec = {"kind": kind, "method": method, "seed": seed, "command": " ".join(shlex.quote(c) for c in cmd),
               "log": str(log), "process_wall_s": round(time.time() - started, 1)}
        if shared:
            rec["shared"] = True
        if code == 0 and (result_file is None or result_file.exists()):
            rec["status"] = "ok"
            rec["metrics"] = records.Summary.read(result_file.parent).to_json() if kind == "train" else \
                json.loads(result_file.read_text()) if result_file else {}
        else:
            rec.update(status="failed", exit_code=code, error=error_of(tail))
            print(f"  {label}  FAILED (exit {code}): {rec['error']}", flush=True)
        return rec

    def config_hash(self, method: str, seed: int, extra: tuple[str, ...] = (), task: str | None = None) -> str | None:
        """The run's whole config, where it writes aside: a resumed harness reruns a run whose any setting changed
        (speed and memory depend on what a run's identity leaves out, its micro batch and kernels)."""
        import hashlib

        from ftcluster import config as C

        try:
            cfg = C.load(ROOT / self.suite.recipe, [*self.overrides(method, task), *extra, f"training.seed={seed}"])
        except C.ConfigError:
            return None
        body = json.dumps(cfg.model_dump(mode="json", exclude={"output"}), sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    def train(self, method: str, seed: int, label: str, extra: tuple[str, ...] = (), name: str | None = None,
              task: str | None = None, curve: bool = False, shared: bool = False) -> dict:
        """One training run of ``method`` on ``task`` (``extra`` overrides go last; ``name`` tells runs of one
        method apart), then its scoring (``score``)."""
        return self.score(self.train_only(method, seed, label, extra, name, task, curve, shared), label)

    def train_only(self, method: str, seed: int, label: str, extra: tuple[str, ...] = (), name: str | None = None,
                   task: str | None = None, curve: bool = False, shared: bool = False) -> dict:
        """The training run alone: its record, for ``score`` to finish. ``curve``: it exports the model every
        ``suite.quality_every`` steps, for ``score`` to score each."""
        name = name or self.name(f"{method}-seed{seed}", task)
        # A run of this name left by an interrupted or failed invocation would be resumed, and its earlier lines
        # would enter this one's figures: every measured run starts clean.
        shutil.rmtree(self.work / "runs" / name, ignore_errors=True)
        curve = curve and self.suite.quality and self.suite.quality_every > 0
        if curve:
            extra = (*extra, f"training.export_every={self.suite.quality_every}")
        cmd = [sys.executable, "-m", "ftcluster.train", "--config", self.suite.recipe, *self.overrides(method, task),
               *extra, f"training.seed={seed}", f"output.storage_path={self.work / 'runs'}", f"output.name={name}"]
        rec = self.execute("train", method, seed, cmd, label, self.work / "runs" / name / "summary.json", shared)
        rec.update(config_hash=self.config_hash(method, seed, extra, task), task=task,
                   run_dir=str(self.work / "runs" / name))
        rec["_score"] = {"name": name, "extra": extra, "curve": curve, "shared": shared}
        return rec

    def score(self, rec: dict, label: str, shared: bool | None = None) -> dict:
        """Score a ``train_only`` record's model (and, for a curve, each export), then delete its weights unless
        ``keep_runs``. ``shared``: the scoring runs beside other runs (default: as the training did)."""
        todo = rec.pop("_score")
        shared = todo["shared"] if shared is None else shared
        name, extra, task, method, seed = todo["name"], todo["extra"], rec["task"], rec["method"], rec["seed"]
        run_dir = Path(rec["run_dir"])
        if rec["status"] == "ok":
            rec["metrics"]["losses"] = rec["metrics"].get("losses") or []
            rec["metrics"]["eval_loss_in_training"] = rec["metrics"].pop("eval_loss", None)
            rec["metrics"].pop("eval_perplexity", None)
            if self.suite.quality and rec["metrics"].get("final_model"):
                q = self.quality(method, seed, Path(rec["metrics"]["final_model"]), f"{label} quality", name,
                                 extra, task, shared)
                rec["quality"] = q.get("metrics") if q["status"] == "ok" else {"error": q.get("error")}
                if todo["curve"] and q["status"] == "ok":
                    rec["quality_curve"] = self.curve(method, seed, run_dir, rec, label, name, extra, task, shared)
            if not self.keep_runs:
                freed = trim_run(run_dir)
                if freed:
                    print(f"  {label}  removed its checkpoints and final weights ({freed / 1e6:,.0f} MB; the report "
                          "keeps their sizes; --keep-runs keeps them)", flush=True)
        return rec

    def curve(self, method: str, seed: int, run_dir: Path, rec: dict, label: str, name: str,
              extra: tuple[str, ...], task: str | None, shared: bool = False) -> list[dict]:
        """The run's quality at each export and at the end: step, tokens seen, seconds since the process started
        (what a user waits), task score and answer loss."""
        lines = {line.step: line for line in records.read_lines(run_dir)}
        first = min((l.first_step_unix for l in lines.values() if l.first_step_unix), default=None)
        to_first = rec["metrics"].get("time_to_first_step_s")

        def point(step: int, quality: dict) -> dict:
            line = lines.get(step)
            seconds = (to_first + line.time - first) if line and first and to_first is not None else None
            return {"step": step, "tokens_seen": line.tokens_seen if line else None,
                    "time_s": round(seconds, 1) if seconds is not None else None,
                    "task_score": quality.get("task_score"), "eval_loss": quality.get("eval_loss")}

        out = []
        for export in sorted((run_dir / "exports").glob("step*")):
            step = int(export.name.removeprefix("step"))
            q = self.quality(method, seed, export, f"{label} quality at step {step}", f"{name}-step{step}", extra,
                             task, shared)
            if q["status"] == "ok":
                out.append(point(step, q["metrics"]))
        final_step = rec["metrics"].get("final_step")
        if final_step is not None:
            out.append(point(final_step, rec["quality"]))
        return out

    def quality(self, method: str, seed: int, trained: Path | None, label: str, tag: str,
                extra: tuple[str, ...] = (), task: str | None = None, shared: bool = False) -> dict:
        """Score ``trained`` (None: the base model, with ``method``'s settings) into ``quality-<tag>.json``, on the
        evaluation rows the run's own config names (validation rows for a grid point's run)."""
        out = self.work / f"quality-{tag}.json"
        cmd = [sys.executable, "-m", "benchmarks.quality", "--config", self.suite.recipe, "--out", str(out)]
        if trained is not None:
            cmd += ["--trained", str(trained)]
        if self.suite.eval_examples:
            cmd += ["--max-examples", str(self.suite.eval_examples)]
        cmd += [*self.overrides(method, task), *extra, f"training.seed={seed}"]
        return {**self.execute("quality", method, seed, cmd, label, out, shared), "task": task}

    def hf_baseline(self, method: str, label: str, recipe: str = "hf") -> dict:
        out = self.work / f"{recipe}-{method}.json"
        cmd = [sys.executable, "-m", "benchmarks.hf_baseline", "--config", self.suite.recipe, "--recipe", recipe,
               "--steps", str(self.suite.hf_steps), "--out", str(out), *self.overrides(method, self.tasks[0]),
               *self.suite.peer]
        return {**self.execute("hf", method, None, cmd, label, out), "recipe": recipe, "task": self.tasks[0]}


@dataclass(frozen=True)
class Planned:
    kind: str  # base | tune | train | hf | ablation
    method: str
    seed: int | None
    recipe: str | None = None  # the peer recipe of an hf run
    change: str | None = None  # an ablation's override, or a grid point's (space-separated)
    task: str | None = None


def task_slug(task: str | None) -> str:
    return re.sub(r"[^\w]+", "-", (task or "recipe").removeprefix("builtin:")).strip("-")


def tuning(text: str | None, suite: suites.Suite) -> bool:
    """Whether each method's grid runs first (``--tune``): by default where the suite has a grid and scores
    quality."""
    if text is None:
        return bool(suite.grid) and suite.quality
    if text == "none":
        return False
    if text != "lr":
        raise SystemExit(f"--tune {text}: choose lr (the suite's grid of learning rates and ranks) or none")
    if not suite.grid or not suite.quality:
        raise SystemExit(f"--tune lr: suite {suite.name} has " + ("no grid" if suite.quality else
                         "random weights, whose quality means nothing") + "; use --tune none")
    return True


def methods_of(text: str | None, suite: suites.Suite) -> list[str]:
    """``--methods``, or the methods the suite lists (a suite made for one method runs only it)."""
    methods = [m for m in text.split(",") if m] if text else list(suite.methods) or list(suites.METHODS)
    unknown = [m for m in methods if m not in suites.METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(suites.METHODS)}")
    return methods


def parse_baselines(text: str) -> list[str]:
    from benchmarks.hf_baseline import RECIPES

    peers = [] if text == "none" else [p for p in text.split(",") if p]
    unknown = [p for p in peers if p not in RECIPES]
    if unknown:
        raise SystemExit(f"--baseline: unknown {unknown}; choose from none, {', '.join(RECIPES)} (comma-separated)")
    return peers


class Pool:
    """``--jobs N``: what the report shows no time or device memory of (base scores, grid points, the seeds after
    the first, every scoring) runs N at a time; a timed run waits for all of it and runs alone, and its scoring
    waits (``later``) until the timed runs are over. With N=1 everything runs in turn, as it comes."""

    def __init__(self, jobs: int, harness: Harness):
        from concurrent.futures import ThreadPoolExecutor

        self.shares = jobs > 1
        self.executor = ThreadPoolExecutor(jobs) if self.shares else None
        self.running, self.waiting = [], []
        if self.shares:
            # Each process would take every core for its CPU work (tokenizing, the optimizer on CPU): split them.
            harness.shared = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}

    def submit(self, fn) -> None:
        if self.executor is None:
            fn()
        else:
            self.running.append(self.executor.submit(fn))

    def later(self, fn) -> None:
        if self.executor is None:
            fn()
        else:
            self.waiting.append(fn)

    def release(self) -> None:
        for fn in self.waiting:
            self.submit(fn)
        self.waiting = []

    def drain(self) -> None:
        for future in self.running:
            future.result()  # a harness error in a thread ends the invocation, as it would without --jobs
        self.running = []


def untimed(h: Harness, item: Planned, label: str, tune: bool, first_seed: int, shared: bool) -> dict:
    """A base score, a grid point or a seed after the first: quality only."""
    if item.kind == "base":
        return {**h.quality("lora", first_seed, None, label, h.name("base", item.task), task=item.task,
                            shared=shared), "kind": "base", "method": "base"}
    if item.kind == "tune":
        slug = re.sub(r"[^\w.]+", "-", item.change).strip("-")
        return {**h.train(item.method, item.seed, label, extra=(*item.change.split(), *h.validation()),
                          name=h.name(f"{item.method}-tune-{slug}", item.task), task=item.task, shared=shared),
                "kind": "tune", "change": item.change}
    point = report.chosen_point(h.results["records"], item.task, item.method) if tune else None
    return {**h.train(item.method, item.seed, label, extra=tuple(point.split()) if point else (), task=item.task,
                      shared=shared), "setting": point}


def run(args, argv: list[str]) -> Path:
    gpus = gpu_count()
    suite = suites.get(args.suite, gpu=gpus > 0)
    if args.skip_quality:
        suite = dataclasses.replace(suite, quality=False)
    if args.tasks:
        from ftcluster import config as C

        chosen = tuple(t for t in args.tasks.split(",") if t)
        for task in chosen:
            try:
                C.load(ROOT / suite.recipe, [f"data.source={task}"])
            except C.ConfigError as e:
                raise SystemExit(f"--tasks {task}: {e}") from None
        suite = dataclasses.replace(suite, tasks=chosen)
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: give 1 or more")
    methods = methods_of(args.methods, suite)
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    out = Path(args.out or f"reports/{suite.name}/{stamp}-{hardware_slug()}")
    work = Path(args.work or f"runs/bench/{suite.name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    tune = tuning(args.tune, suite)
    h = Harness(suite, work, args.set, out / "results.json", provenance(argv), keep_runs=args.keep_runs)
    h.results["suite"]["tasks"] = list(h.tasks)
    h.results["settings"] = {"methods": methods, "repeats": args.repeats, "baseline": args.baseline,
                             "sets": args.set, "work_dir": str(work), "tune": tune, "jobs": args.jobs,
                             "validation_fraction": suite.validation_fraction if tune else None}
    done = set()
    if args.resume and (out / "results.json").exists():
        # Keep what an interrupted invocation of the same command measured; run only what is missing.
        previous = json.loads((out / "results.json").read_text())
        kept = [r for r in previous["records"] if r["status"] == "ok"]
        h.results["records"] = kept
        h.results["provenance"]["resumed_from"] = previous["provenance"]
        if previous["provenance"].get("notes"):  # notes on the kept runs (added to results.json) stay with them
            h.results["provenance"]["notes"] = previous["provenance"]["notes"]
        done = {Planned(r["kind"], r["method"], r.get("seed"), r.get("recipe", "hf") if r["kind"] == "hf" else None,
                        r.get("change"), r.get("task")) for r in kept}
    seeds = [42 + i for i in range(args.repeats)]
    peers = parse_baselines(args.baseline)
    # First what only scores quality (base models, grid points), then the timed runs (each method's first seed,
    # its ablations and the peers: speed, memory and time to quality come from these), then the other seeds.
    early, timed, late = [], [], []
    for task in h.tasks:
        first = task == h.tasks[0]
        if suite.quality and not args.skip_base:
            early.append(Planned("base", "base", seeds[0], task=task))
        for method in methods:
            if tune:
                early += [Planned("tune", method, seeds[0], change=" ".join(point), task=task)
                          for point in suite.grid.get(method, ())]
            timed.append(Planned("train", method, seeds[0], task=task))
            late += [Planned("train", method, s, task=task) for s in seeds[1:]]
            if first:  # speed, memory and the peers: measured on the first task
                timed += [Planned("ablation", method, seeds[0], change=change, task=task) for change in args.ablate]
                timed += [Planned("hf", method, None, recipe, task=task) for recipe in peers
                          if recipe != "hf-tuned" or method == "qlora"]  # hf-tuned differs from hf only for QLoRA
    plan = early + timed + late
    pool = Pool(args.jobs, h)
    print(f"benchmarks.compare: suite {suite.name} ({suite.description}); {len(plan)} runs"
          + (f", up to {args.jobs} at a time where the report shows no time or memory" if args.jobs > 1 else "")
          + f"; logs in {work}", flush=True)
    deadline = time.time() + args.time_limit if args.time_limit else None
    unstarted, timed_ran = [], False
    for i, item in enumerate(plan, 1):
        label = " ".join(x for x in (f"[{i}/{len(plan)}]", task_slug(item.task) if len(h.tasks) > 1 else "",
                                     item.recipe or item.kind, item.method,
                                     f"seed {item.seed}" if item.kind == "train" else item.change or "") if x)
        if item in done:
            print(f"{label}\n  measured by the interrupted run: kept", flush=True)
            continue
        if deadline and time.time() > deadline:
            unstarted.append(label)
            continue
        print(label, flush=True)
        need = suite.gpus.get(item.method, 1)
        if item.kind != "base" and need > 1 and gpus < need:
            h.record({"kind": item.kind, "method": item.method, "seed": item.seed, "recipe": item.recipe,
                      "status": "skipped", "error": f"needs {need} GPUs, this machine has {gpus}"})
            continue
        if item in timed:
            pool.drain()  # it runs alone; for the first, the grid also decides its setting
            timed_ran = True
            if item.kind == "train":
                point = report.chosen_point(h.results["records"], item.task, item.method) if tune else None
                if point is not None:
                    print(f"  at {point} (the best of its grid on validation rows)", flush=True)
                rec = {**h.train_only(item.method, item.seed, label, extra=tuple(point.split()) if point else (),
                                      task=item.task, curve=True), "setting": point}
                pool.later(lambda rec=rec, label=label: h.record(h.score(rec, label, shared=pool.shares)))
            elif item.kind == "ablation":
                slug = re.sub(r"[^\w]+", "-", item.change).strip("-")
                h.record({**h.train(item.method, item.seed, label, extra=(item.change,), name=f"{item.method}-{slug}",
                                    task=item.task), "kind": "ablation", "change": item.change})
            else:
                h.record(h.hf_baseline(item.method, label, item.recipe))
            continue
        if late and item is late[0] and not timed_ran:
            pool.drain()  # grid points rerun by --resume decide the seeds' settings
        pool.release()  # the timed runs are over: their scoring joins the pool
        pool.submit(lambda item=item, label=label: h.record(untimed(h, item, label, tune, seeds[0], pool.shares)))
    pool.release()
    pool.drain()
    if unstarted:
        print(f"benchmarks.compare: --time-limit {args.time_limit:g} s reached; {len(unstarted)} runs not started "
              f"(the first: {unstarted[0]}); rerun the same command with --resume to run them", flush=True)
    report.render(h.results, out)
    print(f"report: {out / 'report.md'}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="default", help=f"one of {', '.join(suites.SUITES)}")
    p.add_argument("--methods", help="comma-separated (default: the methods the suite lists)")
    p.add_argument("--repeats", type=int, default=1, help="seeds per method (mean ± std in the report)")
    p.add_argument("--tasks", metavar="SOURCE[,SOURCE]",
                   help="the data sources each method is trained and scored on, in turn (default: the suite's; "
                        "e.g. builtin:extract-json, or a local file)")
    p.add_argument("--tune", choices=("lr", "none"), default=None,
                   help="lr: run each method's grid from the suite (learning rates, LoRA ranks) first, scored on "
                        "validation rows carved from the training data, and run its seeds at the best point; "
                        "default: lr on suites with a grid")
    p.add_argument("--baseline", default="none", metavar="none|hf[,hf-tuned,unsloth]",
                   help="peers timed on the same shapes: hf, the plain transformers + PEFT + bitsandbytes recipe; "
                        "hf-tuned, the same without prepare_model_for_kbit_training's float32 upcast (QLoRA); "
                        "unsloth, Unsloth's FastLanguageModel (needs unsloth installed and a CUDA GPU)")
    p.add_argument("--set", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                   help="a config override for every run, or for one method's runs (e.g. qlora:lora.r=8)")
    p.add_argument("--ablate", action="append", default=[], metavar="KEY=VALUE",
                   help="run each method once more with this override (e.g. model.liger_kernel=off): a row of the "
                        "report's ablation table (repeatable)")
    p.add_argument("--skip-base", action="store_true", help="do not score the base model before fine-tuning")
    p.add_argument("--skip-quality", action="store_true", help="measure speed and memory only: score no model")
    p.add_argument("--out", help="report directory (default reports/<suite>/<date>-<hardware>)")
    p.add_argument("--work", help="where runs, logs and checkpoints go (default runs/bench/<suite>-<time>)")
    p.add_argument("--keep-runs", action="store_true",
                   help="keep each run's checkpoints and final model under --work (deleted once measured and scored)")
    p.add_argument("--resume", action="store_true",
                   help="keep the successful runs already in <out>/results.json and run only the rest")
    p.add_argument("--jobs", type=int, default=1,
                   help="run up to this many of the runs whose time and memory the report does not show (grid "
                        "points, base scores, seeds after the first, scoring) at once on this machine; timed runs "
                        "always run alone")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="start no run after this many seconds (for a time-limited allocation): the report has what "
                        "finished, and --resume runs the rest")
    p.add_argument("--from", dest="from_", type=Path, help="re-render a results.json without running anything")
    args = p.parse_args(argv)
    if args.from_:
        rerender(args.from_, args.out, report.render)
        return
    run(args, argv)


def rerender(results_file: Path, out: str | None, render) -> None:
    """``--from``: render a results.json again, into ``out`` or beside it, running nothing."""
    if not results_file.is_file():
        raise SystemExit(f"--from {results_file}: no such file")
    target = Path(out) if out else results_file.parent
    render(json.loads(results_file.read_text()), target)
    print(f"report: {target / 'report.md'}")


if __name__ == "__main__":
    main()
