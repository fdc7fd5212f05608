"""The fault drill: the CPU recipe (configs/tiny_cpu.yaml) through the three events a cluster deals a run, each
beside the same run left alone, written to ``reports/faults/<date>-<host>/`` (report.md, drill.json, one loss plot
per event).

    python -m benchmarks.faults                        # every event
    python -m benchmarks.faults --events node-loss     # node-loss, sigterm-resume, slurm-requeue
    python -m benchmarks.faults --from reports/faults/<dir>/drill.json   # render again, running nothing

* ``node-loss``: two Ray nodes on this host (``ray start``, one CPU each, one worker each); the run has
  ``scaling.min_workers=1``. The second node is killed (SIGKILL to its processes) mid-run; the run goes on with one
  worker from its last checkpoint; the node is started again and the run grows back to two at a checkpoint.
* ``sigterm-resume``: SIGTERM to the driver of a two-worker run, then the same command with
  ``scaling.num_workers=1``.
* ``slurm-requeue``: the Slurm script on the localhost Slurm of two nodes (launchers/slurm_localhost.sh), SIGTERM
  before its time limit, and the job submitted again with ``sbatch --nodes=1``. Needs slurmctld, slurmd, munge and
  root.

For each event: the time lost (from the event until the run is back at the step it had reached, less the time
those steps took before it), the steps done twice (those after the checkpoint it resumed from), and the loss by
step across it beside the undisturbed run's. The node-loss helpers (``RayNodes``, ``node_loss``) are also what
tests/integration/test_elastic.py runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftcluster import records

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "tiny_cpu.yaml"
BIN = Path(sys.executable).parent
EVENTS = ("node-loss", "sigterm-resume", "slurm-requeue")


# ---------------------------------------------------------------------------------------------------------------
# A Ray cluster of several nodes on one host

class RayNodes:
    """Ray nodes on this host, each a ``ray start --block`` process of its own (its own process group, CPUs and
    address: the host's for the head, which Ray puts for 127.0.0.1, then 127.0.0.2, 127.0.0.3...), so one can be
    killed alone as a lost node is. GCS notices a dead node within about 3 s (health checks every second). Token
    authentication on, as Ray 2.60 has it by default; the drivers run with ``env``."""

    def __init__(self, temp: Path, port: int = 29379):
        self.temp, self.port, self.procs = Path(temp), port, {}
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "RAY_health_check_initial_delay_ms": "1000"}
        self.env.pop("RAY_ADDRESS", None)

    @property
    def address(self) -> str:
        from ray._private.services import get_node_ip_address

        return f"{get_node_ip_address()}:{self.port}"  # where the head's GCS listens: the host's address

    def start(self, index: int, cpus: int = 1) -> None:
        ip, base = f"127.0.0.{index + 1}", self.port + 20 * (index + 1)
        ports = [f"--node-manager-port={base}", f"--object-manager-port={base + 1}",
                 f"--dashboard-agent-listen-port={base + 2}", f"--dashboard-agent-grpc-port={base + 3}",
                 f"--metrics-export-port={base + 4}", f"--runtime-env-agent-port={base + 5}",
                 f"--min-worker-port={base + 200}", f"--max-worker-port={base + 219}"]
        where = ([f"--head", f"--port={self.port}", f"--dashboard-port={self.port + 1}", "--dashboard-host=127.0.0.1",
                  f"--temp-dir={self.temp}"] if index == 0 else [f"--address={self.address}"])
        log = open(self.temp / f"node{index}.log", "a")
        self.procs[index] = subprocess.Popen(
            [BIN / "ray", "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={cpus}",
             "--disable-usage-stats", *where, *ports],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_for_nodes(sum(1 for p in self.procs.values() if p.poll() is None))

    def _wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                 "print(sum(1 for n in ray.nodes() if n['Alive']))")
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = subprocess.run([sys.executable, "-c", probe, self.address], env=self.env, capture_output=True,
                                 text=True)
            if got.returncode == 0 and got.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        raise TimeoutError(f"{count} Ray node(s) did not come up; see {self.temp}/node*.log")

    def kill(self, index: int) -> None:
        """The node's processes, all at once and without warning: a lost node."""
        proc = self.procs.pop(index)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _kill_matching(f"127.0.0.{index + 1}")  # what left the group (Ray's own daemons); the head's is the host's

    def stop(self) -> None:
        for index in sorted(self.procs, reverse=True):
            proc = self.procs.pop(index)
            proc.send_signal(signal.SIGTERM)  # `ray start --block` stops every process it started
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> "RayNodes":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_matching(text: str) -> None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------------------------
# Runs and what their metrics say

def lines(run_dir: Path) -> list[dict]:
    """Every line the run wrote, in the order written: the steps trained again after a loss included (the earlier
    attempt's, which ftcluster.records moves to metrics.superseded.jsonl)."""
    out = [json.loads(l) for name in (records.SUPERSEDED, "metrics.jsonl") if (Path(run_dir) / name).exists()
           for l in (Path(run_dir) / name).read_text().splitlines() if l.strip()]
    return sorted(out, key=lambda l: l.get("time", 0.0))


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def command(storage: Path, name: str, *overrides: str, config: Path = RECIPE) -> list[str]:
    return [sys.executable, "-m", "ftcluster.train", "--config", str(config), f"output.storage_path={storage}",
            f"output.name={name}", "training.log_every=1", "training.eval_every=0", "scaling.cpus_per_worker=1",
            *overrides]


@dataclass
class Event:
    """One fault and what it cost the run."""
    kind: str
    at_step: int
    """The last step the run had logged when the event came."""
    at_unix: float
    resumed_from: int
    """The step of the checkpoint the run went on from."""
    workers_before: int
    workers_after: int
    back_unix: float = 0.0
    """When the run had again logged ``at_step`` (or the step after the event, where none was redone)."""
    lost_s: float = 0.0
    steps_redone: int = 0


def cost(event: Event, run: list[dict], step_time_s: float) -> Event:
    """``event`` with its time lost and steps done twice, from the run's lines (in the order logged): the first line
    after the event on its new worker count at or past the step it had reached, less the time the redone steps
    took."""
    after = [l for l in run if l["time"] > event.at_unix and l["world_size"] == event.workers_after]
    back = next(l for l in after if l["step"] >= max(event.at_step, event.resumed_from + 1))
    event.steps_redone = max(0, event.at_step - event.resumed_from)
    event.back_unix = back["time"]
    event.lost_s = back["time"] - event.at_unix - max(0, back["step"] - event.at_step) * step_time_s
    return event


def step_time(run: list[dict]) -> float:
    times = sorted(l["step_time_s"] for l in run if l.get("step_time_s"))
    return times[len(times) // 2] if times else 0.0


def resumed_steps(output: str) -> list[tuple[int, int, int]]:
    """(step, workers, saved on) of every ``resumed from step S on M workers (saved on N)`` the driver printed."""
    out = []
    for line in output.splitlines():
        if "resumed from step " in line:
            words = line.split("resumed from step ", 1)[1].replace("(", " ").replace(")", " ").split()
            out.append((int(words[0]), int(words[2]), int(words[6])))
    return out


def node_loss(storage: Path, temp: Path, steps: int = 400, kill_after: int = 30, save_every: int = 10,
              regrow: bool = True, timeout: float = 900) -> tuple[list[Event], list[dict], str, int]:
    """The ``node-loss`` event: returns its events (the loss, and the growth back), the run's lines, the driver's
    output and exit code."""
    name = "node-loss"
    with RayNodes(temp) as nodes:
        nodes.start(0)
        nodes.start(1)
        cmd = command(storage, name, "scaling.num_workers=2", "scaling.min_workers=1", "ray.max_failures=-1",
                      f"ray.address={nodes.address}", f"training.max_steps={steps}",
                      f"training.save_every={save_every}", "scaling.resize_check_s=2")
        log_path = temp / f"{name}.log"
        with open(log_path, "w") as log:
            driver = subprocess.Popen(cmd, cwd=REPO, env=nodes.env, stdout=log, stderr=subprocess.STDOUT)
            run_dir = storage / name
            seen = wait_for(lambda: [l for l in lines(run_dir) if l["step"] >= kill_after], 600,
                            f"step {kill_after}", driver)
            nodes.kill(1)
            killed_at = time.time()
            wait_for(lambda: any(l["world_size"] == 1 for l in lines(run_dir)), 600, "steps on one worker", driver)
            # What the run had done on two workers: every line before its first on one. Not the lines written
            # before the kill: the driver writes a step's line when it reads the workers' report, which can be
            # after the step, and so after the kill.
            run = lines(run_dir)
            before = run[:next(i for i, l in enumerate(run) if l["world_size"] == 1)]
            saved = max((l["step"] for l in before if l.get("checkpoint")), default=0)
            events = [Event("node lost", before[-1]["step"], killed_at, saved, 2, 1)]
            if regrow:
                nodes.start(1)
                back_at = time.time()
                wait_for(lambda: any(l["world_size"] == 2 and l["time"] > back_at for l in lines(run_dir)), 600,
                         "the run to grow back to two workers", driver)
                run = lines(run_dir)
                resize = next(l for l in run if l["time"] > back_at and l.get("stopped") == "resize")
                events.append(Event("node back", resize["step"], resize["time"], resize["step"], 1, 2))
            code = driver.wait(timeout=timeout)
        output = log_path.read_text()
        run = lines(run_dir)
        per_step = step_time(run)
        return [cost(e, run, per_step) for e in events], run, output, code


# ---------------------------------------------------------------------------------------------------------------
# The report

@dataclass
class Drill:
    event: str
    command: str
    exit_code: int
    final_step: int
    events: list[Event]
    losses: dict = field(default_factory=dict)
    """Step -> loss of the disturbed run (the last logged, where a step was done twice)."""
    undisturbed: dict = field(default_factory=dict)


def losses_by_step(run: list[dict]) -> dict[int, float]:
    return {l["step"]: l["loss"] for l in run if l.get("loss") is not None}


def plot(drill: Drill, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    if drill.undisturbed:
        ax.plot(list(drill.undisturbed), list(drill.undisturbed.values()), color="0.7", lw=3.5, label="undisturbed")
    ax.plot(list(drill.losses), list(drill.losses.values()), color="C0", lw=1.0, label=drill.event)
    top = ax.get_ylim()[1]
    for i, e in enumerate(drill.events):
        ax.axvline(e.at_step, color="C3", ls="--", lw=1)
        ax.text(e.at_step, top - i * 0.06 * (top - ax.get_ylim()[0]), f" {e.kind}", color="C3", va="top", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{drill.event}.png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def render(drills: list[Drill], header: dict) -> str:
    out = ["# Fault drill", "",
           f"{header['date']}, {header['host']}, commit {header['commit']}, command `{header['command']}`.", "",
           "Each run is on CPUs, the embedded model's architecture at 2 layers with random weights: "
           "configs/tiny_cpu.yaml (LoRA, ZeRO-2) for the Ray events, the Slurm script's recipe (QLoRA, ZeRO-3 "
           "over 4-bit layer shards, paged 8-bit AdamW) for the Slurm one; each beside the same run left alone (the "
           "grey curve, under the event's where they agree). *Time lost*: from the event until the "
           "run was back at the step it had reached, less the time those steps took before the event. *Steps "
           "redone*: those after the checkpoint it went on from.", "",
           "| event | what happened | workers | at step | resumed from | steps redone | time lost | run ended |",
           "|---|---|---|---|---|---|---|---|"]
    for d in drills:
        for e in d.events:
            out.append(f"| {d.event} | {e.kind} | {e.workers_before} → {e.workers_after} | {e.at_step} | "
                       f"{e.resumed_from} | {e.steps_redone} | {e.lost_s:.1f} s | step {d.final_step}, exit "
                       f"{d.exit_code} |")
    out.append("")
    for d in drills:
        out += [f"## {d.event}", "", f"`{d.command}`", "", f"![{d.event}]({d.event}.png)", ""]
    return "\n".join(out) + "\n"


def _git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()


def undisturbed(storage: Path, name: str, *overrides: str, config: Path = RECIPE) -> dict[int, float]:
    """The same run left alone, for the plot."""
    subprocess.run(command(storage, name, *overrides, config=config), cwd=REPO, check=True, capture_output=True,
                   timeout=1800)
    return losses_by_step(lines(storage / name))


def drill_node_loss(storage: Path, temp: Path, steps: int) -> Drill:
    events, run, output, code = node_loss(storage, temp, steps=steps, kill_after=steps // 5 + 5)
    (temp / "node-loss-driver.log").write_text(output)
    drill = Drill("node-loss", "python -m ftcluster.train --config configs/tiny_cpu.yaml scaling.num_workers=2 "
                  "scaling.min_workers=1 ray.max_failures=-1 scaling.resize_check_s=2 training.save_every=10 "
                  f"training.max_steps={steps} (two `ray start` nodes; the second killed, then started again)",
                  code, run[-1]["step"] if run else 0, events, losses_by_step(run))
    drill.undisturbed = undisturbed(storage, "node-loss-undisturbed", "scaling.num_workers=2",
                                    f"training.max_steps={steps}", "training.save_every=10")
    return drill


def drill_sigterm(storage: Path, temp: Path, steps: int) -> Drill:
    name = "sigterm-resume"
    cmd = command(storage, name, "scaling.num_workers=2", f"training.max_steps={steps}", "training.save_every=10")
    run_dir = storage / name
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: [l for l in lines(run_dir) if l["step"] >= steps // 3], 600, "a third of the steps", driver)
    driver.send_signal(signal.SIGTERM)
    signalled = time.time()
    driver.communicate(timeout=600)
    stopped = lines(run_dir)[-1]
    event = Event("SIGTERM, resumed on 1 worker", stopped["step"], signalled, stopped["step"], 2, 1)
    resumed = subprocess.run([*cmd, "scaling.num_workers=1"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    run = lines(run_dir)
    # The time the command was not running counts as lost: a scheduler would start it again at once.
    drill = Drill(name, "python -m ftcluster.train --config configs/tiny_cpu.yaml scaling.num_workers=2 "
                  f"training.save_every=10 training.max_steps={steps}; SIGTERM to it; the same command with "
                  "scaling.num_workers=1", resumed.returncode,
                  run[-1]["step"], [cost(event, run, step_time(run))], losses_by_step(run))
    drill.undisturbed = undisturbed(storage, f"{name}-undisturbed", "scaling.num_workers=2",
                                    f"training.max_steps={steps}", "training.save_every=10")
    return drill


SLURM_RUN = ("model.name_or_path=embedded:smollm2-135m-instruct", "model.random_init=true",
             "model.config_overrides={num_hidden_layers: 2}", "model.activation_offloading=false",
             "data.source=builtin:pydoc", "data.max_examples=512", "data.max_seq_len=256",
             "training.micro_batch_size=2", "training.gradient_accumulation_steps=1", "training.log_every=1",
             "training.save_every=10", "training.eval_every=0", "scaling.use_gpu=false", "scaling.cpus_per_worker=1",
             "scaling.placement_strategy=STRICT_SPREAD", "optimizer.lr=1e-3")
"""slurm/qlora_70b.sh's recipe (QLoRA, ZeRO-3 over 4-bit layer shards, paged 8-bit AdamW) made a CPU run of the
embedded model's architecture at 2 layers."""


def _job_state(env: dict, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((t.split("=", 1)[1] for t in out.split() if t.startswith("JobState=")), "")


def drill_slurm(storage: Path, temp: Path, steps: int) -> Drill:
    """The job on two nodes gets SIGTERM (what ``--signal=B:TERM@300`` sends before the time limit), checkpoints
    and ends; it comes back on one node (``sbatch --nodes=1``, the same overrides)."""
    missing = [exe for exe in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(exe) is None]
    if missing or os.geteuid() != 0:
        raise SystemExit(f"slurm-requeue needs {', '.join(missing) or 'root'} (launchers/slurm_localhost.sh)")
    name, state = "slurm-requeue", temp / "slurm"
    state.mkdir()
    subprocess.run(["bash", REPO / "launchers" / "slurm_localhost.sh", "start", state, "2"], check=True)
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    overrides = [*SLURM_RUN, f"training.max_steps={steps}", f"output.storage_path={storage}", f"output.name={name}"]
    run_dir = storage / name

    def submit(port_base: int, *sbatch: str, requeue: bool) -> str:
        job_env = {**env, "FTC_ACTIVATE": f"source {Path(sys.prefix) / 'bin' / 'activate'}",
                   "FTC_STORAGE": str(storage), "FTC_PORT_BASE": str(port_base), "FTC_DRAIN_S": "20",
                   "FTC_REQUEUE": "1" if requeue else "0"}
        out = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=4000",
                              "--time=60", f"--output={temp / 'job-%j.out'}", *sbatch, str(REPO / "slurm" /
                              "qlora_70b.sh"), *overrides], cwd=REPO, env=job_env, capture_output=True, text=True,
                             check=True)
        return out.stdout.strip().split(";")[0]

    def done(job: str) -> bool:
        return _job_state(env, job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

    try:
        first = submit(27000, requeue=False)
        wait_for(lambda: [l for l in lines(run_dir) if l["step"] >= steps // 3], 900, "a third of the steps")
        subprocess.run(["scancel", "--signal=TERM", "--batch", first], env=env, check=True)
        signalled = time.time()
        wait_for(lambda: done(first), 600, "the job to stop")
        stopped = lines(run_dir)[-1]
        event = Event("SIGTERM, back on 1 node", stopped["step"], signalled, stopped["step"], 2, 1)
        again = submit(27100, "--nodes=1", requeue=False)
        wait_for(lambda: done(again), 1800, "the job on one node to end")
        code = 0 if _job_state(env, again) == "COMPLETED" else 1
    finally:
        subprocess.run(["bash", REPO / "launchers" / "slurm_localhost.sh", "stop", state], check=False)
    run = lines(run_dir)
    drill = Drill(name, "sbatch slurm/qlora_70b.sh " + " ".join(SLURM_RUN) + " ; scancel --signal=TERM --batch ; "
                  "sbatch --nodes=1 slurm/qlora_70b.sh (the same overrides)", code, run[-1]["step"],
                  [cost(event, run, step_time(run))], losses_by_step(run))
    drill.undisturbed = undisturbed(storage, f"{name}-undisturbed", *SLURM_RUN, "scaling.num_workers=2", "scaling.placement_strategy=PACK",
                                    f"training.max_steps={steps}", config=REPO / "configs" / "llama3_70b_qlora.yaml")
    return drill


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", nargs="+", choices=EVENTS, default=list(EVENTS))
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each run")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "faults")
    p.add_argument("--from", dest="source", type=Path, help="render again from a drill.json, running nothing")
    args = p.parse_args(argv)
    if args.source:
        saved = json.loads(args.source.read_text())
        by_step = lambda losses: {int(step): loss for step, loss in sorted(losses.items(), key=lambda i: int(i[0]))}
        drills = [Drill(**{**d, "events": [Event(**e) for e in d["events"]], "losses": by_step(d["losses"]),
                           "undisturbed": by_step(d["undisturbed"])}) for d in saved.pop("drills")]
        for d in drills:
            plot(d, args.source.parent)
        (args.source.parent / "report.md").write_text(render(drills, saved))
        return args.source.parent
    temp = Path(tempfile.mkdtemp(prefix="ftcdrill", dir="/tmp"))  # short: Ray's socket paths
    storage = temp / "runs"
    storage.mkdir()
    drills = []
    for event in args.events:
        run = {"node-loss": drill_node_loss, "sigterm-resume": drill_sigterm, "slurm-requeue": drill_slurm}[event]
        drills.append(run(storage, temp, args.steps))
        print(f"{event}: done", flush=True)
    header = {"date": dt.date.today().isoformat(), "host": f"{platform.node()} ({os.cpu_count()} CPUs, no GPU)",
              "commit": _git_commit(), "command": "python -m benchmarks.faults " + " ".join(argv or sys.argv[1:])}
    out = args.out / f"{header['date']}-cpu{os.cpu_count()}"
    out.mkdir(parents=True, exist_ok=True)
    for d in drills:
        plot(d, out)
    (out / "drill.json").write_text(json.dumps({**header, "drills": [asdict(d) for d in drills]}, indent=1) + "\n")
    (out / "report.md").write_text(render(drills, header))
    shutil.rmtree(temp, ignore_errors=True)
    print(out)
    return out


if __name__ == "__main__":
    main()
