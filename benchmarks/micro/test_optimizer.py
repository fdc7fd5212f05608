"""One optimizer step over a LoRA-sized set of parameters (64 adapter pairs): AdamW vs 8-bit vs paged 8-bit."""

import pytest
import torch

from benchmarks.micro.conftest import synced

OPTIMIZERS = ["adamw", "adamw_8bit", "paged_adamw_8bit"]


def _make(name: str, params, device):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    import bitsandbytes as bnb

    if name == "paged_adamw_8bit" and device.type != "cuda":
        pytest.skip("paged optimizers page GPU memory; there is no GPU")
    return {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name](params, lr=1e-4)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_step(benchmark, name, dims, device):
    torch.manual_seed(0)
    h = dims["hidden"]
    params = [torch.nn.Parameter(torch.randn(shape, device=device, dtype=dims["dtype"]) * 0.01)
              for _ in range(64) for shape in ((16, h), (h, 16))]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = _make(name, params, device)
    before = params[0].detach().clone()
    benchmark.extra_info.update(optimizer=name, params=sum(p.numel() for p in params), device=str(device))
    benchmark(synced(device, opt.step))
    assert not torch.equal(before, params[0].detach())
