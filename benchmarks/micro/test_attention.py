"""Forward + backward of one Llama-3-8B attention (32 query heads over 8 key/value heads of 128) over causal rows of
one sequence: PyTorch's varlen flash kernel, as ftcluster attends packed rows, against SDPA's own choice of kernel
(cuDNN's fused attention where torch picks it), with ``enable_gqa`` as ftcluster/attention.py attends a batch of
one-example rows there, and with the key/value heads repeated. TFLOP/s counts the causal half of QK^T and PV,
forward and backward (the backward 2.5 times the forward). GPU only."""

import pytest
import torch

from benchmarks.micro.conftest import synced
from ftcluster import attention, patches

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
LENGTHS = (4096, 16384, 32768)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("route", ["varlen", "sdpa-gqa", "sdpa-repeated"])
def test_causal_attention_forward_backward(benchmark, route, length, device):
    if device.type != "cuda" or not attention.available():
        pytest.skip("the varlen kernel and cuDNN's attention run on GPUs only")
    attention.register()
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(1, HEADS, length, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(1, KV_HEADS, length, HEAD_DIM, device=device, dtype=torch.bfloat16,
                        generator=g).requires_grad_() for _ in range(2))
    cu = torch.tensor([0, length], dtype=torch.int32, device=device)
    attention._CUDNN_ROWS = False

    def step():
        if route == "varlen":
            out = attention.varlen_attention(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=length)[0]
        elif route == "sdpa-gqa":
            out = attention._causal(q, k, v, None)[0]
        else:
            n = HEADS // KV_HEADS
            out = attention._causal(q, k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1), None)[0]
        out.sum().backward()
        q.grad = k.grad = v.grad = None

    if route == "varlen":
        kernel = "varlen flash"
    elif route == "sdpa-gqa":
        kernel = patches.sdpa_backend(q, k, k, is_causal=True, enable_gqa=True).name
    else:
        kk = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        kernel = patches.sdpa_backend(q, kk, kk, is_causal=True).name
    benchmark.extra_info.update(route=route, kernel=kernel, tokens=length, device=torch.cuda.get_device_name())
    benchmark.pedantic(synced(device, step), rounds=5, warmup_rounds=2)
    flops = 3.5 * 2 * HEADS * HEAD_DIM * length * length  # (1 + 2.5) x the causal forward's 2·H·d·s²
    benchmark.extra_info["tflops"] = round(flops / benchmark.stats.stats.median / 1e12, 1)
    print(f"GPU-RESULT attention {route} ({kernel}) {length} tokens: {benchmark.stats.stats.median * 1e3:.1f} ms, "
          f"{benchmark.extra_info['tflops']} TFLOP/s")
