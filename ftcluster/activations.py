"""Activation memory: gradient checkpointing of the decoder layers (their inputs optionally kept in host memory),
and a causal-LM loss that never holds the logits in float32 for the whole batch."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ftcluster.config import ConfigError

# Float32 logits held at once by the loss, in rows of this many bytes. At a 128k vocabulary a micro batch of 4096
# tokens holds 2 GiB of float32 logits whole, and cross_entropy keeps a second copy (its log-softmax) for backward.
LOSS_CHUNK_BYTES = 64 * 2**20


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the layers transformers marks as checkpointable."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class HostActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep each saved accelerator tensor in pinned host memory until backward needs it.

    Entered around a non-reentrant checkpoint, the only tensors saved are the checkpointed layer's inputs (the
    checkpoint's own hooks, inner to these, keep nothing of the layer's interior). That is the hidden state
    entering each layer: 2 x tokens x hidden bytes per layer, 5 GiB for a 70B model at 4096 tokens, which no
    number of ZeRO-3 GPUs reduces. Both copies are queued on the current stream, so they are ordered against the
    kernels that write and read the tensor without a synchronization, and the device copy's memory returns to the
    allocator as soon as the layer has run. Tensors already in host memory (CPU training) are kept as they are.
    ``packed_bytes`` counts what went through these hooks since the last ``reset``."""

    def __init__(self):
        self.packed_bytes = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        self.packed_bytes += t.numel() * t.element_size()
        if t.device.type == "cpu":
            return t
        host = torch.empty_like(t, device="cpu", pin_memory=True)
        host.copy_(t, non_blocking=True)
        return t.device, host

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)

    def reset(self) -> None:
        self.packed_bytes = 0


def _checkpointed(forward, saved_tensor_hooks, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    with saved_tensor_hooks or contextlib.nullcontext():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)


@dataclass
class Checkpointing:
    layers: int
    host: HostActivations | None
    """Set when the checkpoints (each layer's input) live in host memory."""


def checkpoint_layers(model: nn.Module, offload: bool = False, count: int | None = None) -> Checkpointing:
    """Recompute each decoder layer's activations in backward instead of keeping them; with ``offload``, keep
    the one tensor each layer does keep (its input) in pinned host memory (:class:`HostActivations`). The
    layer's ``forward`` is what is checkpointed, not its ``__call__`` (which transformers before 5.23
    checkpoints), so module hooks stay outside: ZeRO-3, which gathers a whole layer in its hooks, then gathers it
    once for backward and recompute together, instead of releasing it inside the recompute while backward still
    needs it. Non-reentrant, so frozen inputs need no ``requires_grad``. ``count``: only the first ``count``
    layers; the others keep their activations and are not recomputed."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"model.gradient_checkpointing: {type(model).__name__} has no decoder layers that "
                          "transformers marks as checkpointable; set model.gradient_checkpointing=false")
    if count is not None and count > len(layers):
        raise ConfigError(f"model.checkpointed_layers={count}: {type(model).__name__} has {len(layers)} decoder "
                          f"layers; set at most {len(layers)}, or leave it unset to checkpoint all of them")
    host = HostActivations() if offload else None
    for layer in layers[:count]:
        layer.forward = functools.partial(_checkpointed, layer.forward, host)
    return Checkpointing(len(layers[:count]), host)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of 2-D logits, computed ``rows`` at a time in float32. Forward keeps no float32
    tensor; backward writes softmax - one-hot into one gradient in the logits' dtype, chunk by chunk. Peak: the
    logits, their gradient, and one chunk in float32."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, rows: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, labels.numel(), rows):
            chunk, target = logits[start:start + rows].float(), labels[start:start + rows]
            valid = target != ignore_index
            picked = chunk.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
            total += ((torch.logsumexp(chunk, dim=1) - picked) * valid).sum()
        ctx.save_for_backward(logits, labels)
        ctx.ignore_index, ctx.rows = ignore_index, rows
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, labels = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, labels.numel(), ctx.rows):
            target = labels[start:start + ctx.rows]
            valid = target != ctx.ignore_index
            p = torch.softmax(logits[start:start + ctx.rows].float(), dim=1)
            p[torch.arange(len(target), device=p.device), torch.where(valid, target, 0)] -= 1
            grad[start:start + ctx.rows] = p.mul_((valid * grad_total)[:, None])
        return grad, None, None, None


def chunked_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                           num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                           shift_labels: torch.Tensor | None = None, **_) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (same arguments, same value and gradient) without its whole-batch float32
    copies of the logits: transformers upcasts all of them, and cross_entropy keeps a float32 log-softmax of all
    of them for backward."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat_labels = shift_labels.reshape(-1).to(logits.device)
    rows = max(1, LOSS_CHUNK_BYTES // (4 * vocab_size))
    total = _ChunkedCrossEntropy.apply(logits.reshape(-1, vocab_size), flat_labels, ignore_index, rows)
    if num_items_in_batch is None:
        num_items_in_batch = (flat_labels != ignore_index).sum()
    elif torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def use_chunked_loss(model: nn.Module) -> None:
    """Make the causal LM compute its loss with :func:`chunked_causal_lm_loss` (transformers' own setter)."""
    model.loss_function = chunked_causal_lm_loss
