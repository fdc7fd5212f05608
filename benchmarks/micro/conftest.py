"""Microbenchmarks (pytest-benchmark) of the kernels the three methods lean on, on the GPU when there is one:

    python -m pytest benchmarks/micro --benchmark-json reports/micro/<date>-<hardware>.json

Sizes are a 7B layer's (4096 x 4096, 4096 tokens) on a GPU and a quarter of that on CPU."""

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def dims(device) -> dict:
    """hidden size, tokens per batch and compute dtype (bf16 on GPU; fp32 on CPUs, which emulate bf16)."""
    if device.type == "cuda":
        return {"hidden": 4096, "tokens": 4096, "dtype": torch.bfloat16}
    return {"hidden": 1024, "tokens": 512, "dtype": torch.float32}


def synced(device, fn):
    """``fn`` followed by a device sync, so a benchmark times the kernels and not their launch."""
    def run():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out
    return run
