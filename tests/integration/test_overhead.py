"""benchmarks.overhead (the worker's setup and step loop without Ray, with a host profile of rank 0) on the tiny
model: it makes the run's plan as the driver does, trains, and writes the profile."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_overhead_trains_the_worker_loop_and_profiles_its_steps(tiny_model, tmp_path):
    profile = tmp_path / "profile.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.overhead", "--cprofile", str(profile), "--skip", "1",
         "--config", "configs/bench/tiny.yaml", f"model.name_or_path={tiny_model}", "training.max_steps=3",
         f"output.storage_path={tmp_path}", "output.name=ov"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = re.findall(r"^step (\d+): loss ([\d.]+)", proc.stdout, re.MULTILINE)
    assert [int(s) for s, _ in steps] == [1, 2, 3]
    text = profile.read_text()
    assert text.startswith("rank 0, 2 steps after the first 1") and "engine.py" in text  # the step loop's own calls
