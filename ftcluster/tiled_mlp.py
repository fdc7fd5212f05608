"""Tiled MLP (ALST, arXiv 2506.13996): each decoder layer's MLP runs over a long row a slice of tokens at a time,
so its intermediate tensors (a gated MLP's gate, up and their product: 6 x intermediate bytes a token in bf16) exist
for one slice, never for the whole row; backward recomputes each slice's forward. DeepSpeed's ``TiledMLP``
(``deepspeed.runtime.sequence_parallel.ulysses_sp``) does the slicing and the gradient bookkeeping, including
ZeRO's (a parameter's gradient is ready only after the last slice), with a forward that writes the slices' outputs
in place (``patches.tiled_mlp_function``); this module puts it under each decoder layer's ``mlp`` and decides the
slice count."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ftcluster import activations, patches

MARK = "_ftcluster_tiled"


def slices(tokens: int, hidden: int) -> int:
    """Slices of about ``hidden`` tokens each, as ALST takes them: the slice's intermediate tensors are then about
    the size of the layer's weights' rows, and a slice's matmuls are still large."""
    return max(1, math.ceil(tokens / hidden))


def apply(model: nn.Module) -> int:
    """Tile the MLP of every decoder layer; returns how many were tiled."""
    TiledMLP = patches.tiled_mlp_function()
    count = 0
    for layer in activations.decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or getattr(mlp, MARK, False):
            continue
        forward = mlp.forward  # the bound forward (adapters injected later still run: it calls the submodules)
        hidden = model.config.hidden_size

        def tiled(x, mlp=mlp, forward=forward, hidden=hidden):
            n = slices(x.shape[-2], hidden)
            if dist.is_initialized():  # every rank the same count: under ZeRO-3 each slice gathers the weights
                agreed = torch.tensor(n, device=x.device)
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
                n = int(agreed.item())
            if n == 1:
                return forward(x)
            # Without grad (evaluation) the same forward runs, a slice at a time, and keeps nothing.
            trained = [p for p in mlp.parameters() if p.requires_grad]
            return TiledMLP.apply(lambda _, part: forward(part), mlp, x, n, trained)

        mlp.forward = tiled
        setattr(mlp, MARK, True)
        count += 1
    return count
