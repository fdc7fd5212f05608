import os
import sys
from pathlib import Path

import pytest

from tests import tiny

# Every worker's lines in the test log (Ray folds repeated lines by default), and no tokenizer thread pools.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch builds C++ ops (DeepSpeed's CPU Adam, the lock tests' op) with whichever `ninja` is first on PATH, and each
# ninja version reads the other's build log as stale: with the venv's ninja in Slurm jobs (which activate the venv)
# and the system's elsewhere, every switch rebuilt the op. The venv's own, everywhere.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the GPU host)")
    config.addinivalue_line("markers", "slow: trains through Ray; minutes on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny.build(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from ftcluster import cluster

    # Always a fresh cluster for the session, never one a `ray start` left on the host (ray.init() otherwise joins
    # the cluster named in /tmp/ray/ray_current_cluster, even a dead one), and one its own processes find.
    cluster.start_local(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def process_group():
    """One single-rank gloo process group for a test module that builds DeepSpeed engines in the test process:
    DeepSpeed caches its groups globally across engines."""
    import torch.distributed as dist

    from ftcluster.cluster import free_port

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LOCAL_RANK": "0", "RANK": "0",
           "WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        # Also drops the groups DeepSpeed keeps, which the next module's engine would find destroyed.
        deepspeed.comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
