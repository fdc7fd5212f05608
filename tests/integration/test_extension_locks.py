"""A JIT build of a C++ op (torch.utils.cpp_extension, which DeepSpeed's op builders use) after a process was killed
holding the build directory's lock: ftcluster.patches.torch_extension_locks_with_owner. Real builds of a one-line
op, in processes of their own; the lock's holder is a process that takes it as torch's build does, then is killed."""

import ctypes
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

HOLD = textwrap.dedent("""
    import sys, time
    import ftcluster  # installs the patch, which applies as torch's extension builder is imported
    import torch.utils.cpp_extension as ext
    assert ext.FileBaton(sys.argv[1]).try_acquire()
    print("held", flush=True)
    time.sleep(600)
""")

BUILD = textwrap.dedent("""
    import sys
    from ftcluster import patches
    patches.LOCK_NOTICE_AFTER_S = 1.0
    import torch.utils.cpp_extension as ext
    ext.load("answer", [sys.argv[1]], build_directory=sys.argv[2], is_python_module=False)
    print("built", flush=True)
""")


@pytest.fixture
def op(tmp_path):
    source = tmp_path / "answer.cpp"
    source.write_text('extern "C" int answer() { return 42; }\n')
    build = tmp_path / "build"
    build.mkdir()
    return source, build


def _hold(lock: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _build(source: Path, build: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILD, str(source), str(build)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _built(builder: subprocess.Popen, build: Path) -> str:
    out, err = builder.communicate(timeout=300)
    assert builder.returncode == 0 and "built" in out, err[-3000:]
    assert ctypes.CDLL(str(build / "answer.so")).answer() == 42
    return err


def test_a_lock_left_by_a_killed_build_on_this_host_is_taken_over_and_the_op_built(op):
    """Without the patch the build waits on the lock forever."""
    source, build = op
    holder = _hold(build / "lock")
    holder.kill()
    holder.wait()
    assert (build / "lock").exists()
    err = _built(_build(source, build), build)
    assert f"took over {build / 'lock'}, left by a build whose process ({holder.pid}) died holding it" in err
    assert not (build / "lock").exists()


def test_builds_wait_on_a_live_holder_and_when_it_dies_one_takes_over_and_all_load_the_op(op):
    """Several workers of a node waiting on one build: when its process dies, one of them builds, the others wait
    on that one (none loads the op before it is built, none builds it beside another)."""
    source, build = op
    holder = _hold(build / "lock")
    try:
        builders = [_build(source, build) for _ in range(3)]
        time.sleep(4)
        assert all(b.poll() is None for b in builders) and (build / "lock").exists(), \
            "a waiting build took a live holder's lock"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    errs = [_built(b, build) for b in builders]
    assert sum("took over" in err for err in errs) == 1, errs
    assert not (build / "lock").exists()


def test_a_lock_held_on_another_host_is_waited_on_and_named(op, tmp_path):
    """Its holder's liveness cannot be told from here: the build waits, and says on which lock, held by whom."""
    source, build = op
    (build / "lock").write_text("node-9 4242 123\n")
    log = tmp_path / "stderr"
    with log.open("w") as err:
        builder = subprocess.Popen([sys.executable, "-c", BUILD, str(source), str(build)], cwd=REPO, stderr=err)
    try:
        deadline = time.time() + 120
        while "waiting on" not in log.read_text():
            assert time.time() < deadline and builder.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        builder.kill()
        builder.wait()
    assert f"waiting on {build / 'lock'}, held by PID 4242 on node-9" in log.read_text()
    assert "delete that file" in log.read_text() and (build / "lock").exists()
