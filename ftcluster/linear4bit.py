"""The frozen 4-bit linear layer's forward and backward, each computed from the weight as it is when it runs.

bitsandbytes' own matmul (``MatMul4Bit`` in bitsandbytes/autograd/_functions.py, 0.50) stores a *view* of the
packed weight in its autograd context (``B = B.view(-1, 1)``; ``ctx.tensors = (None, B)``) from the forward until
the layer's backward. Under ZeRO-3 that weight is a copy gathered from every rank's shard, which DeepSpeed frees
after the layer's forward by swapping the parameter's data for an empty tensor; the view keeps the gathered
copy alive. So by the end of a forward every rank held every layer's gathered weights, and 4-bit models took
more memory per GPU on two GPUs than on one.

Here the context keeps the parameter object, not its data: DeepSpeed gathers it again before the layer's
backward, and nothing outlives its use. Without ZeRO-3 the weight is simply resident and the two compute the
same thing (dequantize to the compute dtype, then one cuBLAS matmul, which is bitsandbytes' own path for
training-sized inputs). It also skips bitsandbytes' CPU inference repacking, which rewrites a partitioned
weight's data in place during evaluation on CPUs with AVX512-BF16.

A checkpointed layer dequantizes each weight three times a step: in the forward, again in the recompute, and in
the backward. Every dequantization is two bitsandbytes kernels behind a few hundred microseconds of host Python,
and at 7B that host time, hundreds of times a step, is most of what makes a QLoRA step slower than a LoRA one
(docs/design.md). With ``keep_dequantized`` (set on the 4-bit
layers of checkpointed decoder layers, ``quantization.keep_recomputed_weights``) the dequantized weight is saved
for backward like any activation: the checkpoint drops it after the first forward, and the recompute's copy lives
on to the backward, which then needs no third dequantization. That holds one decoder layer's weights in the
compute dtype from its recompute to its backward.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn


def _dequantized(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The plain tensor, not the Params4bit: each op on the subclass goes through its Python __torch_function__.
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


class _FrozenMatmul4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: nn.Parameter, bias: torch.Tensor | None,
                keep_dequantized: bool) -> torch.Tensor:
        dequantized = _dequantized(weight, x.dtype)
        ctx.keep_dequantized = keep_dequantized = keep_dequantized and ctx.needs_input_grad[0]
        if keep_dequantized:
            ctx.save_for_backward(dequantized)  # dropped by the checkpoint in the first forward, kept in the recompute
        else:
            ctx.weight = weight  # the parameter: ZeRO-3 may swap its data out and back before backward
        ctx.has_bias = bias is not None
        return F.linear(x, dequantized, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = ctx.saved_tensors[0] if ctx.keep_dequantized else _dequantized(ctx.weight, grad.dtype)
            grad_x = grad @ weight
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None


class Linear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' ``Linear4bit`` (same parameters, state dict and PEFT support) with the forward above."""

    keep_dequantized = False
    """Save the dequantized weight for backward: only inside a checkpointed layer, whose checkpoint keeps just the
    recompute's copy (elsewhere it would hold every layer's weights in the compute dtype until backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.weight, "quant_state", None) is None:
            self.weight.quant_state = self.quant_state  # lost when the parameter was re-wrapped (as bitsandbytes does)
        dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _FrozenMatmul4bit.apply(x, self.weight, bias, self.keep_dequantized).to(dtype)


def adopt(model: nn.Module) -> int:
    """Give every bitsandbytes ``Linear4bit`` in ``model`` the forward above (the layers keep their weights; only
    the class changes, to a subclass with no state of its own). Returns how many layers changed."""
    changed = 0
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit:
            module.__class__ = Linear4bit
            changed += 1
    return changed


def keep_dequantized_in(layers: list[nn.Module]) -> None:
    """Have the 4-bit layers inside ``layers`` (checkpointed decoder layers) keep their recomputed dequantized
    weights for backward."""
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, Linear4bit):
                module.keep_dequantized = True
