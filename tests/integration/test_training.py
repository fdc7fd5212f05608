"""Real Ray (2 CPU workers), real DeepSpeed (gloo), real bitsandbytes CPU backend, on the tiny Llama.

ZeRO stages 0-3 all run on CPU here. CPU offload is not exercised: it needs DeepSpeed's CPU Adam op built with
a C++ toolchain at run time, which the GPU path covers (tests/gpu)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ftcluster import config as C
from ftcluster import launch, stop
from tests import tiny
from tests.tiny import tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).parents[2]
RECIPE = REPO / "configs" / "tiny_cpu.yaml"
LR = {"full": 2e-3, "lora": 1e-2, "qlora": 1e-2}


def tiny_cfg(tiny_model, storage, name, **extra):
    base = {"model.random_init": False, "model.config_overrides": "{}"}
    return C.load(RECIPE, tiny_overrides(tiny_model, storage, name, **{**base, **extra}))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}  # later lines win (a resumed run)


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def runs(ray_local, tiny_model, storage):
    """Runs several tests read; each trained once."""
    out = {}

    def run(key, **extra):
        if key not in out:
            out[key] = launch.run(tiny_cfg(tiny_model, storage, key, **extra))
        return out[key]

    return run


METHOD_RUNS = {
    "full-zero1": dict(method="full", **{"deepspeed.zero_stage": 1}),
    "lora-zero0": dict(method="lora", **{"deepspeed.zero_stage": 0}),
    "lora-zero2": dict(method="lora", **{"deepspeed.zero_stage": 2, "training.log_every": 1}),
    "lora-zero3": dict(method="lora", **{"deepspeed.zero_stage": 3, "training.log_every": 1,
                                         "training.export_every": 4}),
    "qlora-zero2-paged8bit": dict(method="qlora", **{"deepspeed.zero_stage": 2, "optimizer.name": "paged_adamw_8bit"}),
    "qlora-zero3-8bit": dict(method="qlora", **{"deepspeed.zero_stage": 3, "optimizer.name": "adamw_8bit"}),
    # PEFT's fp32 upcast of norms/embeddings/lm_head, kept in fp32 by DeepSpeed's keep_in_fp32_modules.
    "qlora-zero2-upcast": dict(method="qlora", **{"deepspeed.zero_stage": 2, "quantization.upcast_non_quantized": True}),
}


def test_a_run_without_a_final_checkpoint_still_reports_its_figures(runs):
    s = runs("no-final-checkpoint", **{"output.checkpoint_at_end": False, "training.max_steps": 4})
    assert s["final_step"] == 4 and s["checkpoint"] is None and s["final_model"] is None
    assert not list(Path(s["run_dir"]).glob("checkpoint_*"))
    assert s["trainable_params"] > 0 and s["tokens_per_s_total"] > 0 and s["peak_rss_gib"] > 0


@pytest.mark.parametrize("key", list(METHOD_RUNS))
def test_each_method_and_zero_stage_trains_and_its_loss_falls(runs, key):
    extra = METHOD_RUNS[key]
    s = runs(key, **extra, **{"optimizer.lr": LR[extra["method"]]})
    assert s["final_step"] == 12
    assert s["final_loss"] < s["first_loss"] - 0.05, s
    assert s["eval_loss"] is not None and s["tokens_per_s_total"] > 0
    final = Path(s["final_model"])
    weights = "model.safetensors" if extra["method"] == "full" else "adapter_model.safetensors"
    assert (final / weights).exists() and (final / "run.yaml").exists()
    if extra["method"] != "full":
        assert (final / weights).stat().st_size < 1_000_000  # the adapter alone, not the model


def _lora_zero(runs, stage):
    key = f"lora-zero{stage}"
    return runs(key, **METHOD_RUNS[key], **{"optimizer.lr": LR["lora"]})


def test_zero3_first_losses_match_zero2_on_the_same_seed_and_data(runs):
    z2, z3 = (losses_by_step(Path(_lora_zero(runs, s)["run_dir"])) for s in (2, 3))
    for step in (1, 2, 3):
        assert z3[step] == pytest.approx(z2[step], rel=2e-3), (step, z2[step], z3[step])


def test_zero3_adapter_equals_the_zero2_adapter(runs):
    from safetensors.torch import load_file

    a2, a3 = (load_file(Path(_lora_zero(runs, s)["final_model"]) / "adapter_model.safetensors") for s in (2, 3))
    assert a2.keys() == a3.keys() and len(a2) == 2 * 7 * 2
    for k in a2:
        assert a3[k].shape == a2[k].shape and a3[k].numel() > 0  # not the empty shards of peft#453
        torch.testing.assert_close(a3[k].float(), a2[k].float(), atol=2e-2, rtol=0.05)


def test_exports_during_training_are_whole_adapters_at_their_steps_without_optimizer_state(runs):
    from safetensors.torch import load_file

    run = _lora_zero(runs, 3)  # ZeRO-3 on two workers: each export gathers the partitioned adapter
    run_dir = Path(run["run_dir"])
    exports = sorted(p.name for p in (run_dir / "exports").iterdir())
    assert exports == ["step0000004", "step0000008"]  # every 4 of its 12 steps; the end is the final model
    final = load_file(Path(run["final_model"]) / "adapter_model.safetensors")
    previous = None
    for name in exports:
        weights = load_file(run_dir / "exports" / name / "adapter_model.safetensors")
        assert weights.keys() == final.keys() and (run_dir / "exports" / name / "run.yaml").is_file()
        assert all(weights[k].shape == final[k].shape and weights[k].numel() > 0 for k in weights)
        assert previous is None or any(not torch.equal(weights[k], previous[k]) for k in weights)  # it trained on
        previous = weights
        assert not list((run_dir / "exports" / name).glob("*optim*"))
    logged = {r["step"] for r in records(run_dir)}
    assert {4, 8} <= logged  # each export step has its line: its time and tokens seen


@pytest.mark.parametrize("key", ["lora-zero2", "qlora-zero2-paged8bit"])
def test_merged_model_gives_the_adapter_models_logits(runs, key, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftcluster import merge

    s = runs(key, **METHOD_RUNS[key], **{"optimizer.lr": LR[METHOD_RUNS[key]["method"]]})
    final = Path(s["final_model"])
    cfg = merge.run_config_of(final)
    adapter_model = PeftModel.from_pretrained(tiny.base_for(cfg), final).eval()
    out = merge.merge(final, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ids = torch.randint(5, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = adapter_model(input_ids=ids).logits.float(), merged(input_ids=ids).logits.float()
    assert (got - want).norm() / want.norm() < 0.02
    with pytest.raises(C.ConfigError, match="not empty"):
        merge.merge(final, out)  # never overwrites


# --- interruption ------------------------------------------------------------------------------------------------

INTERRUPT = {"method": "lora", "optimizer.lr": LR["lora"], "training.max_steps": 8, "training.save_every": 3,
             "training.log_every": 1, "training.eval_batches": 2}


def _wait_for(predicate, timeout=240, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def _checkpointed_step(run_dir: Path):
    if not (run_dir / "metrics.jsonl").exists():
        return None
    saved = [r["step"] for r in records(run_dir) if "checkpoint" in r]
    return saved[0] if saved else None


def test_killed_driver_resumes_at_the_saved_step_with_the_same_data_order(runs, ray_local, tiny_model, storage):
    reference = losses_by_step(Path(runs("uninterrupted", **INTERRUPT)["run_dir"]))
    cfg = tiny_cfg(tiny_model, storage, "killed", **INTERRUPT)
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "ftcluster.train", "--config", str(RECIPE),
           *tiny_overrides(tiny_model, storage, "killed", **{"model.random_init": False,
                                                             "model.config_overrides": "{}", **INTERRUPT}),
           f"ray.address={address}"]
    driver = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        saved = _wait_for(lambda: _checkpointed_step(cfg.run_dir), what="the first checkpoint")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert saved == 3
    assert not (cfg.run_dir / "summary.json").exists()  # it really died mid-run
    # Ray reaps the dead driver's workers; then the same command resumes.
    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout + resumed.stderr
    after = [r for r in records(cfg.run_dir) if "loss" in r]
    restart = next(i for i, r in enumerate(after) if i and r["pid"] != after[0]["pid"])
    assert after[restart]["step"] == saved + 1
    assert [r["step"] for r in records(cfg.run_dir)] == list(range(1, 9))  # a step trained again is logged once
    for step in range(saved + 1, 9):
        assert losses_by_step(cfg.run_dir)[step] == pytest.approx(reference[step], rel=1e-3), step
    # TensorBoard (on by default) holds both attempts' loss curve, in the run's one event directory.
    from tests.unit.test_tracking import _tensorboard_scalars

    # It may hold a point more than metrics.jsonl: a step the killed driver never recorded, logged by the worker.
    tb = _tensorboard_scalars(cfg.run_dir, "train/loss")
    logged = [(r["step"], r["loss"]) for r in records(cfg.run_dir) if r.get("loss") is not None]
    assert {s for s, _ in tb} == {s for s, _ in logged} == set(range(1, 9))
    for step, loss in logged:
        assert any(s == step and v == pytest.approx(loss, rel=1e-6) for s, v in tb), step


SIGNALLED = {"model.random_init": False, "model.config_overrides": "{}", "method": "lora", "training.max_steps": 20,
             "training.save_every": 0, "training.log_every": 1}
"""A run long enough to be signalled mid-way."""


def _driver(ray_local, tiny_model, storage, name: str, **extra):
    """The config and the command line of a driver started by hand on the test session's cluster."""
    cmd = [sys.executable, "-m", "ftcluster.train", "--config", str(RECIPE),
           *tiny_overrides(tiny_model, storage, name, **extra),
           f"ray.address={ray_local.get_runtime_context().gcs_address}"]
    return tiny_cfg(tiny_model, storage, name, **extra), cmd


def _stopped_by(sig, cfg, cmd) -> tuple[str, dict]:
    """Start the driver, send it ``sig`` after its first step; it must exit resumable. (its output, last record)"""
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: (cfg.run_dir / "metrics.jsonl").exists(), what="the first step")
    driver.send_signal(sig)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == stop.EXIT_STOPPED, out[-3000:]
    return out, records(cfg.run_dir)[-1]


def test_sigterm_to_the_driver_checkpoints_at_the_next_step_and_the_command_resumes_on_fewer_workers(
        ray_local, tiny_model, storage):
    """What sbatch's --signal, scancel and `ray job stop` do to a run: it must end resumable, not lost. Stopped on 2
    workers, the same command with scaling.num_workers=1 goes on from the next step on one."""
    cfg, cmd = _driver(ray_local, tiny_model, storage, "sigterm", **{**SIGNALLED, "training.eval_batches": 2})
    out, last = _stopped_by(signal.SIGTERM, cfg, cmd)
    assert last["stopped"] == "stop requested" and "checkpoint" in last
    assert last["step"] < 20 and last["checkpoint"].endswith(f"checkpoint_step{last['step']:07d}")
    assert "Run the same command again to resume" in out
    assert not (cfg.run_dir / "final").exists()

    assert last["world_size"] == 2
    resumed = subprocess.run([*cmd, "scaling.num_workers=1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {last['step']} on 1 workers (saved on 2)" in resumed.stdout + resumed.stderr
    after = records(cfg.run_dir)
    assert after[after.index(last) + 1]["step"] == last["step"] + 1  # not one step lost or repeated
    assert {r["world_size"] for r in after[after.index(last) + 1:]} == {1}
    assert json.loads((cfg.run_dir / "summary.json").read_text())["stopped"] is None
    assert (cfg.run_dir / "final").is_dir()


def test_ctrl_c_checkpoints_and_stops_resumably_as_sigterm_does(ray_local, tiny_model, storage):
    """Ray Train's own SIGINT handler would abort the run with no checkpoint: Ctrl-C must save one and exit 75."""
    cfg, cmd = _driver(ray_local, tiny_model, storage, "sigint", **SIGNALLED)
    out, last = _stopped_by(signal.SIGINT, cfg, cmd)
    assert last["stopped"] == "stop requested" and last["checkpoint"].endswith(f"checkpoint_step{last['step']:07d}")
    assert "SIGINT: asking the workers to save a checkpoint" in out


def test_sigterm_ends_a_run_that_ray_keeps_restarting_after_failures(ray_local, tiny_model, storage):
    """ray.max_failures=-1 and workers that keep dying (a node that crashes again and again): Ray Train restarts the
    group forever. SIGTERM once could not end such a run; it must, promptly."""
    from ray._private import state

    from ftcluster import records as rec

    cfg, cmd = _driver(ray_local, tiny_model, storage, "restarts",
                       **{**SIGNALLED, "ray.max_failures": -1, "training.max_steps": 100000})
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, done = set(), threading.Event()
    # Each attempt's rank 0, from every line written (an attempt that trains its steps again supersedes the lines
    # of the one before).
    attempts = lambda: {line.pid_per_worker[0] for line in rec.read_lines(cfg.run_dir, superseded=True)}

    def crash_every_worker():
        """Kill each worker group once it has trained a step: a failure in training, restarted every time."""
        while not done.is_set():
            training = attempts()
            for actor in state.actors().values():
                if actor["ActorClassName"] == "RayTrainWorker" and actor["State"] == "ALIVE" \
                        and training - killed and actor["Pid"] not in killed:
                    killed.add(actor["Pid"])
                    try:
                        os.kill(actor["Pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            killed.update(training)
            time.sleep(0.2)

    crasher = threading.Thread(target=crash_every_worker, daemon=True)
    crasher.start()
    try:
        _wait_for(lambda: len(attempts()) >= 2 or driver.poll() is not None, what="a restart after a failure")
        assert driver.poll() is None, "the run ended before it was signalled"
        driver.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=120)  # the workers go on dying meanwhile
    finally:
        done.set()
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1, out[-3000:]
    assert "SIGTERM: asking the workers to save a checkpoint and stop" in out
    assert "The run stopped as asked (SIGTERM) after a failure, with no restart." in out, out[-3000:]


def test_a_second_run_of_the_same_name_is_refused_while_the_first_trains(ray_local, tiny_model, storage):
    cfg, cmd = _driver(ray_local, tiny_model, storage, "twice", **{**SIGNALLED, "training.max_steps": 40})
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (cfg.run_dir / "metrics.jsonl").exists(), what="the first run's first step")
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and f"in use by the run PID {first.pid}" in second.stderr, second.stderr[-2000:]
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    assert first.returncode == stop.EXIT_STOPPED and not (cfg.run_dir / "LOCK").exists()


def test_a_killed_worker_is_restarted_by_ray_and_finishes_like_an_uninterrupted_run(runs, tiny_model, storage):
    reference = runs("uninterrupted", **INTERRUPT)
    cfg = tiny_cfg(tiny_model, storage, "worker-killed", **INTERRUPT, **{"ray.max_failures": 1})
    killed = {}

    def kill_after_first_checkpoint():
        _wait_for(lambda: _checkpointed_step(cfg.run_dir), what="the first checkpoint")
        pid = records(cfg.run_dir)[-1]["pid_per_worker"][1]
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    summary = launch.run(cfg)
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    assert summary["final_step"] == reference["final_step"] == 8
    pids = {r["pid_per_worker"][1] for r in records(cfg.run_dir) if "pid_per_worker" in r}
    assert killed["pid"] in pids and len(pids) == 2  # a second worker group finished the run
    assert summary["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-3)


def test_a_run_the_estimator_says_will_not_fit_is_refused_and_force_lets_it_past(ray_local, tiny_model, storage):
    """GPU workers whose GPUs are too small: refused before anything is written. With force the run goes past the
    memory check, to the next: this CPU cluster has no GPU for a worker (a GPU host would start training)."""
    cfg = tiny_cfg(tiny_model, storage, "too-big", **{"scaling.use_gpu": True, "resources.gpu_memory_gib": 0.5,
                                                         "training.max_steps": 2})
    with pytest.raises(C.ConfigError, match="GPUs have 0.5.*--force"):
        launch.run(cfg)
    assert not cfg.run_dir.exists()  # refused before anything was written
    with pytest.raises(C.ConfigError, match=r"the Ray cluster has no GPU over its 1 node\(s\).*scaling.use_gpu=false"):
        launch.run(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"resources_wait_s": 0})}), force=True)
    assert not cfg.run_dir.exists()


def test_a_diverging_run_stops_with_its_own_exit_code_keeps_its_last_good_checkpoint_and_writes_no_model(
        tiny_model, tmp_path):
    # A checkpoint every step; the gradient vanishes under lr=1e6, and the guard is sure at the third zero in a row.
    overrides = tiny_overrides(tiny_model, tmp_path, "diverges", **{
        "model.random_init": False, "model.config_overrides": "{}", "optimizer.lr": 1e6, "training.max_steps": 12,
        "training.log_every": 1, "training.save_every": 1, "training.divergence_zero_grad_logs": 3,
        "scaling.num_workers": 1, "ray.address": "local"})
    proc = subprocess.run([sys.executable, "-m", "ftcluster.train", "--config", str(RECIPE), *overrides],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == stop.EXIT_DIVERGED, proc.stderr[-3000:]
    assert "training diverged at step" in proc.stderr and "last good checkpoint is" in proc.stderr
    run_dir = tmp_path / "diverges"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"].startswith("diverged") and summary["final_model"] is None
    assert not (run_dir / "final").exists()
    lines = [r for r in records(run_dir) if "loss" in r]
    zero = [r["step"] for r in lines if r["grad_norm"] == 0]
    assert len(zero) == 3 and summary["final_step"] == zero[2] == zero[0] + 2  # the third zero in a row
    # Every step was a checkpoint step, and each carried the loss the divergence guard passed; those whose gradient
    # norm was 0 saved nothing, so the last good checkpoint is the last one before the gradient vanished.
    saved = [r["step"] for r in lines if "checkpoint" in r]
    assert saved == list(range(1, zero[0])) and saved
    assert Path(summary["checkpoint"]).name == f"checkpoint_step{zero[0] - 1:07d}"
    assert f"step {zero[0]}: no checkpoint saved, the gradient norm is 0" in proc.stdout + proc.stderr


def test_merge_refuses_a_base_that_changed_since_training_an_other_shape_and_an_out_that_is_a_file(tiny_model,
                                                                                                    tmp_path):
    import shutil

    from ftcluster import merge

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    cfg = C.load(RECIPE, tiny_overrides(base, tmp_path, "adapter", **{
        "model.random_init": False, "model.config_overrides": "{}", "training.max_steps": 2,
        "training.save_every": 0, "scaling.num_workers": 1, "training.eval_every": 0}))
    final = Path(launch.run(cfg)["final_model"])
    assert json.loads((final / "base.json").read_text())["files"]["model.safetensors"] > 0
    (tmp_path / "a-file").write_text("kept")
    with pytest.raises(C.ConfigError, match="a-file is a file"):
        merge.merge(final, tmp_path / "a-file")
    assert (tmp_path / "a-file").read_text() == "kept"

    # The same path now holds another model: merge says so before building anything.
    from transformers import AutoTokenizer

    tiny.build_model(base, AutoTokenizer.from_pretrained(base), hidden=32)
    with pytest.raises(C.ConfigError, match=r"is not the base .* was trained on .*model.safetensors: [\d,]+ bytes "
                                            r"then, [\d,]+ now"):
        merge.merge(final, tmp_path / "merged")
    # An adapter saved before bases were recorded: PEFT's size mismatch becomes the same sentence's cause.
    (final / "base.json").unlink()
    with pytest.raises(C.ConfigError, match="was trained on a different base .* other shapes"):
        merge.merge(final, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
