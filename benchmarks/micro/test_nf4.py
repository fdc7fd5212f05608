"""NF4 with double quantization (bitsandbytes): quantize, dequantize, and the 4-bit matmul against a 16-bit one."""

import pytest
import torch

from benchmarks.micro.conftest import synced

bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(scope="module")
def weight(dims, device):
    torch.manual_seed(0)
    return torch.randn(dims["hidden"], dims["hidden"], device=device, dtype=dims["dtype"])


def test_nf4_quantize(benchmark, weight, device):
    q, state = benchmark(synced(device, lambda: bnb_functional.quantize_4bit(
        weight, quant_type="nf4", compress_statistics=True)))
    assert q.numel() * q.element_size() * 2 == weight.numel()  # two 4-bit values per byte


def test_nf4_dequantize(benchmark, weight, device):
    q, state = bnb_functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    w = benchmark(synced(device, lambda: bnb_functional.dequantize_4bit(q, state, quant_type="nf4")))
    assert (w.float() - weight.float()).abs().mean() < 0.1 * weight.float().abs().mean()


@pytest.mark.parametrize("kind", ["16bit", "nf4"])
def test_matmul(benchmark, kind, weight, dims, device):
    import bitsandbytes as bnb

    x = torch.randn(dims["tokens"], dims["hidden"], device=device, dtype=dims["dtype"])
    if kind == "nf4":
        q, state = bnb_functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        fn = lambda: bnb.matmul_4bit(x, q.t(), quant_state=state)
    else:
        fn = lambda: x @ weight.t()
    benchmark.extra_info.update(kind=kind, device=str(device))
    out = benchmark(synced(device, fn))
    assert out.shape == (dims["tokens"], dims["hidden"])
