"""The varlen attention call as torch.compile traces it. On CPU Dynamo traces it with the inputs' shapes, though the
flash kernel itself runs only on CUDA: the backend records what was traced and stops there."""

import pytest
import torch

from ftcluster import attention


def test_compiled_layers_trace_the_kernel_call_not_the_kernel_lookup():
    """Which kernel and keywords to use is looked up once, by ``register``: looked up inside the attention call,
    Dynamo traced ``inspect.signature`` at every compile of a layer, and warned that it ignored the lookup's cache."""
    pytest.importorskip("torch.nn.attention.varlen")
    attention.register()
    traced = []

    class Traced(Exception):
        pass

    def recording(gm, example_inputs):
        traced.extend(code.co_name for code in torch._guards.TracingContext.get_traced_code())
        raise Traced

    def call(q, cu_seq_lens):
        return attention.varlen_attention(None, q, q, q, None, cu_seq_lens_q=cu_seq_lens, max_length_q=5)[0]

    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="Traced"):
        torch.compile(call, backend=recording)(q, torch.tensor([0, 3, 8], dtype=torch.int32))
    torch._dynamo.reset()
    assert "varlen_attention" in traced
    assert "_kernel_options" not in traced and "signature" not in traced


def test_a_batch_of_one_example_rows_is_attended_as_each_example_alone(monkeypatch):
    """Where register chose SDPA for such batches (cuDNN on a GPU), a row's example gets the causal attention it gets
    alone, its trailing padding unseen, 8 query heads over 2 key/value heads (enable_gqa); on CPU SDPA runs its own
    kernel, which is what this compares."""
    monkeypatch.setattr(attention, "_CUDNN_ROWS", True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 12, 16, generator=g) for heads in (8, 2, 2))
    lengths = (12, 9)  # the second row: 9 real tokens, 3 of padding
    out = attention.varlen_attention(None, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 12, 24], dtype=torch.int32),
                                     max_length_q=12)[0]
    assert out.shape == (2, 12, 8, 16)
    for row, n in enumerate(lengths):
        kk, vv = (t[row:row + 1, :, :n].repeat_interleave(4, dim=1) for t in (k, v))
        alone = torch.nn.functional.scaled_dot_product_attention(q[row:row + 1, :, :n], kk, vv, is_causal=True)
        torch.testing.assert_close(out[row, :n], alone[0].transpose(0, 1))


def test_only_a_batch_of_one_example_rows_leaves_the_varlen_kernel(monkeypatch):
    """As a compiled layer traces it: one boundary per row goes to SDPA, more to the varlen kernel."""
    pytest.importorskip("torch.nn.attention.varlen")
    attention.register()
    monkeypatch.setattr(attention, "_CUDNN_ROWS", True)
    graphs = []

    class Traced(Exception):
        pass

    def recording(gm, example_inputs):
        graphs.append(str(gm.graph))
        raise Traced

    def call(q, cu_seq_lens):
        return attention.varlen_attention(None, q, q, q, None, cu_seq_lens_q=cu_seq_lens, max_length_q=8)[0]

    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    for bounds in ([0, 8], [0, 3, 8]):
        torch._dynamo.reset()
        with pytest.raises(Exception, match="Traced"):
            torch.compile(call, backend=recording)(q, torch.tensor(bounds, dtype=torch.int32))
    torch._dynamo.reset()
    one, two = graphs
    assert "scaled_dot_product_attention" in one and "varlen" not in one
    assert "varlen" in two and "scaled_dot_product_attention" not in two


def test_no_gpu_no_cudnn_route():
    """cudnn_takes asks torch which kernel SDPA would run: on CPU none is cuDNN's, so no batch leaves varlen."""
    assert not attention.cudnn_takes(32, 8, 128, torch.bfloat16, torch.device("cpu"))
    assert "for every micro batch" in attention.describe(False)
