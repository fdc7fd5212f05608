"""The frozen 4-bit linear layer's forward and backward, each computed from the weight as it is when it runs.

bitsandbytes' own matmul (``MatMul4Bit`` in bitsandbytes/autograd/_functions.py, 0.50) stores a *view* of the
packed weight in its autograd context (``B = B.view(-1, 1)``; ``ctx.tensors = (None, B)``) from the forward until
the layer's backward. Under ZeRO-3 that weight is a copy gathered from every rank's shard, which DeepSpeed frees
after the layer's forward by swapping the parameter's data for an empty tensor; the view keeps the gathered
copy alive. So by the end of a forward every rank held every layer's gathered weights, and 4-bit models took
more memory per GPU on two GPUs than on one (7B: 7.2 GiB on one GPU, 11.5 on two; 70B: 42 and 90).

Here the context keeps the parameter object, not its data: DeepSpeed gathers it again before the layer's
backward, and nothing outlives its use. Without ZeRO-3 the weight is simply resident and the two compute the
same thing (dequantize to the compute dtype, then one cuBLAS matmul, which is bitsandbytes' own path for
training-sized inputs). It also skips bitsandbytes' CPU inference repacking, which rewrites a partitioned
weight's data in place during evaluation on CPUs with AVX512-BF16.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn


def _dequantized(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(weight, weight.quant_state).to(dtype)


class _FrozenMatmul4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: nn.Parameter, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # the parameter: ZeRO-3 may swap its data out and back before backward
        ctx.has_bias = bias is not None
        return F.linear(x, _dequantized(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad @ _dequantized(ctx.weight, grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


class Linear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' ``Linear4bit`` (same parameters, state dict and PEFT support) with the forward above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.weight, "quant_state", None) is None:
            self.weight.quant_state = self.quant_state  # lost when the parameter was re-wrapped (as bitsandbytes does)
        dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _FrozenMatmul4bit.apply(x, self.weight, bias).to(dtype)


def adopt(model: nn.Module) -> int:
    """Give every bitsandbytes ``Linear4bit`` in ``model`` the forward above (the layers keep their weights; only
    the class changes, to a subclass with no state of its own). Returns how many layers changed."""
    changed = 0
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit:
            module.__class__ = Linear4bit
            changed += 1
    return changed
