"""What a newcomer meets first: the commands' help, and the errors for what is not there (a run directory, a hub
model offline), each one line that names the thing and what to do."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftcluster import config as C, train

REPO = Path(__file__).resolve().parents[2]


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_help_lists_the_commands_and_exits_0():
    proc = _run("ftcluster", "--help")
    assert proc.returncode == 0
    assert all(f"  {c}" in proc.stdout for c in ("train", "plan", "estimate", "merge"))
    assert _run("ftcluster").returncode == 2  # no command: the same list, on stderr
    merge = _run("ftcluster", "merge", "--help").stdout
    assert "save safetensors." in merge  # the description whole, not cut at its first line


def test_merge_names_a_missing_adapter_directory(tmp_path, monkeypatch):
    from ftcluster import merge

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "mine-cpu" / "final").mkdir(parents=True)
    with pytest.raises(C.ConfigError, match=r"--adapter runs/mine/final does not exist: .*runs/mine-cpu"):
        merge.merge("runs/mine/final", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_hub_model_that_cannot_be_read_offline_is_one_line_naming_it_and_the_cache(tmp_path):
    proc = _run("ftcluster.train", "model.name_or_path=nobody/no-such-model", f"output.storage_path={tmp_path}",
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in proc.stderr
    assert "model.name_or_path=nobody/no-such-model" in error[0] and str(tmp_path / "hf") in error[0]
    assert "HF_TOKEN" in error[0] and "HF_HOME" in error[0]
    assert not (tmp_path / "no-such-model-lora").exists()


def test_the_trainer_run_by_a_python_without_its_dependencies_says_how_to_enter_the_environment():
    """``-S``: no site-packages, as a Python outside the project's environment."""
    proc = subprocess.run([sys.executable, "-S", "-m", "ftcluster.train", "--config", "configs/tiny_cpu.yaml"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "is not installed in this Python" in proc.stderr and "source .venv/bin/activate" in proc.stderr
    assert "resume" not in proc.stderr


def test_estimate_refuses_a_gpu_memory_that_is_not_a_size():
    from ftcluster import cli

    for bad in ("-80", "0", "lots"):
        with pytest.raises(SystemExit, match=rf"--gpu-memory {bad}: "):
            cli.gpu_budget_gib(bad)
    assert cli.gpu_budget_gib("80") == 80.0 and cli.gpu_budget_gib("h100") > 70


def test_a_broken_model_config_json_is_named_not_a_json_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    proc = subprocess.run([sys.executable, "-m", "ftcluster", "estimate", "--config", "configs/tiny_cpu.yaml",
                           f"model.name_or_path={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'config.json'} is not a JSON object of the model's config" in proc.stderr


def test_estimate_says_which_loss_it_counts_and_why_where_it_is_not_ligers_fused_one():
    # The loss is the largest term at long rows (the whole logits, against a chunk of them fused).
    proc = _run("ftcluster", "estimate", "--config", "configs/tiny_cpu.yaml", "model.liger_kernel=off")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("loss: chunked: ")
    assert proc.stdout.splitlines()[-1].endswith("(Liger not applied: model.liger_kernel=off)")


def test_plan_for_another_device_takes_the_gpu_memory_from_the_recipe_or_the_command_line():
    """``plan --device cuda`` from a login node dropped ``resources.gpu_memory_gib``: \"the GPUs' memory is not
    known\", no fit verdict, and the memory savers decided blind."""
    for extra, source, gib in ((["resources.gpu_memory_gib=40"], "resources.gpu_memory_gib", "40.0"),
                               (["resources.gpu_memory_gib=40", "--gpu-memory", "24"], "--gpu-memory", "24.0")):
        proc = _run("ftcluster", "plan", "--config", "configs/tiny_cpu.yaml", "--device", "cuda", *extra)
        assert proc.returncode == 0, proc.stderr
        line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("memory_gib"))
        assert f"of {gib} GiB ({source}): fits" in line, line
        assert "not known" not in proc.stdout


def test_estimate_and_plan_take_whether_the_gpu_nodes_have_liger_from_the_command_line():
    """Planned on a login node without Liger, a GPU run's loss was counted whole; --liger says what the GPU nodes
    have, either way, whatever this host has."""
    def logits(liger):
        proc = _run("ftcluster", "estimate", "--config", "configs/llama2_7b_qlora.yaml", "data.max_seq_len=4096",
                    "model.gradient_checkpointing=true", "--liger", liger)
        assert proc.returncode == 0, proc.stderr
        term = next(line for line in proc.stdout.splitlines() if line.startswith("  logits and loss"))
        return float(term.split()[-1]), proc.stdout.splitlines()[-1]

    (fused, last_yes), (whole, last_no) = logits("yes"), logits("no")
    assert fused < whole / 3 and not last_yes.startswith("loss:")
    assert last_no.startswith("loss: chunked: ") and "Liger not applied" in last_no and "--liger" not in last_no
    for liger, loss in (("yes", "liger-fused"), ("no", "chunked")):
        proc = _run("ftcluster", "plan", "--config", "configs/tiny_cpu.yaml", "--device", "cuda", "--json",
                    "--liger", liger)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["loss"] == loss


def test_submit_names_an_unreachable_or_malformed_address_and_takes_absolute_recipe_paths_inside_the_checkout(capsys):
    from launchers import submit

    assert submit.main(["--address", "http://127.0.0.1:9", "--config", "configs/tiny_cpu.yaml"]) == 2
    err = capsys.readouterr().err
    assert "--address http://127.0.0.1:9: no Ray dashboard answered" in err and "Traceback" not in err
    with pytest.raises(SystemExit, match="--address http://a b: not a dashboard address"):
        submit.main(["--address", "http://a b", "--config", "configs/tiny_cpu.yaml"])
    recipe = submit.ROOT / "configs" / "tiny_cpu.yaml"
    assert submit.main(["--address", "http://127.0.0.1:9", "--config", str(recipe), "--print-command"]) == 0
    assert "python -m ftcluster.train --config configs/tiny_cpu.yaml" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a file inside"):
        submit.main(["--address", "http://127.0.0.1:9", "--config", "/etc/hostname"])


def test_a_ctrl_c_caught_after_passing_through_an_exec_still_exits_130_not_by_sigint(tmp_path):
    """Started with ``-m``, CPython ends the process by SIGINT when a KeyboardInterrupt ever passed through an
    ``exec`` of a string, caught or not; a Ctrl-C landing in a dataclass being built at import gave exit -2 in CI."""
    (tmp_path / "interrupted_in_exec.py").write_text(
        "from ftcluster import checkpoint, train  # imported first: a later exec() would clear the mark\n"
        "def _main(argv, loaded, in_main):\n"
        "    exec('raise KeyboardInterrupt')  # as a dataclass's methods are built\n"
        "train._main = _main\n"
        "if __name__ == '__main__':\n"
        "    train.leave(train.main([]))\n")
    proc = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == train.INTERRUPTED, proc.stderr[-2000:]
    assert "interrupted (Ctrl-C): no checkpoint was saved" in proc.stderr and "Traceback" not in proc.stderr
