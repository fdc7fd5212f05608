"""Forward + backward of one linear layer: fully trained vs frozen + LoRA (r=16), as PEFT builds it."""

import pytest
import torch

from benchmarks.micro.conftest import synced


def _layer(method: str, dims, device):
    from peft import LoraConfig, get_peft_model

    h = dims["hidden"]
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(h, h, bias=False, device=device, dtype=dims["dtype"]))
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["proj"]),
                               autocast_adapter_dtype=False)
    return model


@pytest.mark.parametrize("method", ["full", "lora"])
def test_linear_forward_backward(benchmark, method, dims, device):
    layer = _layer(method, dims, device)
    x = torch.randn(dims["tokens"], dims["hidden"], device=device, dtype=dims["dtype"], requires_grad=True)

    def step():
        layer(x).float().pow(2).mean().backward()

    benchmark.extra_info.update(method=method, device=str(device), **{k: str(v) for k, v in dims.items()})
    benchmark(synced(device, step))
    trained = [p for p in layer.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
