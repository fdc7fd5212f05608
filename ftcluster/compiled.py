"""Decoder layers compiled with ``torch.compile``, one layer at a time ("regional compilation"): every layer of a
model has the same code, so torch compiles it once and reuses it for all of them (nn.Module inlining makes the
layer's parameters inputs of the graph rather than constants). A compiled layer runs as a few fused kernels launched
from one call, where eager PyTorch launches each of dozens of small kernels from Python: small and adapter models
spend most of a step in that Python, and the GPU waits.

``model.compile``: ``auto`` (the default) compiles the layers of a run on one CUDA GPU where nothing in the
layer's call stands in its way; ``on`` compiles them on several workers too and refuses to run where it cannot;
``off`` never compiles. Compiled layers leave their norms, SwiGLU and RoPE to Inductor rather than Liger
(ftcluster/kernels.py): Liger's autograd functions break the layer's graph, and with them in it compiled layers
measured slower than eager ones (1B, reports/llama-1b/2026-11-26-1xh100-compile). Without them, on one H100 at the
Llama-2-7B shape, the LoRA step took 0.296 s against 0.336 eager and 0.454 for the HF recipe in one run, 0.303
against 0.393 eager in another; at the Llama-3.2-1B shape 0.088 s against 0.191 eager and 0.109 for the HF recipe
(reports/llama-*/2026-11-27-1xh100-lora-compiled, reports/llama-7b/2026-11-27-1xh100-compile). Compiling takes
8-11 s of the first step where Inductor's cache does not yet hold the layer, 2-4 s where it does (7B, one
H100, reports/ttfs/2026-11-28-1xh100.md).

A checkpointed layer's checkpoint is traced into its compiled graph, so Inductor's partitioner decides what the
forward saves. For QLoRA it saved bitsandbytes' dequantized weights in every layer (7B: 26.3 GiB peak against 5.6
eager) until the checkpoint told it to recompute them (:func:`must_recompute`): with that, 8 layers of the 7B shape
stepped in 95 ms against 164 eager at 0.3 GiB more (reports/llama-7b/2026-11-27-1xh100-compiled-qlora). A QLoRA
layer outside any checkpoint would keep them too; it runs under a checkpoint that recomputes only the
dequantization and saves what an uncheckpointed layer saves (``activations.recompute_only``): without
checkpointing, the 1B shape stepped in 0.073 s against 0.150 eager at the same peak (one H200,
reports/llama-1b/2026-11-28-1xh200-qlora-compile), 4 layers of the 7B shape in 42 ms against 57 (tests/gpu).

Full fine-tuning of the 1B shape on one H100 stepped in 0.180 s compiled against 0.238 eager at the same 25.4 GiB
peak (the worker's loop without Ray, reports/llama-1b/2026-11-27-1xh100-full-profile). ``auto`` leaves layers eager
where they are not measured compiled: on several workers (DeepSpeed's gradient hooks around compiled layers, and
each rank compiling). Not compiled:
- under ZeRO-3, whose gather and release hooks run in each layer's call and swap its parameters' data;
- with ``model.activation_offloading``, whose saved-tensor hooks torch.compile cannot trace.

Most of the time to the first step that compiling costs is paid once per graph, so the first step compiles one:
- Behind a frozen embedding the first layer's input needs no gradient and every other layer's does, and torch guards
  on that: two graphs, each traced, partitioned and loaded (7B QLoRA on one H100, warm caches: 2.9 and 1.6 s).
  :func:`apply` makes the embedding's output require grad, which costs the first layer's input gradient in backward
  (its q, k and v projections' input gradients: 0.4% of the 7B LoRA step, nothing measurable for QLoRA).
- AOTAutograd's cache left the QLoRA layer uncached, so each start traced and partitioned it again (0.9 s of
  2.9): its graph holds the 4-bit matmul (``linear4bit``), a custom ``autograd.Function``, which the cache takes
  only when told to (:func:`apply` tells it), and the checkpoint's recompute policy, which the cache must be able to
  pickle and name (``activations.RecomputePolicy``).
"""

from __future__ import annotations

import torch
import torch._functorch.config
from torch import nn

from ftcluster import activations
from ftcluster.config import ConfigError, RunConfig


def why_not(cfg: RunConfig, device_type: str) -> str | None:
    """Why this run's layers cannot be compiled, or None."""
    if cfg.partitions_parameters:
        return "ZeRO-3 gathers and releases each layer's parameters in hooks on the layer's call"
    if cfg.model.activation_offloading:
        return "model.activation_offloading's saved-tensor hooks cannot be traced by torch.compile"
    if device_type != "cuda":
        return f"the device is {device_type}; compiled layers pay off on GPUs, whose kernels the host must keep fed"
    return None


def _why_auto_does_not(cfg: RunConfig) -> str | None:
    """Why ``model.compile=auto`` leaves this run's layers eager where they could be compiled, or None."""
    if cfg.scaling.num_workers != 1:
        return "several workers are not measured compiled yet"
    return None


def must_recompute(cfg: RunConfig, device_type: str) -> frozenset[str]:
    """The operator namespaces a compiled layer must recompute rather than save, checkpointed or not: bitsandbytes'
    (its 4-bit dequantization) for QLoRA, whose compiled layers otherwise kept every layer's dequantized weights."""
    return frozenset({"bitsandbytes"}) if cfg.method == "qlora" and compiles(cfg, device_type) else frozenset()


def compiles(cfg: RunConfig, device_type: str) -> bool:
    """Whether this run's decoder layers will be compiled with Inductor."""
    wanted = cfg.model.compile == "on" or (cfg.model.compile == "auto" and _why_auto_does_not(cfg) is None)
    return wanted and why_not(cfg, device_type) is None


def apply(model: nn.Module, cfg: RunConfig, device_type: str, backend="inductor") -> str:
    """Compile each decoder layer of ``model`` (after checkpointing and kernels are in place; compilation happens at
    the first call). Returns the line to print."""
    mode = cfg.model.compile
    if mode == "off":
        return "compiled layers: off (model.compile=off)"
    reason = why_not(cfg, device_type) if backend == "inductor" else None
    if reason:
        if mode == "on":
            raise ConfigError(f"model.compile=on: {reason}; set model.compile=auto or off")
        return f"compiled layers: no, {reason}"
    held_back = _why_auto_does_not(cfg) if mode == "auto" else None
    if held_back:
        return f"compiled layers: no, model.compile=auto: {held_back}; set model.compile=on to compile them"
    layers = activations.decoder_layers(model)
    if not layers:
        if mode == "on":
            raise ConfigError(f"model.compile=on: {type(model).__name__} has no decoder layers to compile; set "
                              "model.compile=auto or off")
        return "compiled layers: no, the model has no decoder layers that transformers marks"
    for layer in layers:
        layer.compile(backend=backend)
    _first_layer_input_requires_grad(model)
    # A graph holding a custom autograd.Function (QLoRA's 4-bit matmul, linear4bit) is otherwise kept out of
    # AOTAutograd's cache; PyTorch checked that the op is pure in its inputs and keeps it behind this flag while it
    # tests it (pytorch/pytorch#149751). The graph, the function's forward and backward traced into it, is the key.
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", "a custom backend")
    return f"compiled layers: {len(layers)} x {type(layers[0]).__name__} with torch.compile ({name})"


def _first_layer_input_requires_grad(model: nn.Module) -> None:
    """Have the input embedding's output require grad while grad is on, so the first decoder layer's input is like
    every other layer's and all layers run one compiled graph (torch guards on ``requires_grad``)."""
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
