"""Bad input, as a user gives it, through the real command: each row is the input, the exit code, a fragment of
the message, and what must not be lost. The next bad input is one more row. All are refused before Ray starts."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
ROW = {"instruction": "What is 2+2?", "output": "4"}


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# (name, file name, file content (str or bytes), extra overrides, exit code, message fragment)
CASES = [
    ("a field missing from one row", "d.jsonl", _jsonl([ROW] * 5 + [{"instruction": "x"}] + [ROW] * 5), [], 2,
     "row 6: field 'output' is missing"),
    ("a number where text is needed", "d.jsonl", _jsonl([ROW] * 3 + [{"instruction": "x", "output": 4}]), [], 2,
     "row 4: field 'output' is a int"),
    ("an empty data file", "d.jsonl", "", [], 2, "holds no rows"),
    ("a malformed line", "d.jsonl", _jsonl([ROW] * 2) + '{"instruction": "x", "output": }\n', [], 2,
     "line 3: not valid JSON"),
    ("bytes that are not UTF-8", "d.jsonl", _jsonl([ROW]).encode() + b'{"instruction": "\xff", "output": "4"}\n', [],
     2, "line 2: not UTF-8"),
    ("every example longer than max_seq_len", "d.jsonl",
     _jsonl([{"instruction": "word " * 300, "output": "4"}] * 8), ["data.max_seq_len=32"], 2, "raise data.max_seq_len"),
    ("too few rows for the workers", "d.jsonl", _jsonl([ROW] * 3), ["scaling.num_workers=8"], 2,
     "fewer than scaling.num_workers x training.micro_batch_size"),
    ("a chat file whose rows have no assistant turn", "d.jsonl",
     _jsonl([{"messages": [{"role": "user", "content": "hi"}]}] * 3), ["data.format=chat"], 2,
     "no training examples (left out: {'chat rows without an assistant turn': 3})"),
    ("storage under a regular file", "d.jsonl", _jsonl([ROW] * 40), ["output.storage_path={tmp}/afile/runs"], 2,
     "output.storage_path="),
    ("more workers than the cluster has CPUs", "d.jsonl", _jsonl([ROW] * 400),
     ["scaling.num_workers=64", "scaling.use_gpu=false", "ray.address=local", "data.packing=false"], 2,
     "scaling.num_workers=64 x scaling.cpus_per_worker=1 needs 64 CPU"),
    ("more checkpointed layers than the model has", "d.jsonl", _jsonl([ROW] * 40),
     ["model.gradient_checkpointing=true", "model.checkpointed_layers=9"], 2,
     "model.checkpointed_layers=9: llama has 2 decoder layers"),
    ("GPUs too small for the run", "d.jsonl", _jsonl([ROW] * 40),
     ["resources.gpu_memory_gib=0.5", "scaling.use_gpu=true"], 2, "--force"),
    ("an accumulation longer than an epoch", "d.jsonl", _jsonl([ROW] * 40),
     ["training.gradient_accumulation_steps=32", "data.packing=false"], 2,
     "micro batches per worker an epoch (36 rows over scaling.num_workers=1 x training.micro_batch_size=2), fewer "
     "than the 32 a step accumulates (training.gradient_accumulation_steps): lower it to at most 18"),
    ("batch sizes in deepspeed.overrides", "d.jsonl", _jsonl([ROW] * 40),
     ["deepspeed.overrides={{train_micro_batch_size_per_gpu: 4}}"], 2,
     "deepspeed.overrides sets train_micro_batch_size_per_gpu: the batch is the run's own; set "
     "training.micro_batch_size instead"),
    ("a ray.address where no cluster answers", "d.jsonl", _jsonl([ROW] * 40), ["ray.address=127.0.0.1:1"], 2,
     "ray.address=127.0.0.1:1: nothing answers there within 10 s"),
    ("float16 on CPU workers", "d.jsonl", _jsonl([ROW] * 40), ["model.dtype=float16"], 2,
     "model.dtype=float16 with workers on CPUs"),
    ("a model with fewer token embeddings than its tokenizer", "d.jsonl", _jsonl([ROW] * 40),
     ["model.random_init=true", "model.config_overrides={{vocab_size: 100}}"], 2,
     "the model has 100 token embeddings (model.config_overrides sets vocab_size) and its tokenizer 512 tokens"),
]


@pytest.mark.parametrize("name,filename,content,extra,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_the_field_and_the_fix(tiny_model, tmp_path, name, filename, content, extra, code,
                                                         fragment):
    data_file = tmp_path / filename
    data_file.write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "afile").write_text("a regular file")
    kept = tmp_path / "runs" / "earlier" / "final"
    kept.mkdir(parents=True)
    (kept / "adapter_model.safetensors").write_text("a user's earlier output")
    overrides = [f"model.name_or_path={tiny_model}", "model.random_init=false", "model.config_overrides={}",
                 f"data.source={data_file}", "data.eval_fraction=0.1", f"output.storage_path={tmp_path / 'runs'}",
                 "output.name=bad", "scaling.num_workers=1", "training.micro_batch_size=2",
                 *[o.format(tmp=tmp_path) for o in extra]]
    proc = subprocess.run([sys.executable, "-m", "ftcluster.train", "--config", str(REPO / "configs/tiny_cpu.yaml"),
                           *overrides], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert fragment in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if "ray.address=local" not in extra:  # refused before Ray starts, unless the cluster itself is the problem
        assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs" / "bad").exists()  # nothing written for a refused run
    assert (kept / "adapter_model.safetensors").read_text() == "a user's earlier output"


def test_a_stale_cluster_record_starts_a_local_cluster_in_seconds_that_its_own_processes_find():
    """`ray.init()` with no address joins the cluster recorded in <RAY_TMPDIR>/ray/ray_current_cluster, and waits
    minutes for it when it has died; the driver probes it first. The cluster it starts instead is the one the state
    API finds from inside it (Ray Train's placement-group cleaner asks it about every run), not the record's."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")  # nothing listens there
        script = ("import time, ray; from ftcluster import cluster, config; t = time.time(); "
                  "own = cluster.join(config.load(None, ['scaling.use_gpu=false'])); "
                  "print('OWN', own, 'SECONDS', round(time.time() - t), flush=True); "
                  "nodes = ray.get(ray.remote(lambda: len(__import__('ray.util.state').util.state.list_nodes("
                  "timeout=20))).remote()); print('NODES', nodes, len(ray.nodes()))")
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=REPO,
                              env={**os.environ, "RAY_TMPDIR": tmp})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "does not answer; starting a local one" in proc.stdout and "OWN True" in proc.stdout
        assert int(proc.stdout.split("SECONDS")[1].split()[0]) < 60
        assert "NODES 1 1" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("held_by", ["another config", "a live driver elsewhere"])
def test_a_run_directory_held_by_another_run_is_refused_before_ray(tiny_model, tmp_path, held_by):
    from ftcluster import config as C

    data_file = tmp_path / "d.jsonl"
    data_file.write_text(_jsonl([ROW] * 40))
    overrides = [f"model.name_or_path={tiny_model}", "model.random_init=false", "model.config_overrides={}",
                 f"data.source={data_file}", f"output.storage_path={tmp_path / 'runs'}", "output.name=held",
                 "scaling.num_workers=1"]
    run_dir = tmp_path / "runs" / "held"
    run_dir.mkdir(parents=True)
    if held_by == "another config":
        other = C.load(REPO / "configs/tiny_cpu.yaml", [*overrides, "method=full"])
        C.save_resolved(other, run_dir / "config.yaml")
        fragment = "already holds a run with a different config"
    else:
        (run_dir / "LOCK").write_text(json.dumps({"pid": 4242, "host": "node-9", "started": "earlier"}))
        fragment = "in use by the run PID 4242 started on node-9"
    proc = subprocess.run([sys.executable, "-m", "ftcluster.train", "--config", str(REPO / "configs/tiny_cpu.yaml"),
                           *overrides], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr[-2000:]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("when", ["while importing, at 0.3 s", "while importing, at 0.8 s", "while importing, at 1.5 s",
                                  "once the plan is printed"])
def test_ctrl_c_before_training_starts_is_one_line_and_exit_130(tiny_model, tmp_path, when):
    """At any moment of the imports: a KeyboardInterrupt raised inside one was once caught by the library imported,
    which then failed (a half-imported numpy recursing) with exit 1 and a traceback."""
    import signal
    import time

    cmd = [sys.executable, "-u", "-m", "ftcluster.train", "--config", str(REPO / "configs/tiny_cpu.yaml"),
           f"model.name_or_path={tiny_model}", "model.random_init=false", "model.config_overrides={}",
           f"output.storage_path={tmp_path / 'runs'}", "output.name=ctrl-c", "scaling.num_workers=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    if when.startswith("while importing"):
        time.sleep(float(when.split("at ")[1].rstrip(" s")))
    else:
        for line in proc.stdout:
            if line.startswith("plan:"):
                break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted (Ctrl-C)" in err, err[-2000:]
    if not when.startswith("while importing"):
        assert "no checkpoint was saved; running the same command again starts from step 1" in err


def _killed_after_its_first_checkpoint(cmd: list[str], run_dir: Path) -> dict:
    """Start ``cmd``, kill it (SIGKILL, the whole process group) once its first checkpoint is complete, and return
    every file of the run directory it left (but the lock) with its hash."""
    import signal
    import time

    driver = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list(run_dir.glob("checkpoint_step*/manifest.json")):
            assert time.time() < deadline and driver.poll() is None, "no checkpoint"
            time.sleep(0.3)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    return _hashes(run_dir)


def _hashes(run_dir: Path) -> dict:
    import hashlib

    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()
            and p.name != "LOCK"}


def test_resuming_padding_free_rows_with_another_micro_batch_is_refused_and_leaves_the_run_as_it_was(
        tiny_model, tmp_path):
    """Padding-free rows are regrouped by the micro batch, which a resumed run may otherwise change: a run killed
    after its first checkpoint, started again with another micro batch, is refused naming the one that resumes it;
    with its own it resumes."""
    cmd = [sys.executable, "-m", "ftcluster.train", "--config", str(REPO / "configs/tiny_cpu.yaml"),
           f"model.name_or_path={tiny_model}", "model.random_init=false", "model.config_overrides={}",
           "data.source=builtin:required-args", "data.max_seq_len=128", "data.padding_free=true",
           f"output.storage_path={tmp_path / 'runs'}", "output.name=free", "scaling.num_workers=1",
           "training.max_steps=40", "training.save_every=2", "training.log_every=1"]
    run_dir = tmp_path / "runs" / "free"
    _killed_after_its_first_checkpoint([*cmd, "training.micro_batch_size=4"], run_dir)
    partial = run_dir / "checkpoint_step9999999"  # a checkpoint the kill cut short: set aside only by a run that starts
    partial.mkdir(exist_ok=True)
    (partial / "progress.json").write_text("{")
    before = _hashes(run_dir)
    proc = subprocess.run([*cmd, "training.micro_batch_size=2"], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Set data.padding_free=true with training.micro_batch_size=4 to resume it" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _hashes(run_dir) == before
    proc = subprocess.run([*cmd, "training.micro_batch_size=4"], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from step" in proc.stdout + proc.stderr
    assert "Set aside as checkpoint_step9999999.unusable" in proc.stdout + proc.stderr


def test_resuming_on_a_data_file_changed_in_place_is_refused_naming_it(tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(_jsonl([{"instruction": f"What is {i}+{i}?", "output": str(2 * i)} for i in range(200)]))
    cmd = [sys.executable, "-m", "ftcluster.train", "--config", str(REPO / "configs/tiny_cpu.yaml"),
           f"model.name_or_path={tiny_model}", "model.random_init=false", "model.config_overrides={}",
           f"data.source={data}", "data.eval_fraction=0.1", f"output.storage_path={tmp_path / 'runs'}",
           "output.name=changed", "scaling.num_workers=1", "training.max_steps=40", "training.save_every=2",
           "training.log_every=1"]
    run_dir = tmp_path / "runs" / "changed"
    before = _killed_after_its_first_checkpoint(cmd, run_dir)
    data.write_text(_jsonl([{"instruction": f"What is {i}*{i}?", "output": str(i * i)} for i in range(200)]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"data.source={data}: its rows differ from those {run_dir} was trained on" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _hashes(run_dir) == before  # the checkpoints and records are as the killed run left them


def test_a_model_file_cut_short_is_refused_before_ray_starts_naming_it(tiny_model, tmp_path):
    """What a download cut short leaves was found only by every worker, after the cluster started, as a traceback
    per worker and the advice to run again from step 1."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5000])
    cmd = [sys.executable, "-m", "ftcluster.train", "--config", str(REPO / "configs/tiny_cpu.yaml"),
           f"model.name_or_path={model}", "model.random_init=false", "model.config_overrides={}",
           "data.max_examples=64", f"output.storage_path={tmp_path / 'runs'}", "output.name=cut"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"model.name_or_path={model}: {weights} is cut short: " in proc.stderr, proc.stderr[-2000:]
    assert "download the model again" in proc.stderr and "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs" / "cut").exists()


def test_an_error_every_restart_would_repeat_ends_the_run_whatever_max_failures_says(tiny_model, tmp_path):
    """ray.max_failures=-1 once restarted such a run forever (seven attempts in 150 s, and on)."""
    cmd = [sys.executable, "-m", "ftcluster.train", "--config", str(REPO / "configs/tiny_cpu.yaml"),
           f"model.name_or_path={tiny_model}", "model.random_init=false", "model.config_overrides={}",
           "data.max_examples=64", "training.max_steps=3", "ray.max_failures=-1",
           # Passes every check of the driver's; DeepSpeed refuses it in the workers, every time.
           "deepspeed.overrides={bf16: {enabled: true}, fp16: {enabled: true}}",
           f"output.storage_path={tmp_path}", "output.name=repeats"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "AssertionError: bfloat16 and fp16 modes cannot be simultaneously enabled" in proc.stderr
    assert "running it again fails the same way; fix it first" in proc.stderr
    # One attempt: the two workers' processes and no others (a restart starts new ones), the first to fail ending it.
    out = proc.stdout + proc.stderr
    assert "Error in training function" in out
    assert len(set(re.findall(r"RayTrainWorker pid=(\d+)", out))) <= 2, out[-3000:]
    # Each worker's traceback is in its file, not on the terminal: there, one line per worker and one for the run.
    kept = sorted((tmp_path / "repeats" / "worker_errors").glob("rank*.txt"))
    assert kept and all("Traceback (most recent call last)" in k.read_text() for k in kept)
    assert "Traceback" not in out, out[-3000:]
    assert re.search(r"error: training failed: AssertionError: bfloat16 and fp16 modes cannot be simultaneously "
                     r"enabled \(ranks? [0-9, ]+\)\nthe workers' tracebacks: .*worker_errors/", proc.stderr), proc.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 3.2 MB file system (tmpfs): room for the tiny model's first checkpoint (2 MB), not for its second."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3200k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_lock_left_in_deepspeeds_cpu_op_directory_does_not_stop_a_cpu_run(tiny_model, tmp_path):
    """DeepSpeed built its CPU shared-memory op, which only its inference uses, as each CPU run joined its process
    group; a run killed while holding that build's lock left every later CPU run on the host waiting on it, silently
    and for ever (what this test's run did before)."""
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()  # as a killed build leaves it: empty, naming no holder
    cmd = [sys.executable, "-m", "ftcluster.train", "--config", str(REPO / "configs/tiny_cpu.yaml"),
           f"model.name_or_path={tiny_model}", "model.random_init=false", "model.config_overrides={}",
           "data.max_examples=16", "training.max_steps=3", "scaling.num_workers=1",
           f"output.storage_path={tmp_path / 'runs'}", "output.name=locked"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(extensions.rglob("*.so"))  # and nothing was built


@pytest.mark.parametrize("where", ["in process", "on Ray"])
def test_a_full_disk_names_itself_and_the_intact_checkpoint_and_leaves_no_partial_one(tiny_model, small_disk,
                                                                                      where):
    from ftcluster import checkpoint

    on = ["scaling.num_workers=1", "ray.local_mode=true"] if where == "in process" else \
        ["scaling.num_workers=2", "ray.max_failures=-1"]
    cmd = [sys.executable, "-m", "ftcluster.train", "--config", str(REPO / "configs/tiny_cpu.yaml"),
           f"model.name_or_path={tiny_model}", "model.random_init=false", "model.config_overrides={}",
           "method=full", "data.max_examples=64", "training.max_steps=12", "training.save_every=4",
           f"output.storage_path={small_disk}", "output.name=full", *on]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    run_dir = small_disk / "full"
    intact = run_dir / "checkpoint_step0000004"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (f"error: training failed: OSError: [Errno 28] No space left on the disk of {run_dir} while writing the "
            f"checkpoint of step 8; its partial files were removed, and the latest intact checkpoint is {intact}"
            in proc.stderr), proc.stderr[-3000:]
    assert "unexpected pos" not in proc.stderr.split("error: training failed:")[1]
    assert "Free space there, or set output.storage_path to a larger disk" in proc.stderr
    assert checkpoint.latest(run_dir) == intact and checkpoint.problem(intact) is None
    assert not list(run_dir.glob(".*partial")) and not (run_dir / "checkpoint_step0000008").exists()
    # A full disk is not restarted into again, whatever ray.max_failures says.
    assert (proc.stdout + proc.stderr).count("resumed from step") == 0


def test_a_local_ray_cluster_that_cannot_start_is_one_sentence_naming_what_to_do(tiny_model, tmp_path):
    """Ray's own start failing (here its temp directory is a file; under load, its 30 s startup timeout) once reached
    the user as a raw traceback."""
    (tmp_path / "afile").write_text("not a directory")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "ftcluster.train", "--config", str(REPO / "configs/tiny_cpu.yaml"),
                           f"model.name_or_path={tiny_model}", "model.random_init=false", "model.config_overrides={}",
                           "data.max_examples=64", "ray.address=local", f"output.storage_path={tmp_path / 'runs'}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**env, "RAY_TMPDIR": str(tmp_path / "afile" / "ray")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: Ray's local cluster did not start (NotADirectoryError" in proc.stderr
    assert "ray start --head" in proc.stderr and "ray.local_mode=true" in proc.stderr
