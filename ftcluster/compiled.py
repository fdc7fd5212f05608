"""Decoder layers compiled with ``torch.compile``, one layer at a time ("regional compilation"): every layer of a
model has the same code, so torch compiles it once and reuses it for all of them (nn.Module inlining makes the
layer's parameters inputs of the graph rather than constants). A compiled layer runs as a few fused kernels launched
from one call, where eager PyTorch launches each of dozens of small kernels from Python: small and adapter models
spend most of a step in that Python, and the GPU waits. Where layers are compiled is the plan's decision
(``Plan.compile``); docs/design.md has the measurements behind it.

Compiled layers leave their norms, SwiGLU and RoPE to Inductor rather than Liger (ftcluster/kernels.py): Liger's
autograd functions would break the layer's graph into pieces. Not compiled:
- under ZeRO-3, whose gather and release hooks run in each layer's call and swap its parameters' data;
- with ``model.activation_offloading``, whose saved-tensor hooks torch.compile cannot trace.

A checkpointed layer's checkpoint is traced into its compiled graph, so Inductor's partitioner decides what the
forward saves. For QLoRA it would save bitsandbytes' dequantized weights in every layer, the memory of a 16-bit
base; the checkpoint tells it to recompute them (``Plan.recompute_only``, ``activations.RecomputePolicy``). A QLoRA
layer outside any checkpoint runs under a checkpoint that recomputes only the dequantization and saves what an
uncheckpointed layer saves (``activations.recompute_only``).

Most of the time to the first step that compiling costs is paid once per graph, so the first step compiles one:
- Behind a frozen embedding the first layer's input needs no gradient and every other layer's does, and torch guards
  on that: two graphs. :func:`apply` makes the embedding's output require grad, which costs the first layer's input
  gradient in backward (its q, k and v projections' input gradients).
- AOTAutograd's cache would leave the QLoRA layer uncached, so each start traced and partitioned it again: its graph
  holds the 4-bit matmul (``linear4bit``), a custom ``autograd.Function``, which the cache takes only when told to
  (``patches.cache_custom_autograd_functions``), and the checkpoint's recompute policy, which the cache must be able
  to pickle and name (``activations.RecomputePolicy``).
"""

from __future__ import annotations

from torch import nn

from ftcluster import activations, patches
from ftcluster.config import ConfigError
from ftcluster.plan import Plan


def apply(model: nn.Module, plan: Plan, backend="inductor") -> str:
    """Compile each decoder layer of ``model`` where the plan says so (after checkpointing and kernels are in place;
    compilation happens at the first call). Returns the line to print."""
    if not plan.compile:
        return f"compiled layers: none ({plan.reasons.get('compile', 'the plan compiles none')})"
    layers = activations.decoder_layers(model)
    if not layers:
        raise ConfigError(f"model.compile: {type(model).__name__} has no decoder layers that transformers marks as "
                          "such, so none can be compiled; set model.compile=off")
    for layer in layers:
        layer.compile(backend=backend)
    _first_layer_input_requires_grad(model)
    patches.cache_custom_autograd_functions()
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", "a custom backend")
    return f"compiled layers: {len(layers)} x {type(layers[0]).__name__} with torch.compile ({name})"


def _first_layer_input_requires_grad(model: nn.Module) -> None:
    """Have the input embedding's output require grad while grad is on, so the first decoder layer's input is like
    every other layer's and all layers run one compiled graph (torch guards on ``requires_grad``)."""
    import torch

    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a model that does not say: its first layer may compile twice
        return
    if embeddings is None:
        return

    def needs_grad(module, args, output):
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
            output.requires_grad_(True)

    embeddings.register_forward_hook(needs_grad)
