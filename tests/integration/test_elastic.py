"""Training on through a lost node: a Ray cluster of two nodes on this host (two ``ray start`` processes, one CPU
and one worker each), the run elastic (``scaling.min_workers=1``); the second node is killed mid-run, and later
started again. The harness is the fault drill's (benchmarks/faults.py), which reports the same event."""

import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import faults

pytestmark = pytest.mark.slow
STEPS = 80


def test_a_run_goes_on_through_a_lost_node_on_the_workers_left_and_grows_back_at_a_checkpoint(tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="ftcel", dir="/tmp"))  # Ray's socket paths must stay short
    storage = tmp_path / "runs"
    storage.mkdir()
    (lost, back), run, out, code = faults.node_loss(storage, temp, steps=STEPS, kill_after=15, save_every=10)
    assert code == 0, out[-5000:]
    assert run[-1]["step"] == STEPS and (storage / "node-loss" / "final").is_dir()
    assert json.loads((storage / "node-loss" / "summary.json").read_text())["final_step"] == STEPS

    # After the loss: one worker, from the last checkpoint saved on two (DeepSpeed's universal checkpoint).
    # (The lines in the order written: a step's line can reach metrics.jsonl just after the kill, when the driver
    # reads the workers' report, so the lines are split where the worker count changes, not at the kill's time.)
    first_on_one = next(i for i, l in enumerate(run) if l["world_size"] == 1)
    assert {l["world_size"] for l in run[:first_on_one]} == {2}
    assert lost.at_step == run[first_on_one - 1]["step"] >= 15
    assert lost.resumed_from >= 10 and lost.resumed_from % 10 == 0
    assert run[first_on_one]["step"] == lost.resumed_from + 1
    assert (lost.resumed_from, 1, 2) in faults.resumed_steps(out)
    # Sized by the nodes alive, the restart asked for the one worker there was room for at once: sized by Ray Data's
    # coordinator's reservation, which still held the lost node, it asked for two and waited out the worker group's
    # start timeout (60 s) before trying with one.
    assert "worker group startup timed out" not in out, out[-5000:]
    # Back to two at a checkpoint the workers saved for it, going on from the next step: nothing done twice.
    assert back.at_step > lost.resumed_from and back.steps_redone == 0
    after_back = [l for l in run if l["time"] > back.at_unix]
    assert after_back[0]["step"] == back.at_step + 1 and {l["world_size"] for l in after_back} == {2}
    assert (back.at_step, 2, 1) in faults.resumed_steps(out)
    assert {l["world_size"] for l in run[first_on_one:] if l["time"] <= back.at_unix} == {1}
    # Every metrics line says its worker count; the only steps logged twice are those after the checkpoint the
    # loss sent the run back to.
    assert all(l["world_size"] in (1, 2) for l in run)
    twice = sorted(step for step, n in Counter(l["step"] for l in run).items() if n > 1)
    assert twice == list(range(lost.resumed_from + 1, lost.at_step + 1))
    # The global batch is kept: the one worker accumulates twice the micro batches.
    assert "workers: 1 (scaling.min_workers=1 to num_workers=2), 2 micro batches" in out
