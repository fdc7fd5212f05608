"""Activation memory: gradient checkpointing of the decoder layers (their inputs optionally kept in host memory),
and a causal-LM loss that never holds the logits in float32 for the whole batch."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
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
        if not t.is_contiguous():
            host = torch.empty_like(t, device="cpu", pin_memory=True)
            host.copy_(t, non_blocking=True)
            return t.device, host
        return t.device, t.shape, t.dtype, to_host(t, pin=True)

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if len(packed) == 2:
            device, host = packed
            return host.to(device, non_blocking=True)
        device, shape, dtype, parts = packed
        return from_host(parts, shape, dtype, device)

    def reset(self) -> None:
        self.packed_bytes = 0


# Torch's pinned host allocator rounds every block up to a power of two, so a checkpoint of 2.75 GiB (a 360k-token
# row of a 4096-wide model) would take 4 GiB of host memory, 128 GiB over 32 layers. A tensor is copied into pieces
# whose byte counts are the powers of two of its size's binary digits instead, each a whole block: what the host
# holds is the tensor's size, to within the last piece, which is smaller than this.
SMALLEST_PIECE_BYTES = 2**20


def pieces(nbytes: int, smallest: int = SMALLEST_PIECE_BYTES) -> list[int]:
    """Byte counts summing to ``nbytes``, largest first: a power of two for each binary digit of ``nbytes`` of at
    least ``smallest``, then what is left (less than ``smallest``)."""
    out = [1 << bit for bit in reversed(range(nbytes.bit_length())) if 1 << bit >= smallest and nbytes >> bit & 1]
    rest = nbytes - sum(out)
    return out + [rest] if rest else out


def to_host(t: torch.Tensor, pin: bool) -> list[torch.Tensor]:
    """A contiguous tensor's bytes, copied (queued on the current stream) into host buffers of :func:`pieces`."""
    flat = t.reshape(-1).view(torch.uint8)
    parts, offset = [], 0
    for n in pieces(flat.numel()):
        host = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
        host.copy_(flat[offset:offset + n], non_blocking=pin)
        parts.append(host)
        offset += n
    return parts


def from_host(parts: list[torch.Tensor], shape: torch.Size, dtype: torch.dtype, device) -> torch.Tensor:
    """The tensor :func:`to_host` copied, on ``device``."""
    out = torch.empty(shape, dtype=dtype, device=device)
    flat, offset = out.reshape(-1).view(torch.uint8), 0
    for host in parts:
        flat[offset:offset + host.numel()].copy_(host, non_blocking=True)
        offset += host.numel()
    return out


def _checkpointed(forward, saved_tensor_hooks, context_fn, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    with saved_tensor_hooks or contextlib.nullcontext():
        if context_fn is None:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


@dataclass(frozen=True)
class RecomputePolicy:
    """A selective-checkpointing policy: the ops of these operator namespaces must be recomputed in backward, the
    rest are recomputed too unless the compiler finds it better to save them (what plain checkpointing asks), or,
    with ``save_rest``, saved unless the compiler finds it better to recompute them (what a layer outside any
    checkpoint gets: :func:`recompute_only`).

    Where the checkpoint is traced into a compiled layer, Inductor's partitioner decides what the forward saves for
    backward, and on CUDA it saved the output of bitsandbytes' dequantization (a custom op it does not recompute on
    its own) in every checkpointed layer: a layer's weights in the compute dtype more than eager checkpointing
    keeps. Eager checkpointing never consults the policy's answer for memory; it is what the compiled graph is
    partitioned by.

    A class rather than a closure: AOTAutograd's cache pickles the policy into its key, and takes ``cache_hash``
    (:meth:`context_fn`) for its behaviour; a closure it cannot pickle, so every start traced the layer again."""
    namespaces: frozenset[str]
    save_rest: bool = False

    def __call__(self, ctx, op, *args, **kwargs):
        from torch.utils.checkpoint import CheckpointPolicy

        if getattr(op, "namespace", None) in self.namespaces:
            return CheckpointPolicy.MUST_RECOMPUTE
        return CheckpointPolicy.PREFER_SAVE if self.save_rest else CheckpointPolicy.PREFER_RECOMPUTE

    def context_fn(self):
        """The ``context_fn`` for ``torch.utils.checkpoint``, named for AOTAutograd's cache by this class's code
        and the namespaces."""
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        context_fn = functools.partial(create_selective_checkpoint_contexts, self)
        code = inspect.getsource(type(self)) + repr((sorted(self.namespaces), self.save_rest))
        context_fn.cache_hash = hashlib.sha256(code.encode()).hexdigest()
        return context_fn


@dataclass
class Checkpointing:
    layers: int
    host: HostActivations | None
    """Set when the checkpoints (each layer's input) live in host memory."""


def checkpoint_layers(model: nn.Module, offload: bool = False, count: int | None = None,
                      must_recompute: frozenset[str] = frozenset()) -> Checkpointing:
    """Recompute each decoder layer's activations in backward instead of keeping them; with ``offload``, keep
    the one tensor each layer does keep (its input) in pinned host memory (:class:`HostActivations`). The
    layer's ``forward`` is what is checkpointed, not its ``__call__`` (which transformers before 5.23
    checkpoints), so module hooks stay outside: ZeRO-3, which gathers a whole layer in its hooks, then gathers it
    once for backward and recompute together, instead of releasing it inside the recompute while backward still
    needs it. Non-reentrant, so frozen inputs need no ``requires_grad``. ``count``: only the first ``count``
    layers; the others keep their activations and are not recomputed. ``must_recompute``: operator namespaces
    whose ops a compiled layer must recompute rather than save (:class:`RecomputePolicy`); the checkpoints then
    run under a selective-checkpointing policy, which costs a dispatch per op where the layer is not compiled."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"model.gradient_checkpointing: {type(model).__name__} has no decoder layers that "
                          "transformers marks as checkpointable; set model.gradient_checkpointing=false")
    if count is not None and count > len(layers):
        raise ConfigError(f"model.checkpointed_layers={count}: {type(model).__name__} has {len(layers)} decoder "
                          f"layers; set at most {len(layers)}, or leave it unset to checkpoint all of them")
    host = HostActivations() if offload else None
    context_fn = RecomputePolicy(must_recompute).context_fn() if must_recompute else None
    for layer in layers[:count]:
        layer.forward = functools.partial(_checkpointed, layer.forward, host, context_fn)
        layer.ftcluster_checkpoint = "layer"
    return Checkpointing(len(layers[:count]), host)


def recompute_only(layers: list[nn.Module], namespaces: frozenset[str]) -> None:
    """Have compiled ``layers``, which are not checkpointed, recompute the ops of these operator namespaces in
    backward rather than save them, and keep everything else as an uncheckpointed layer does.

    Inductor's partitioner saves the output of an op it does not know how to recompute, and bitsandbytes'
    dequantization is one: a compiled QLoRA layer outside a checkpoint would keep its weights dequantized from the
    forward to the backward, the memory of a 16-bit base. A checkpoint whose policy must recompute those ops and
    prefers to save the rest (``RecomputePolicy(save_rest=True)``) tells it otherwise. Only for compiled layers:
    an eager checkpoint would run the layer's forward a second time, and the policy costs a dispatch per op."""
    context_fn = RecomputePolicy(namespaces, save_rest=True).context_fn()
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward, None, context_fn)
        layer.ftcluster_checkpoint = "recompute-only"


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
