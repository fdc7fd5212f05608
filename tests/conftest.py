import os
from pathlib import Path

import pytest

from tests import tiny

# Ray's local clusters must not fight over the 2 cores of a CI machine with leftover ones.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def tiny_overrides(model_dir: Path, storage: Path, name: str, **extra) -> list[str]:
    """Overrides that turn any recipe into a seconds-long CPU run on the tiny model."""
    base = {
        "model.name_or_path": str(model_dir), "model.dtype": "bfloat16",
        "data.max_examples": 256, "data.max_seq_len": 128, "data.eval_fraction": 0.1,
        "training.micro_batch_size": 2, "training.max_steps": 12, "training.log_every": 2,
        "training.eval_batches": 4, "scaling.num_workers": 2, "scaling.use_gpu": False,
        "output.storage_path": str(storage), "output.name": name, "optimizer.lr": 3e-3,
        "scheduler.warmup_steps": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
