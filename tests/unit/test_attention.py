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
