"""Sequence parallelism (DeepSpeed Ulysses) on two real Ray CPU workers over gloo, on the tiny Llama: splitting each
row's tokens over the two workers trains exactly as each worker training its own whole rows."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftcluster import config as C
from ftcluster import launch
from tests.tiny import tiny_overrides

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).parents[2] / "configs" / "tiny_cpu.yaml"


def train(tiny_model, storage: Path, name: str, **extra) -> Path:
    # float32, no dropout, unpacked rows (sdpa cannot keep packed examples apart once Ulysses drops the mask): the
    # two runs differ only in how a row's tokens are split.
    sets = {"model.random_init": False, "model.config_overrides": "{}", "model.dtype": "float32",
            "model.attn_implementation": "sdpa", "data.packing": False, "data.max_examples": 64,
            "lora.dropout": 0.0, "training.micro_batch_size": 1, "training.max_steps": 3, "training.log_every": 1,
            "training.eval_every": 0, "training.save_every": 0, **extra}
    cfg = C.load(RECIPE, tiny_overrides(tiny_model, storage, name, **sets))
    launch.run(cfg)
    return cfg.run_dir


def steps(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


LAYOUTS = {
    "zero2": {"deepspeed.zero_stage": 2},
    "zero3": {"deepspeed.zero_stage": 3},  # DeepSpeed partitions the base and the adapters
    "layer-shards": {"deepspeed.zero_stage": 3, "model.gradient_checkpointing": True},  # the base by layers
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_workers_sharing_each_row_train_as_two_workers_with_whole_rows(ray_local, tiny_model, tmp_path, layout):
    whole = train(tiny_model, tmp_path, "whole", **LAYOUTS[layout])
    split = train(tiny_model, tmp_path, "split", **LAYOUTS[layout], **{"scaling.sequence_parallel": 2})
    plan = json.loads((split / "plan.json").read_text())
    assert plan["sequence_parallel"] == 2 and plan["global_batch"] == 2  # two rows a step, each trained once
    assert plan["frozen_base"] == {"zero2": "whole", "zero3": "deepspeed", "layer-shards": "layer-shards"}[layout]
    a, b = steps(whole), steps(split)
    assert list(a) == list(b) == [1, 2, 3]
    for step in a:
        # The same loss from the same rows, the same gradient (its norm), and so the same next step.
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
        assert b[step]["tokens_seen"] == a[step]["tokens_seen"], step  # each worker counts its slice only
    # Three optimizer steps from the same adapter gradients leave the same adapter.
    before, after = (load_file(d / "final" / "adapter_model.safetensors") for d in (whole, split))
    assert before.keys() == after.keys() and before
    for name, weight in before.items():
        torch.testing.assert_close(after[name], weight, rtol=1e-4, atol=1e-6, msg=name)


def test_a_killed_sequence_parallel_run_resumes_at_its_checkpoint_on_the_same_course(ray_local, tiny_model, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    sets = {"model.random_init": False, "model.config_overrides": "{}", "model.dtype": "float32",
            "model.attn_implementation": "sdpa", "data.packing": False, "data.max_examples": 64, "lora.dropout": 0.0,
            "training.micro_batch_size": 1, "training.max_steps": 8, "training.log_every": 1,
            "training.eval_every": 0, "training.save_every": 3, "scaling.sequence_parallel": 2}
    reference = steps(train(tiny_model, tmp_path, "reference", **sets))
    cmd = [sys.executable, "-m", "ftcluster.train", "--config", str(RECIPE),
           *tiny_overrides(tiny_model, tmp_path, "killed", **sets),
           f"ray.address={ray_local.get_runtime_context().gcs_address}"]
    run_dir = tmp_path / "killed"
    driver = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=RECIPE.parents[1])
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoint_step0000003").is_dir() or not any(
                "checkpoint" in json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()):
            assert time.time() < deadline and driver.poll() is None, "no checkpoint at step 3"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    # Split otherwise, it is refused before anything starts, naming the split to resume with.
    other = subprocess.run([*cmd, "scaling.sequence_parallel=1"], capture_output=True, text=True, timeout=300,
                           cwd=RECIPE.parents[1])
    assert other.returncode == 2 and "set scaling.sequence_parallel=2 scaling.num_workers=2 to resume it" in \
        other.stderr, other.stderr[-2000:]
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=RECIPE.parents[1])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 3 on 2 workers" in resumed.stdout + resumed.stderr
    after = steps(run_dir)
    for step in range(4, 9):
        assert after[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), step
