"""The real Slurm scripts on a real Slurm: one slurmctld and two slurmd "nodes" on this host
(launchers/slurm_localhost.sh), each job running a Ray node per Slurm node, on the tiny model, on CPU.

Needs Debian's slurmctld, slurmd, slurm-client and munge, and root (slurmd runs jobs as their user); `.ci/run`
installs them. Without them the tests skip, except in CI, where they fail."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).parents[2]
SCRIPT = REPO / "slurm" / "qlora_70b.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [exe for exe in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(exe) is None]
    reason = (f"needs {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)" if missing else
              "needs root: slurmd starts jobs as their user" if os.geteuid() != 0 else None)
    if reason:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
    state = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", REPO / "launchers" / "slurm_localhost.sh", "start", state, "2"], check=True)
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    try:
        yield env
    finally:
        subprocess.run(["bash", REPO / "launchers" / "slurm_localhost.sh", "stop", state], check=False)


def job_field(env, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(1)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_done(env, job: str, timeout: float = 600) -> str:
    return wait_for(lambda: (s := job_field(env, job, "JobState")) in ("COMPLETED", "FAILED", "CANCELLED",
                                                                       "TIMEOUT", "NODE_FAIL") and s,
                    timeout, f"job {job} to end")


def submit(env, tmp_path: Path, tiny_model: Path, name: str, port_base: int, sbatch: tuple = (), job_env: dict = {},
           **extra) -> tuple[str, Path]:
    """sbatch the real qlora_70b.sh with overrides for a tiny CPU run: its own recipe, ZeRO-3 over 4-bit weights
    stored as bf16 and paged 8-bit AdamW included; one worker on each of the two nodes (``sbatch``: options of its
    own, ``job_env``: variables for the job)."""
    overrides = tiny_overrides(tiny_model, tmp_path, name, **{
        "data.source": "builtin:pydoc", "training.gradient_accumulation_steps": 1, "training.max_steps": 6,
        "training.save_every": 3, "training.eval_every": 0, "scaling.cpus_per_worker": 1,
        "scaling.placement_strategy": "STRICT_SPREAD", **extra})
    overrides = [o for o in overrides if not o.startswith("scaling.num_workers=")]  # the script sets it
    job_env = {**env, "FTC_ACTIVATE": f"source {Path(sys.prefix) / 'bin' / 'activate'}", "FTC_STORAGE": str(tmp_path),
               "FTC_PORT_BASE": str(port_base), "FTC_DRAIN_S": "20", **job_env}
    out = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=4000",
                          "--time=20", f"--output={tmp_path / 'job-%j.out'}", *sbatch, str(SCRIPT), *overrides],
                         cwd=REPO, env=job_env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0], tmp_path / name


def log_of(tmp_path: Path, job: str) -> str:
    return (tmp_path / f"job-{job}.out").read_text(errors="replace")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def job_processes(job: str) -> dict[int, str]:
    """Live processes started under Slurm job ``job``: every process of its steps, Ray's daemons and workers
    included, inherits SLURM_JOB_ID (other Ray clusters on the host, such as the test session's, do not)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job}".encode() in env and "State:\tZ" not in status:
            found[int(proc.name)] = args
    return found


def test_sbatch_qlora_70b_script_trains_across_two_nodes(slurm, tmp_path, tiny_model):
    job, run_dir = submit(slurm, tmp_path, tiny_model, "two-nodes", 23000)
    state = wait_done(slurm, job)
    log = log_of(tmp_path, job)
    assert state == "COMPLETED" and job_field(slurm, job, "ExitCode") == "0:0", log[-5000:]
    assert "2 node(s) x 0 GPU(s), 2 worker(s)" in log
    assert "wait_for_cluster: 2 node(s) up" in log
    assert "ray_slurm: driver exited with 0" in log
    assert "Reporting training result" not in log  # Ray Train's per-report INFO line (ray.train_log_level)
    logged = [r for r in records(run_dir) if "loss" in r]
    assert logged[-1]["step"] == 6
    assert len(set(logged[-1]["node_id_per_worker"])) == 2  # one worker on each Slurm node's Ray node
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    # The periodic checkpoint at step 3 went once the finished run saved its final one.
    assert [p.name for p in sorted(run_dir.glob("checkpoint_step*"))] == ["checkpoint_step0000006"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_step"] == 6


def test_sigterm_before_the_time_limit_checkpoints_requeues_and_the_job_resumes(slurm, tmp_path, tiny_model):
    """What `#SBATCH --signal=B:TERM@300` does near the time limit, sent by hand."""
    # A line every step: the stop lands on any step, and the resumed run's first line must be the next one.
    job, run_dir = submit(slurm, tmp_path, tiny_model, "requeued", 24000,
                          **{"training.max_steps": 40, "training.save_every": 0, "training.log_every": 1})
    wait_for(lambda: (run_dir / "metrics.jsonl").exists(), 300, "the first step")
    subprocess.run(["scancel", "--signal=TERM", "--batch", job], env=slurm, check=True)
    # Restarts counts up when the requeue is asked for; the job is requeued (and its start time set) only once it
    # has completed, so an earlier StartTime=now would be overwritten.
    wait_for(lambda: job_field(slurm, job, "Restarts") == "1" and job_field(slurm, job, "JobState") == "PENDING",
             300, "the job to requeue")
    # Slurm holds a requeued job back for a while (AuthInfo's cred_expire); let it start now.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    state = wait_done(slurm, job)
    log = log_of(tmp_path, job)
    assert state == "COMPLETED", log[-5000:]
    assert "ray_slurm: driver exited with 75" in log and "requeueing job" in log and "attempt 2" in log
    rs = records(run_dir)
    stopped = next(r for r in rs if r.get("stopped"))
    assert stopped["stopped"] == "stop requested" and stopped["step"] < 40 and "checkpoint" in stopped
    assert f"resumed from step {stopped['step']} on 2 workers (saved on 2)" in log
    after = rs[rs.index(stopped) + 1]
    assert after["step"] == stopped["step"] + 1 and after["pid"] != stopped["pid"]
    assert rs[-1]["step"] == 40 and (run_dir / "final").is_dir()


def test_a_job_stopped_on_two_nodes_resumes_when_submitted_again_on_one(slurm, tmp_path, tiny_model):
    """A requeued job that comes back with fewer nodes, by hand: the same script and overrides, sbatch --nodes=1.
    The 70B recipe's ZeRO-3 over 4-bit layer shards and paged 8-bit AdamW go on from the saved step on one worker
    (DeepSpeed's universal checkpoint, the global batch kept)."""
    overrides = {"training.max_steps": 40, "training.save_every": 0, "training.log_every": 1}
    job, run_dir = submit(slurm, tmp_path, tiny_model, "fewer", 26000, job_env={"FTC_REQUEUE": "0"}, **overrides)
    wait_for(lambda: (run_dir / "metrics.jsonl").exists(), 300, "the first step")
    subprocess.run(["scancel", "--signal=TERM", "--batch", job], env=slurm, check=True)
    wait_done(slurm, job)
    assert "ray_slurm: driver exited with 75" in log_of(tmp_path, job)
    stopped = records(run_dir)[-1]
    assert stopped["stopped"] == "stop requested" and stopped["world_size"] == 2 and "checkpoint" in stopped

    again, _ = submit(slurm, tmp_path, tiny_model, "fewer", 26100, sbatch=("--nodes=1",), **overrides)
    state = wait_done(slurm, again)
    log = log_of(tmp_path, again)
    assert state == "COMPLETED", log[-5000:]
    assert f"resumed from step {stopped['step']} on 1 workers (saved on 2)" in log
    rs = records(run_dir)
    after = rs[rs.index(stopped) + 1:]
    assert after[0]["step"] == stopped["step"] + 1 and {r["world_size"] for r in after} == {1}
    assert rs[-1]["step"] == 40 and (run_dir / "final").is_dir()


def test_scancel_mid_run_leaves_no_ray_process_behind(slurm, tmp_path, tiny_model):
    """Plain scancel signals every step at once, the Ray nodes included, so it does not wait for a checkpoint
    (scancel --signal=TERM --batch does: the test above); it must still leave nothing running."""
    job, run_dir = submit(slurm, tmp_path, tiny_model, "cancelled", 25000, **{"training.max_steps": 400})
    wait_for(lambda: (run_dir / "metrics.jsonl").exists(), 300, "the first step")
    started = job_processes(job)
    assert any("raylet" in a for a in started.values()) and any("ftcluster.train" in a for a in started.values())
    assert any("RayTrainWorker" in a for a in started.values())
    subprocess.run(["scancel", job], env=slurm, check=True)
    assert wait_done(slurm, job) == "CANCELLED"
    try:
        wait_for(lambda: not job_processes(job) or None, 90, "the job's processes to exit")
    except TimeoutError:
        pytest.fail(f"left behind: {job_processes(job)}")
