"""Activation memory: gradient checkpointing of the decoder layers, and a causal-LM loss that never holds the
logits in float32 for the whole batch."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ftcluster.config import ConfigError

# Float32 logits held at once by the loss: a chunk of rows of this size, upcast, reduced, and recomputed in
# backward. At a 128k vocabulary a whole micro batch of 4096 tokens would hold 2 GiB of them, twice (the upcast and
# cross_entropy's log-softmax), next to their gradient.
LOSS_CHUNK_BYTES = 256 * 2**20


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the layers transformers marks as checkpointable."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_layers(model: nn.Module) -> int:
    """Recompute each decoder layer's activations in backward instead of keeping them. The layer's ``forward`` is
    what is checkpointed, not its ``__call__`` (which transformers before 5.23 checkpoints), so module hooks stay
    outside: ZeRO-3, which gathers a whole layer in its hooks, then gathers it once for backward and recompute
    together, instead of releasing it inside the recompute while backward still needs it. Non-reentrant, so
    frozen inputs need no ``requires_grad``. Returns the number of layers."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"model.gradient_checkpointing: {type(model).__name__} has no decoder layers that "
                          "transformers marks as checkpointable; set model.gradient_checkpointing=false")
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)
    return len(layers)


def _summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")


def chunked_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                           num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                           shift_labels: torch.Tensor | None = None, **_) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (same arguments, same value), computed over chunks of rows: each chunk's
    float32 logits live only while it is reduced, and again in its backward."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat_logits = logits.reshape(-1, vocab_size)
    flat_labels = shift_labels.reshape(-1).to(logits.device)
    rows = max(1, LOSS_CHUNK_BYTES // (4 * vocab_size))
    total = flat_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_labels.numel(), rows):
        chunk = (flat_logits[start:start + rows], flat_labels[start:start + rows], ignore_index)
        total = total + (checkpoint(_summed_cross_entropy, *chunk, use_reentrant=False)
                         if flat_logits.requires_grad else _summed_cross_entropy(*chunk))
    if num_items_in_batch is None:
        num_items_in_batch = (flat_labels != ignore_index).sum()
    elif torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def use_chunked_loss(model: nn.Module) -> None:
    """Make the causal LM compute its loss with :func:`chunked_causal_lm_loss` (transformers' own setter)."""
    model.loss_function = chunked_causal_lm_loss
