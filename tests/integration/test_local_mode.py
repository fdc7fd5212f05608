"""ray.local_mode: the one worker in the driver's process, without Ray (not even imported). The same steps, losses,
checkpoints and run directory as a Ray worker; a SIGTERM checkpoints it and the same command resumes it."""

import json
import signal
import subprocess
import sys
import time

import pytest

from ftcluster import launch
from tests.integration.test_training import REPO, RECIPE, SIGNALLED, _stopped_by, _wait_for, records, tiny_cfg
from tests.tiny import tiny_overrides

pytestmark = pytest.mark.slow
ONE = {"model.random_init": False, "model.config_overrides": "{}", "scaling.num_workers": 1, "training.max_steps": 6,
       "training.log_every": 1, "training.save_every": 2, "output.keep_checkpoints": 2, "training.eval_batches": 2}


def _local_command(tiny_model, storage, name, **extra):
    return [sys.executable, "-m", "ftcluster.train", "--config", str(RECIPE),
            *tiny_overrides(tiny_model, storage, name, **{"ray.local_mode": True, **extra})]


def test_a_local_mode_run_trains_as_a_ray_worker_does_and_leaves_the_same_run_directory(ray_local, tiny_model,
                                                                                        tmp_path):
    on_ray = launch.run(tiny_cfg(tiny_model, tmp_path, "on-ray", **ONE))
    # ray.local_mode=auto, the default: one worker and no cluster recorded on the host or named to the driver.
    command = _local_command(tiny_model, tmp_path, "local", **ONE, **{"ray.local_mode": "auto"})
    assert command[1:3] == ["-m", "ftcluster.train"]
    # The same command, telling at exit which of Ray's modules it imported.
    probe = ("import atexit, sys; atexit.register(lambda: print('ray modules:', sorted(m for m in sys.modules "
             "if m.split('.')[0] == 'ray'))); from ftcluster import train; sys.exit(train.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", probe, *command[3:]], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "cluster: none (the worker runs in this process" in out and "Started a local Ray instance" not in out
    assert "ray modules: []" in out  # Ray Train's import alone took 1.0-1.3 s of a GPU host's start
    local = json.loads((tmp_path / "local" / "summary.json").read_text())
    # Same seed, data and code. bfloat16 on CPUs: Ray's worker and this process may run different intra-op thread
    # counts, whose reductions round apart by more than 1e-5 at times.
    assert dict(local["losses"]) == pytest.approx(dict(on_ray["losses"]), rel=1e-4)
    assert local["final_step"] == on_ray["final_step"] == 6 and local["eval_loss"] == pytest.approx(on_ray["eval_loss"])
    kept = {d.name for d in (tmp_path / "local").glob("checkpoint_step*")}
    # The finished run keeps its final checkpoint only, whose model is final/ (on disk once).
    assert kept == {d.name for d in (tmp_path / "on-ray").glob("checkpoint_step*")} == {"checkpoint_step0000006"}
    assert (tmp_path / "local" / "checkpoint_step0000006" / "hf").resolve() == (tmp_path / "local" / "final")
    assert local["checkpoint"].endswith("checkpoint_step0000006") and (tmp_path / "local" / "final").is_dir()
    lines = records(tmp_path / "local")
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sum("checkpoint" in r for r in lines) == 3
    phases = local["first_step_phases_s"]
    assert phases["cluster"] < 1  # no cluster to start or join
    # Counted from the command's start: its imports (torch, transformers, Ray) are part of the wait.
    assert phases["imports"] > 0.5 and sum(phases.values()) == pytest.approx(local["time_to_first_step_s"], abs=0.5)


def test_sigterm_checkpoints_a_local_mode_run_and_the_same_command_resumes_it(tiny_model, tmp_path):
    # Longer than SIGNALLED's 20 steps: in the driver's process the tiny model steps several times a second, and the
    # stop file is read once a second, so a signal in a 20-step run's last second found it already ending.
    long = {**SIGNALLED, "scaling.num_workers": 1, "training.max_steps": 150}
    cmd = _local_command(tiny_model, tmp_path, "local-sigterm", **long)
    cfg = tiny_cfg(tiny_model, tmp_path, "local-sigterm", **{**long, "ray.local_mode": True})
    out, last = _stopped_by(signal.SIGTERM, cfg, cmd)
    assert last["stopped"] == "stop requested" and last["checkpoint"].endswith(f"checkpoint_step{last['step']:07d}")
    assert last["step"] < 150
    assert "Run the same command again to resume" in out

    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {last['step']} on 1 workers (saved on 1)" in resumed.stdout + resumed.stderr
    after = records(cfg.run_dir)
    assert after[after.index(last) + 1]["step"] == last["step"] + 1  # not one step lost or repeated
    assert (cfg.run_dir / "final").is_dir()

    # A finished run started again says so at once and changes nothing in its directory.
    before = {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()}
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr[-2000:]
    assert "plan:" not in again.stdout  # nothing was started
    assert {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()} == before


def test_a_failing_local_mode_worker_gets_the_advice_a_ray_worker_gets(tiny_model, tmp_path, monkeypatch, capsys):
    """Either backend's worker error reaches the driver as backends.WorkerFailed, and is told apart the same way (a
    data or config error would fail again: fix it first) with exit code 1."""
    from ftcluster import train, worker

    def broken_setup(*args, **kwargs):
        raise ValueError("row 7 has no text")

    monkeypatch.setattr(worker, "setup", broken_setup)
    code = train.main(["--config", str(RECIPE), *tiny_overrides(tiny_model, tmp_path, "local-fails",
                                                                **{**ONE, "ray.local_mode": True})])
    err = capsys.readouterr().err
    assert code == 1, err[-2000:]
    assert "error: training failed: ValueError: row 7 has no text" in err and "fix it first" in err


def test_a_local_mode_worker_takes_the_checks_inputs_and_starts_with_full_collections_held(tiny_model, tmp_path,
                                                                                         monkeypatch):
    """The worker runs in the driver's process: it trains on the checks' tokenizer and rows rather than loading the
    tokenizer and reading the data source a second time; and Python makes no full collection through start-up
    (ftcluster/collector.py), its thresholds back once the command returns."""
    import gc

    from ftcluster import collector, models, sources, train
    from ftcluster.data import prepare

    calls = {"load_tokenizer": 0, "rows_for": 0, "build_model": 0}
    collecting = []

    def counted(module, name):
        real = getattr(module, name)

        def call(*args, **kwargs):
            calls[name] += 1
            collecting.append(gc.get_threshold()[2] == collector.NEVER)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, call)

    for module, name in ((sources, "load_tokenizer"), (prepare, "rows_for"), (models, "build_model")):
        counted(module, name)
    thresholds = gc.get_threshold()
    code = train.main(["--config", str(RECIPE), *tiny_overrides(
        tiny_model, tmp_path, "local-inputs", **{**ONE, "training.max_steps": 2, "training.save_every": 0,
                                                 "ray.local_mode": True})])
    assert code == 0
    assert calls == {"load_tokenizer": 1, "rows_for": 1, "build_model": 1}
    assert collecting == [True, True, True]  # no full collection while the worker started
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0
    assert [r["step"] for r in records(tmp_path / "local-inputs") if "loss" in r] == [1, 2]
    # A second run in the same process (a notebook's): DeepSpeed's groups went with the first run's process group.
    monkeypatch.undo()
    assert train.main(["--config", str(RECIPE), *tiny_overrides(
        tiny_model, tmp_path, "local-again", **{**ONE, "training.max_steps": 1, "training.save_every": 0,
                                                "ray.local_mode": True})]) == 0


def test_checkpoints_come_by_time_and_a_killed_run_loses_at_most_the_interval(tiny_model, tmp_path):
    """training.save_every_minutes with no step interval: the checkpoints come at the steps where the time is up,
    counted from the last one, and a run killed without warning (SIGKILL: no chance to save) goes on from one no
    older than the interval and a step."""
    interval_s = 2.0
    timed = {**ONE, "training.max_steps": 2000, "training.save_every": 0, "training.save_every_minutes":
             interval_s / 60, "output.keep_checkpoints": 50}
    cmd = _local_command(tiny_model, tmp_path, "timed", **timed)
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "timed"
    saved = lambda: [r for r in records(run_dir) if r.get("checkpoint")] if (run_dir / "metrics.jsonl").exists() \
        else []
    _wait_for(lambda: len(saved()) >= 3, what="three checkpoints by time", timeout=600)
    driver.send_signal(signal.SIGKILL)
    killed = time.time()
    driver.communicate(timeout=60)
    lines, kept = records(run_dir), saved()
    steps = [r["step"] for r in kept]
    assert all(b > a for a, b in zip(steps, steps[1:])) and len(steps) >= 3
    slowest = max(r["step_time_s"] for r in lines if r.get("step_time_s"))
    gaps = [b["time"] - a["time"] for a, b in zip(kept, kept[1:])]
    # The figures of a step are taken before it saves; a due checkpoint is noticed one step late (the agreement
    # between workers is the previous step's), and its save takes a moment on a loaded CI host.
    assert all(interval_s - 0.1 <= gap <= interval_s + 3 * slowest + 2.0 for gap in gaps), (gaps, slowest)
    assert killed - kept[-1]["time"] <= interval_s + 3 * slowest + 2.0
    assert lines[-1]["step"] < 2000
