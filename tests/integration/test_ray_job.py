"""`ray job submit` against a real `ray start --head` on this host, with token authentication on, as on a cloud
cluster; the head is stopped by its PID afterwards."""

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.tiny import tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
DASHBOARD = "http://127.0.0.1:28265"


@pytest.fixture(scope="module")
def ray_head():
    # Ray's socket paths must stay short: a temp dir under /tmp, not pytest's deeper one.
    temp = Path(tempfile.mkdtemp(prefix="ftcray", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(temp / "head.log", "w")
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", "--port=27379", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", "--dashboard-port=28265", "--num-cpus=2", "--disable-usage-stats",
         "--node-manager-port=27380", "--object-manager-port=27381", "--dashboard-agent-listen-port=27382",
         "--dashboard-agent-grpc-port=27383", "--metrics-export-port=27384", "--runtime-env-agent-port=27385",
         "--min-worker-port=27400", "--max-worker-port=27499", f"--temp-dir={temp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while subprocess.run([BIN / "ray", "job", "list", "--address", DASHBOARD], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, (temp / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the head's job server did not come up"
            time.sleep(2)
        yield env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops every process it started
        head.wait(timeout=120)
        log.close()


def overrides(tiny_model: Path, storage: Path, name: str, **extra) -> list[str]:
    return tiny_overrides(tiny_model, storage, name, **{
        "model.random_init": False, "model.config_overrides": "{}", "training.max_steps": 4,
        "training.eval_batches": 2, "scaling.cpus_per_worker": 1, **extra})


def test_ray_job_submit_of_a_recipe_succeeds_and_its_log_holds_the_metrics(ray_head, tiny_model, tmp_path):
    printed = subprocess.run(
        [sys.executable, "-m", "launchers.submit", "--address", DASHBOARD, "--config", "configs/tiny_cpu.yaml",
         "--print-command", *overrides(tiny_model, tmp_path, "submitted")],
        cwd=REPO, env=ray_head, capture_output=True, text=True, check=True).stdout
    command = shlex.split(printed)
    assert command[:3] == ["ray", "job", "submit"]
    runtime_env = json.loads(command[command.index("--runtime-env-json") + 1])
    assert runtime_env["working_dir"] == str(REPO) and ".venv" in runtime_env["excludes"]
    done = subprocess.run([BIN / "ray", *command[1:]], cwd=REPO, env=ray_head, capture_output=True, text=True,
                          timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in log, log[-5000:]
    assert "step 4/4  loss" in log and '"final_step": 4' in log  # the driver's progress and summary
    summary = json.loads((tmp_path / "submitted" / "summary.json").read_text())
    assert summary["final_step"] == 4 and Path(summary["final_model"]).is_dir()


def test_ray_job_stop_lets_the_run_checkpoint_first(ray_head, tiny_model, tmp_path):
    submitted = subprocess.run(
        [sys.executable, "-m", "launchers.submit", "--address", DASHBOARD, "--config", "configs/tiny_cpu.yaml",
         "--no-wait", "--submission-id", "ftc-stop-test",
         *overrides(tiny_model, tmp_path, "stopped", **{"training.max_steps": 400, "training.log_every": 1})],
        cwd=REPO, env=ray_head, capture_output=True, text=True, check=True)
    assert "ray job stop" in submitted.stdout
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 300
    while not metrics.exists():
        assert time.time() < deadline, "no step within 300 s"
        time.sleep(1)
    subprocess.run([BIN / "ray", "job", "stop", "--address", DASHBOARD, "ftc-stop-test"], env=ray_head,
                   check=True, capture_output=True, timeout=300)
    last = [json.loads(l) for l in metrics.read_text().splitlines()][-1]
    assert last["stopped"] == "stop requested" and last["step"] < 400
    assert Path(last["checkpoint"]).is_dir()


def test_a_client_without_the_clusters_token_is_refused(ray_head, tmp_path):
    env = {k: v for k, v in ray_head.items() if k != "RAY_AUTH_TOKEN"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    refused = subprocess.run(
        [sys.executable, "-m", "launchers.submit", "--address", DASHBOARD, "--config", "configs/tiny_cpu.yaml"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "refused this client" in refused.stderr and "RAY_AUTH_TOKEN" in refused.stderr
